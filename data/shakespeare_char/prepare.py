"""
Tiny Shakespeare as characters, for a character-level GPT: each distinct character of the text is a
token. Writes train.bin and val.bin (uint16 token ids; the first 90% of the text, then the rest) and
meta.pkl (vocab_size, and the itos/stoi maps that sample.py decodes and encodes with), in the same
layout as nanoGPT. Downloads input.txt first when it is not beside this script.
"""
import argparse
import os
import pickle
import sys

import numpy as np

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
here = os.path.dirname(os.path.abspath(__file__))
input_path = os.path.join(here, 'input.txt')
if not os.path.exists(input_path):
    import requests
    url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
    print(f"downloading {url}")
    try:
        response = requests.get(url, timeout=60)
        response.raise_for_status()
    except requests.RequestException as e:
        sys.exit(f"{sys.argv[0]}: cannot download {url} ({type(e).__name__}); put Tiny Shakespeare at {input_path} instead")
    with open(input_path, 'w', encoding='utf-8') as f:
        f.write(response.text)

with open(input_path, 'r', encoding='utf-8') as f:
    data = f.read()
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
train_ids.tofile(os.path.join(here, 'train.bin'))
val_ids.tofile(os.path.join(here, 'val.bin'))

with open(os.path.join(here, 'meta.pkl'), 'wb') as f:
    pickle.dump({'vocab_size': vocab_size, 'itos': itos, 'stoi': stoi}, f)
