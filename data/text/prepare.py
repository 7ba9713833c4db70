"""
Your own text as a dataset: a UTF-8 file, or a folder of .txt files (searched recursively, read in
sorted order, each one a document). GPT-2 BPE by default, every document followed by <|endoftext|>;
with --char one token per character and meta.pkl holding the vocabulary. The first 90% of the token
stream is train.bin, the rest val.bin, written next to this file (or to --out_dir). Then:
    python train.py --dataset=text ...
"""
import argparse
import glob
import os
import pickle
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from token_bins import check_vocab_fits, encode_text, fail, gpt2_encoding, write_bin

here = os.path.dirname(os.path.abspath(__file__))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('input', help="a text file, or a folder of .txt files")
parser.add_argument('--char', action='store_true', help="character-level tokens instead of GPT-2 BPE")
parser.add_argument('--val_fraction', type=float, default=0.1, help="share of the tokens that go to val.bin")
parser.add_argument('--out_dir', default=here, help="where to write; train.py reads data/<dataset>/")
args = parser.parse_args()
if not 0 < args.val_fraction < 1:
    fail(f"--val_fraction={args.val_fraction} is not in (0, 1): it is the share of the tokens that go to val.bin")

if os.path.isdir(args.input):
    files = sorted(glob.glob(os.path.join(args.input, '**', '*.txt'), recursive=True))
    if not files:
        fail(f"no .txt files in the folder {args.input}")
elif os.path.isfile(args.input):
    files = [args.input]
else:
    fail(f"no file or folder {args.input}")
docs = []
for path in files:
    try:
        with open(path, encoding='utf-8') as f:
            docs.append(f.read())
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it, e.g. with iconv")
if not any(docs):
    fail(f"empty input: {args.input} holds no text")
print(f"read {sum(map(len, docs)):,} characters from {len(files)} file(s)")

os.makedirs(args.out_dir, exist_ok=True)
meta_path = os.path.join(args.out_dir, 'meta.pkl')
if args.char:
    data = ''.join(docs)
    chars = sorted(set(data))
    check_vocab_fits(len(chars))
    # ids by binary search of each character's code point among the vocabulary's
    codepoints = np.frombuffer(data.encode('utf-32-le'), dtype=np.uint32)
    ids = np.searchsorted(np.array([ord(c) for c in chars], dtype=np.uint32), codepoints).astype(np.uint16)
    print(f"vocab size: {len(chars):,} characters")
else:
    enc = gpt2_encoding()
    ids = np.concatenate([np.append(encode_text(doc, enc), np.uint16(enc.eot_token)) for doc in docs])
n_train = int(len(ids) * (1 - args.val_fraction))
if n_train >= len(ids):
    fail(f"val split is empty: {len(ids):,} tokens with --val_fraction={args.val_fraction}; "
         f"raise --val_fraction or give more text")
if n_train <= 0:
    fail(f"train split is empty: {len(ids):,} tokens with --val_fraction={args.val_fraction}; "
         f"lower --val_fraction or give more text")
print(f"train has {n_train:,} tokens")
print(f"val has {len(ids) - n_train:,} tokens")
write_bin(ids[:n_train], os.path.join(args.out_dir, 'train.bin'))
write_bin(ids[n_train:], os.path.join(args.out_dir, 'val.bin'))
if args.char:
    meta = {'vocab_size': len(chars), 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}}
    with open(meta_path + '.tmp', 'wb') as f:
        pickle.dump(meta, f)
    os.replace(meta_path + '.tmp', meta_path)
elif os.path.exists(meta_path):
    os.remove(meta_path)  # left by an earlier --char run: train.py would take this data for characters
