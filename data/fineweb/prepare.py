"""
FineWeb-Edu (HuggingFaceFW/fineweb-edu), educational web pages, in GPT-2 BPE, every document followed
by <|endoftext|>; by default its sample-10BT subset (about 10B GPT-2 tokens). The dataset is streamed,
so the corpus is never held whole, on disk or in memory; every 2000th document goes to val.bin, the
others to train.bin (~20 GB for the whole sample), next to this file.
"""
import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from token_bins import fail, write_stream

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--subset', default='sample-10BT', help="sample-10BT, sample-100BT, sample-350BT or a CC dump")
parser.add_argument('--max_docs', type=int, default=None, help="stop after this many documents (a smaller corpus)")
parser.add_argument('--val_every', type=int, default=2000, help="every val_every-th document goes to val.bin")
parser.add_argument('--num_threads', type=int, default=8, help="tokenizing threads")
args = parser.parse_args()
if args.val_every < 2:
    fail(f"--val_every={args.val_every} would leave train.bin empty; use 2 or more")
if args.max_docs is not None and args.max_docs < 1:
    fail(f"--max_docs={args.max_docs} is not an integer >= 1 (leave it out for the whole subset)")
if args.num_threads < 1:
    fail(f"--num_threads={args.num_threads} is not an integer >= 1")

from datasets import load_dataset  # after the arguments: --help stays quick

try:
    records = load_dataset('HuggingFaceFW/fineweb-edu', name=args.subset, split='train', streaming=True)
    records = records.select_columns(['text'])
except OSError as e:
    fail(f"cannot open HuggingFaceFW/fineweb-edu ({args.subset}) on Hugging Face ({type(e).__name__}: {e})")
if args.max_docs is not None:
    records = itertools.islice(records, args.max_docs)
try:
    n_tokens = write_stream(records, os.path.dirname(os.path.abspath(__file__)), val_every=args.val_every,
                            num_threads=args.num_threads)
except OSError as e:
    fail(f"the stream from Hugging Face broke ({type(e).__name__}: {e}); run again to start over")
print(f"train.bin: {n_tokens['train']:,} tokens, val.bin: {n_tokens['val']:,} tokens")
