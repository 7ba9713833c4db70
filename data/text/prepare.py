"""
Your own text as a dataset: a UTF-8 file, or a folder of .txt files (searched recursively, read in
sorted order, each one a document). GPT-2 BPE by default, every document followed by <|endoftext|>;
with --char one token per character and meta.pkl holding the vocabulary. The first 90% of the token
stream is train.bin, the rest val.bin, written next to this file (or to --out_dir), replacing the
dataset there whole or, if the run fails or is stopped, not at all. Then:
    python train.py --dataset=text ...
"""
import argparse
import os
import sys

import numpy as np

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [root, os.path.join(root, 'data')]
from configurator import fail  # noqa: E402
from files import os_error_text  # noqa: E402
from token_bins import DatasetFiles, check_vocab_fits, encode_text, gpt2_encoding, read_text  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('input', help="a text file, or a folder of .txt files")
parser.add_argument('--char', action='store_true', help="character-level tokens instead of GPT-2 BPE")
parser.add_argument('--val_fraction', type=float, default=0.1, help="share of the tokens that go to val.bin")
parser.add_argument('--out_dir', default=here, help="where to write; train.py reads data/<dataset>/")
args = parser.parse_args()
if not 0 < args.val_fraction < 1:
    fail(f"--val_fraction={args.val_fraction} is not in (0, 1): it is the share of the tokens that go to val.bin")


def broken_link(path):
    return f"{path} is a link to {os.readlink(path)}, which does not exist; remove the link or restore its target"


def text_files(folder):
    """The .txt files under folder, all levels down, in sorted order, each file once. Links are followed,
    but a folder already searched is not searched again (a link to a folder above ends there) and a file
    reached by two paths is read once. A folder named *.txt is a folder: it is searched, like any other.
    Names starting with '.' are left out, as glob leaves them out."""
    def unreadable(e):
        fail(f"cannot read the folder {e.filename}: {os_error_text(e)}")
    paths, seen_folders = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_folders:
            dirnames[:] = []
            continue
        seen_folders.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        paths += [os.path.join(dirpath, name) for name in filenames if name.endswith('.txt') and not name.startswith('.')]
    files, seen_files = [], set()
    for path in sorted(paths):
        if not os.path.exists(path):
            fail(broken_link(path))
        if not os.path.isfile(path):
            fail(f"{path} is not a regular file (a pipe or a device?); remove it from {folder}")
        if os.path.realpath(path) not in seen_files:
            seen_files.add(os.path.realpath(path))
            files.append(path)
    return files


if os.path.isdir(args.input):
    files = text_files(args.input)
    if not files:
        fail(f"no .txt files in the folder {args.input}")
elif os.path.exists(args.input):  # a file, or a pipe (/dev/stdin) or device to read to its end
    files = [args.input]
elif os.path.islink(args.input):
    fail(broken_link(args.input))
else:
    fail(f"no file or folder {args.input}")
docs = [read_text(path) for path in files]
if not any(docs):
    fail(f"empty input: {args.input} holds no text")
if not any(doc.strip() for doc in docs):
    fail(f"empty input: {args.input} holds only whitespace")
print(f"read {sum(map(len, docs)):,} characters from {len(files)} file(s)")

# from here to the end of the block, train.bin, val.bin and meta.pkl are replaced together or not at all
with DatasetFiles(args.out_dir) as dataset:
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
    dataset.write_ids('train.bin', ids[:n_train])
    dataset.write_ids('val.bin', ids[n_train:])
    if args.char:
        # a BPE set leaves meta.pkl out: an old one goes (else train.py would take these ids for characters)
        dataset.write_pickle('meta.pkl', {'vocab_size': len(chars), 'itos': dict(enumerate(chars)),
                                          'stoi': {c: i for i, c in enumerate(chars)}})
