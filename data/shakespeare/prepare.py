"""
Tiny Shakespeare in GPT-2 BPE, as nanoGPT prepares it: the first 90% of the characters are train,
the rest val, each encoded with encode_ordinary. Gives train.bin (301,966 tokens) and val.bin
(36,059 tokens) next to this file, for config/finetune_shakespeare.py, replacing the dataset there
whole or, if the run fails or is stopped, not at all.
"""
import argparse
import os
import sys
import urllib.request

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [root, os.path.join(root, 'data')]
from configurator import fail  # noqa: E402
from token_bins import DatasetFiles, encode_text, gpt2_encoding, read_text  # noqa: E402

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
here = os.path.dirname(os.path.abspath(__file__))
input_file_path = os.path.join(here, 'input.txt')
if not os.path.exists(input_file_path):
    data_url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
    try:
        urllib.request.urlretrieve(data_url, input_file_path + '.tmp')
    except OSError as e:
        fail(f"cannot download {data_url} ({e}); put Tiny Shakespeare at {input_file_path} instead")
    os.replace(input_file_path + '.tmp', input_file_path)

data = read_text(input_file_path)
n = len(data)
train_data = data[:int(n * 0.9)]
val_data = data[int(n * 0.9):]

enc = gpt2_encoding()
train_ids = encode_text(train_data, enc)
val_ids = encode_text(val_data, enc)
print(f"train has {len(train_ids):,} tokens")
print(f"val has {len(val_ids):,} tokens")
with DatasetFiles(here) as dataset:  # the two together (and no meta.pkl), or the old set untouched
    dataset.write_ids('train.bin', train_ids)
    dataset.write_ids('val.bin', val_ids)
