"""
OpenWebText in GPT-2 BPE, as nanoGPT prepares it: the Hugging Face dataset (8,013,769 documents,
about 54 GB in the HF cache), a 0.0005 val split (seed 2357), every document followed by
<|endoftext|>. Writes train.bin (~17 GB, ~9B tokens) and val.bin (~8.5 MB, ~4M tokens) next to this file,
replacing the dataset there whole or, if the run fails or is stopped, not at all.
"""
import argparse
import math
import os
import sys

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [root, os.path.join(root, 'data')]
from configurator import fail  # noqa: E402
from token_bins import DatasetFiles, write_dataset  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--num_proc', type=int, default=8, help="tokenizing processes (about half your CPU cores)")
parser.add_argument('--num_proc_load_dataset', type=int, default=8, help="processes for download and unpacking")
parser.add_argument('--val_fraction', type=float, default=0.0005, help="share of the documents that go to val.bin")
args = parser.parse_args()
for name in ('num_proc', 'num_proc_load_dataset'):
    if getattr(args, name) < 1:
        fail(f"--{name}={getattr(args, name)} is not an integer >= 1")
if not 0 < args.val_fraction < 1:
    fail(f"--val_fraction={args.val_fraction} is not in (0, 1): it is the share of the documents that go to val.bin")

from datasets import load_dataset  # after the arguments: --help stays quick

here = os.path.dirname(os.path.abspath(__file__))
try:
    dataset = load_dataset('openwebtext', num_proc=args.num_proc_load_dataset)
except OSError as e:
    fail(f"cannot load the openwebtext dataset from Hugging Face ({type(e).__name__}: {e})")
n_docs = len(dataset['train'])
n_val = math.ceil(n_docs * args.val_fraction)  # as datasets rounds a fractional test_size
if not 0 < n_val < n_docs:
    fail(f"--val_fraction={args.val_fraction} of {n_docs:,} documents leaves an empty split; pick a value between "
         f"{1 / n_docs:.2g} and {1 - 1 / n_docs:.6g}")
split_dataset = dataset['train'].train_test_split(test_size=n_val, seed=2357, shuffle=True)
split_dataset['val'] = split_dataset.pop('test')  # train.py calls it val

with DatasetFiles(here) as dataset:  # train.bin and val.bin together, or the old set untouched
    for split, dset in split_dataset.items():
        n_tokens = write_dataset(dset, os.path.join(here, f'{split}.bin'), num_proc=args.num_proc, files=dataset)
        print(f"{split}.bin: {n_tokens:,} tokens from {len(dset):,} documents")
