"""
What the prepare scripts share: GPT-2 BPE encoding, and writing token streams as train.bin / val.bin,
flat files of uint16 token ids that train.py memory-maps. Every file is written to a .tmp name first
and renamed when complete, so an interrupted run never leaves a truncated bin behind.
"""

import itertools
import os
import re
import sys

import numpy as np
from tqdm import tqdm


def fail(msg):
    sys.exit(f"{sys.argv[0]}: {msg}")


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except OSError as e:
        fail(f"cannot load GPT-2's BPE files ({type(e).__name__}); run once with network access, "
             f"or set TIKTOKEN_CACHE_DIR to a folder that holds them")


def check_vocab_fits(vocab_size):
    if vocab_size > 2 ** 16:
        fail(f"a vocabulary of {vocab_size:,} tokens has ids >= 65536, which uint16 bins cannot hold; "
             f"use fewer distinct tokens (e.g. GPT-2 BPE instead of --char)")


# a newline between two non-space characters: no GPT-2 pre-token crosses it, so text can be cut there
SAFE_CUT = re.compile(r'(?<=\S)\n(?=\S)')


def encode_text(text, enc, chunk_chars=1 << 20, num_threads=8):
    """GPT-2 BPE ids of text (no end-of-text token), as uint16. A long text is cut into pieces of about
    chunk_chars at SAFE_CUTs, so the ids are those of the whole text, and num_threads pieces at a time
    are encoded in parallel: memory holds python lists for those pieces only."""
    cuts = [0]
    while cuts[-1] < len(text):
        cut = SAFE_CUT.search(text, cuts[-1] + chunk_chars)
        cuts.append(cut.end() if cut else len(text))
    pieces = [text[start:end] for start, end in zip(cuts, cuts[1:])]
    arrays = [np.zeros(0, dtype=np.uint16)]
    for i in range(0, len(pieces), num_threads):
        for ids in enc.encode_ordinary_batch(pieces[i:i + num_threads], num_threads=num_threads):
            arrays.append(np.array(ids, dtype=np.uint16))
    return np.concatenate(arrays)


def write_bin(ids, path):
    """Write a 1-D array of token ids to path as uint16."""
    if len(ids) == 0:
        fail(f"no tokens to write to {path}: the input is empty or too short for this split")
    ids = np.asarray(ids)
    if ids.max() >= 2 ** 16:
        fail(f"token id {ids.max()} is >= 65536 and cannot be stored as uint16 in {path}")
    ids.astype(np.uint16).tofile(path + '.tmp')
    os.replace(path + '.tmp', path)


def write_dataset(dset, path, num_proc=8, batch_rows=1024):
    """Tokenize a datasets.Dataset with a 'text' column into path: for every document, in order, its
    GPT-2 BPE ids (encode_ordinary) then <|endoftext|>. Tokenizing runs in num_proc processes and keeps
    its uint16 results in the dataset's cache on disk; they are then appended to the file batch_rows
    documents at a time, so memory holds one batch whatever the corpus size. Returns the token count."""
    from datasets import Features, List, Value
    import pyarrow.compute as pc
    if len(dset) == 0:
        fail(f"empty input: no documents to write to {path}")
    enc = gpt2_encoding()
    check_vocab_fits(enc.n_vocab)

    def process(example):
        ids = enc.encode_ordinary(example['text'])
        ids.append(enc.eot_token)
        # as uint16 rather than a list: datasets holds 1000 results before writing them, lists take 20x the memory
        return {'ids': np.array(ids, dtype=np.uint16), 'len': len(ids)}

    tokenized = dset.map(process, remove_columns=dset.column_names, num_proc=num_proc,
                         features=Features({'ids': List(Value('uint16')), 'len': Value('int64')}),
                         desc=f"tokenizing {os.path.basename(path)}")
    tokenized = tokenized.with_format('arrow')  # batches as arrow tables: no conversion to python lists
    n_tokens = int(tokenized['len'].to_numpy().sum())
    with open(path + '.tmp', 'wb') as f:
        for batch in tqdm(tokenized.iter(batch_size=batch_rows), total=-(-len(dset) // batch_rows),
                          desc=f"writing {path}"):
            f.write(pc.list_flatten(batch['ids']).to_numpy().tobytes())
    os.replace(path + '.tmp', path)
    return n_tokens


def write_stream(records, out_dir, val_every=2000, num_threads=8, batch_docs=1024):
    """Tokenize an iterable of {'text': ...} records (e.g. a streaming dataset) into out_dir/train.bin
    and out_dir/val.bin, appending as it goes: every val_every-th document goes to val, the others to
    train, each followed by <|endoftext|>. Memory holds one batch of batch_docs documents."""
    enc = gpt2_encoding()
    check_vocab_fits(enc.n_vocab)
    paths = {split: os.path.join(out_dir, f'{split}.bin') for split in ('train', 'val')}
    n_tokens = {'train': 0, 'val': 0}
    records = iter(records)
    with open(paths['train'] + '.tmp', 'wb') as f_train, open(paths['val'] + '.tmp', 'wb') as f_val, \
            tqdm(unit=' docs', desc=f"tokenizing into {out_dir}") as bar:
        for first in itertools.count(0, batch_docs):
            texts = [record['text'] for record in itertools.islice(records, batch_docs)]
            if not texts:
                break
            split_ids = {'train': [], 'val': []}
            for i, ids in enumerate(enc.encode_ordinary_batch(texts, num_threads=num_threads), first):
                split_ids['val' if i % val_every == 0 else 'train'] += ids + [enc.eot_token]
            for split, f in (('train', f_train), ('val', f_val)):
                f.write(np.array(split_ids[split], dtype=np.uint16).tobytes())
                n_tokens[split] += len(split_ids[split])
            bar.update(len(texts))
            bar.set_postfix(train_tokens=f"{n_tokens['train']:,}", val_tokens=f"{n_tokens['val']:,}")
    if n_tokens['val'] == 0 or n_tokens['train'] == 0:
        for path in paths.values():
            os.remove(path + '.tmp')
        fail(f"empty input: no documents to write to {out_dir}" if n_tokens['val'] == 0 else
             f"only {bar.n} document(s), all in val (every {val_every}th goes there): train would be empty")
    for path in paths.values():
        os.replace(path + '.tmp', path)
    return n_tokens
