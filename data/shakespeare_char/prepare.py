"""
Tiny Shakespeare as characters, for a character-level GPT: each distinct character of the text is a
token. Writes train.bin and val.bin (uint16 token ids; the first 90% of the text, then the rest) and
meta.pkl (vocab_size, and the itos/stoi maps that sample.py decodes and encodes with), in the same
layout as nanoGPT, replacing the three whole or, if the run fails or is stopped, not at all.
Downloads input.txt first when it is not beside this script.
"""
import argparse
import os
import sys

import numpy as np

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(here)), os.path.dirname(here)]
from configurator import fail  # noqa: E402
from files import os_error_text, write_atomically  # noqa: E402
from token_bins import DatasetFiles, read_text  # noqa: E402

input_path = os.path.join(here, 'input.txt')
if not os.path.exists(input_path):
    import requests
    url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
    print(f"downloading {url}")
    try:
        response = requests.get(url, timeout=60)
        response.raise_for_status()
    except requests.RequestException as e:
        fail(f"cannot download {url} ({type(e).__name__}); put Tiny Shakespeare at {input_path} instead")
    try:  # whole or not at all: an interrupted download must not pass for the text
        write_atomically(input_path, lambda f: f.write(response.text.encode('utf-8')))
    except OSError as e:
        fail(f"cannot write {input_path}: {os_error_text(e)}")

data = read_text(input_path)
print(f"length of dataset in characters: {len(data):,}")

chars = sorted(set(data))
vocab_size = len(chars)
print("all the unique characters:", ''.join(chars))
print(f"vocab size: {vocab_size:,}")
stoi = {ch: i for i, ch in enumerate(chars)}
itos = {i: ch for i, ch in enumerate(chars)}

n = len(data)
train_data = data[:int(n * 0.9)]
val_data = data[int(n * 0.9):]
train_ids = np.array([stoi[c] for c in train_data], dtype=np.uint16)
val_ids = np.array([stoi[c] for c in val_data], dtype=np.uint16)
print(f"train has {len(train_ids):,} tokens")
print(f"val has {len(val_ids):,} tokens")

with DatasetFiles(here) as dataset:  # the three together, or the old three untouched
    dataset.write_ids('train.bin', train_ids)
    dataset.write_ids('val.bin', val_ids)
    dataset.write_pickle('meta.pkl', {'vocab_size': vocab_size, 'itos': itos, 'stoi': stoi})
