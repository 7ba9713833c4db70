"""
What the prepare scripts share: GPT-2 BPE encoding, and writing a dataset: train.bin / val.bin, flat
files of uint16 token ids that train.py memory-maps, and meta.pkl for a character vocabulary.
A dataset is replaced whole or not at all (DatasetFiles). The new files are written beside the old ones
under .tmp names and fsynced; then a journal (prepare.journal) lists them, they are renamed into place
(a moment: no reading, no writing) and the journal is removed. A run that fails, or is stopped by
SIGINT, SIGTERM or SIGHUP, before the journal is in place removes its .tmp files and leaves the old set
byte for byte; one stopped after it finishes the renames first. A run killed outright (kill -9, power
loss) leaves .tmp files, or a journal; the next prepare into that folder removes them (the old set
stays), or finishes the renames the journal lists (the new set goes in), before it does anything else; a
journal that is not one of ours (damaged, hand-edited) is set aside with the .tmp files, as the new set replaces
everything anyway. A set that holds train.bin and val.bin also holds bins.json (files.STAMP), their token counts,
so that train.py can tell a pair from two different prepares.
"""

import itertools
import json
import os
import pickle
import re
import signal
import sys
import threading

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from configurator import fail  # noqa: E402  (the one fail of the project; data scripts import it from there)
from files import STAMP, Busy, fsync_dir, lock_directory, os_error_text, write_atomically  # noqa: E402

DATASET_FILES = ('train.bin', 'val.bin', 'meta.pkl', STAMP)  # what train.py reads of data/<dataset>/
JOURNAL = 'prepare.journal'


def shown(path):
    """path as a user would type it: relative to the working directory when it lies under it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive, on Windows
        return path
    return path if relative.startswith('..') else relative


def read_text(path):
    """The UTF-8 text of path (a file, or a pipe such as /dev/stdin), or a one-line error naming it."""
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it, e.g. with iconv -f WINDOWS-1252 "
             f"-t UTF-8")
    except IsADirectoryError:
        fail(f"{path} is a folder, not a text file: move it away (the text belongs in a file of that name)")
    except OSError as e:
        fail(f"cannot read {path}: {os_error_text(e)}")


class Stopped(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived while a dataset was being written."""


class WriteFailed(Exception):
    def __init__(self, path, error):
        super().__init__(path, error)
        self.path, self.error = path, error


class DatasetFiles:
    """The files of one dataset in out_dir, written together and replacing the old set whole:
        with DatasetFiles(out_dir) as files:
            files.write_ids('train.bin', train_ids)
            files.write_ids('val.bin', val_ids)
            files.write_pickle('meta.pkl', meta)  # a BPE set leaves it out, and the old one is removed
    Every name in `replaces` that the block does not write is removed when the new set goes in. An error
    in the block, a full disk or a stop signal removes what was written and leaves the old set as it
    was; write errors and signals end the program with one line (`script: ...`), other errors propagate.
    Entering checks that out_dir can be written, locks it against a second prepare (flock: the kernel
    lets go when the process dies) and clears what a killed run left there (see the module's docstring)."""

    def __init__(self, out_dir, replaces=DATASET_FILES, kept=''):
        self.dir = out_dir
        self.replaces = tuple(replaces)
        self.tmp = {}    # name -> its .tmp path, registered before the file is created
        self.files = {}  # name -> open file
        self.state = 'idle'
        self.pending = None  # a stop signal that came while committing or cleaning up
        self.tokens = {}  # name -> uint16 tokens written
        self.kept = kept  # said after 'the dataset there is unchanged' (fineweb: its shards are kept)

    def path(self, name):
        return os.path.join(self.dir, name)

    # -- entering: the folder, its lock, what a killed run left, the signals

    def __enter__(self):
        where = shown(self.dir)
        self.created = not os.path.lexists(self.dir)
        try:
            os.makedirs(self.dir, exist_ok=True)
        except FileExistsError:
            fail(f"cannot write the dataset to {where}: it is a file, not a folder")
        except OSError as e:
            fail(f"cannot create {where}: {os_error_text(e)}")
        if hasattr(os, 'statvfs') and os.statvfs(self.dir).f_flag & os.ST_RDONLY:
            fail(f"cannot write to {where}: read-only file system; the dataset there is unchanged")
        if not os.access(self.dir, os.W_OK):
            fail(f"cannot write to {where}: permission denied; the dataset there is unchanged")
        try:
            self.lock_fd = lock_directory(self.dir)
        except Busy:
            fail(f"another prepare is writing the dataset in {where} now; wait for it to end (or write elsewhere)")
        except OSError as e:
            fail(f"cannot write to {where}: {os_error_text(e)}")
        try:
            self.repair()
        except OSError as e:
            fail(f"cannot clear what a killed prepare left in {where} ({os_error_text(e)}); see {JOURNAL} and the .tmp "
                 f"files there")
        self.pid = os.getpid()
        self.handlers = {}
        if threading.current_thread() is threading.main_thread():
            for name in ('SIGINT', 'SIGTERM', 'SIGHUP'):
                if hasattr(signal, name):
                    signum = getattr(signal, name)
                    self.handlers[signum] = signal.signal(signum, self.on_signal)
        self.state = 'writing'
        return self

    def repair(self):
        """Finish the renames of a run killed while committing, or remove the .tmp files of one killed before."""
        journal = self.path(JOURNAL)
        plan = None
        if os.path.lexists(journal):
            try:
                with open(journal, encoding='utf-8') as f:
                    plan = json.load(f)
                assert all(isinstance(n, str) and n in DATASET_FILES + self.replaces for k in ('replace', 'remove') for n in plan[k])
            except (OSError, ValueError, KeyError, TypeError, AssertionError):  # written atomically: not ours, or damaged
                os.replace(journal, journal + '.damaged')
                print(f"{shown(self.dir)}: {JOURNAL} is not a journal this script wrote; moved it to {JOURNAL}.damaged "
                      f"(the dataset there is replaced whole now)")
                plan = None
        if plan is not None:
            for name in plan['replace']:
                if os.path.exists(self.path(name) + '.tmp'):
                    os.replace(self.path(name) + '.tmp', self.path(name))
            for name in plan['remove']:
                if os.path.lexists(self.path(name)):
                    os.remove(self.path(name))
            fsync_dir(self.dir)
            os.remove(journal)
            fsync_dir(self.dir)
            print(f"{shown(self.dir)}: put in place the dataset ({', '.join(plan['replace'])}) that a killed "
                  f"prepare had written in full but not yet renamed")
        left = [name + '.tmp' for name in dict.fromkeys(DATASET_FILES + self.replaces + (JOURNAL,))
                if os.path.lexists(self.path(name + '.tmp'))]
        for name in left:
            os.remove(self.path(name))
        if left:
            print(f"{shown(self.dir)}: removed {', '.join(left)}, left by a prepare that was killed while writing")

    def on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if os.getpid() != self.pid:  # a forked worker (datasets' map): end as it would have without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.state == 'writing':
            self.state = 'stopping'
            raise Stopped(name)
        self.pending = self.pending or name  # committing or cleaning up: that ends first

    # -- writing

    def append(self, name, data):
        """Add data (bytes, or an array of token ids, stored as uint16) to the end of name's new content."""
        if name not in self.files:
            self.tmp[name] = self.path(name) + '.tmp'
            try:
                self.files[name] = open(self.tmp[name], 'wb', buffering=0)
            except OSError as e:
                raise WriteFailed(self.path(name), e) from None
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data, dtype=np.uint16)
        view = memoryview(data).cast('B')
        self.tokens[name] = self.tokens.get(name, 0) + view.nbytes // 2
        try:
            while view:
                view = view[self.files[name].write(view):]
        except OSError as e:
            raise WriteFailed(self.path(name), e) from None

    def write_ids(self, name, ids):
        """name's new content: a 1-D array of token ids, as uint16."""
        ids = np.asarray(ids)
        if len(ids) == 0:
            fail(f"no tokens to write to {shown(self.path(name))}: the input is empty or too short for this split")
        if ids.max() >= 2 ** 16:
            fail(f"token id {ids.max()} is >= 65536 and cannot be stored as uint16 in {shown(self.path(name))}")
        self.append(name, ids)

    def write_pickle(self, name, obj):
        self.append(name, pickle.dumps(obj))

    # -- leaving: commit, or discard

    def __exit__(self, kind, error, tb):
        try:
            if kind is None:
                try:
                    if 'train.bin' in self.files and 'val.bin' in self.files:  # their stamp, one of the set
                        self.append(STAMP, json.dumps({'prepare': shown(os.path.abspath(sys.argv[0])), 'train.bin':
                                    self.tokens['train.bin'], 'val.bin': self.tokens['val.bin']}).encode())
                    for name, f in self.files.items():
                        try:
                            os.fsync(f.fileno())
                        except OSError as e:
                            raise WriteFailed(self.path(name), e) from None
                except (WriteFailed, Stopped) as e:
                    error = e
                else:
                    error = self.commit()
            if error is not None:
                self.discard()
        finally:
            for signum, handler in self.handlers.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            if self.lock_fd is not None:
                os.close(self.lock_fd)  # and with it the lock
        where = shown(self.dir)
        if isinstance(error, WriteFailed):
            fail(f"cannot write {shown(error.path)}: {os_error_text(error.error)}; the dataset in {where} is unchanged"
                 f"{self.kept}")
        if isinstance(error, Stopped):
            fail(f"stopped by {error} before the new dataset was complete; the dataset in {where} is unchanged{self.kept}")
        if self.pending:
            fail(f"stopped by {self.pending} once the new dataset was in place in {where}")
        return False  # any other error goes on (a fail in the block: its one line)

    def commit(self):
        """Put the new set in place (or return the WriteFailed that stopped it before the journal)."""
        self.state = 'committing'
        for f in self.files.values():
            f.close()
        plan = {'replace': list(self.tmp), 'remove': [name for name in self.replaces if name not in self.tmp]}
        journal = self.path(JOURNAL)
        self.tmp[JOURNAL] = journal + '.tmp'
        try:
            write_atomically(journal, lambda f: f.write(json.dumps(plan).encode()))
        except OSError as e:
            return WriteFailed(journal, e)
        # from here the new set is whole on disk: a failure is finished by the next run's repair
        del self.tmp[JOURNAL]
        removed = [name for name in plan['remove'] if os.path.lexists(self.path(name))]
        try:
            for name in plan['replace']:
                os.replace(self.tmp[name], self.path(name))
            for name in removed:
                os.remove(self.path(name))
            fsync_dir(self.dir)
            os.remove(journal)
            fsync_dir(self.dir)
        except OSError as e:
            fail(f"cannot rename the new dataset into place in {shown(self.dir)} ({os_error_text(e)}); it is complete, "
                 f"and the next prepare into that folder puts it in place before anything else")
        for name in removed:
            print(f"removed {shown(self.path(name))}: it belonged to the dataset this one replaces")
        self.state = 'done'
        return None

    def discard(self):
        """Remove what was written, leaving the old set as it was."""
        self.state = 'discarding'
        for f in self.files.values():
            f.close()
        for tmp in self.tmp.values():
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
        if self.created:
            try:
                os.rmdir(self.dir)  # only when empty
            except OSError:
                pass


def gpt2_encoding():
    """tiktoken's GPT-2 BPE, the one every script uses; without its files (downloaded once into tiktoken's cache,
    or TIKTOKEN_CACHE_DIR) and without network access, a one-line error."""
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


def write_dataset(dset, path, num_proc=8, batch_rows=1024, files=None):
    """Tokenize a datasets.Dataset with a 'text' column into path: for every document, in order, its
    GPT-2 BPE ids (encode_ordinary) then <|endoftext|>. Tokenizing runs in num_proc processes and keeps
    its uint16 results in the dataset's cache on disk; they are then appended to the file batch_rows
    documents at a time, so memory holds one batch whatever the corpus size. With files (an open
    DatasetFiles of path's folder) the file is one of that set; without, it is replaced alone.
    Returns the token count."""
    if files is None:  # one file alone: the pair's stamp no longer holds
        with DatasetFiles(os.path.dirname(path) or '.', replaces=(os.path.basename(path), STAMP)) as files:
            return write_dataset(dset, path, num_proc, batch_rows, files)
    from datasets import Features, List, Value
    import pyarrow.compute as pc
    if len(dset) == 0:
        fail(f"empty input: no documents to write to {shown(path)}")
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
    for batch in tqdm(tokenized.iter(batch_size=batch_rows), total=-(-len(dset) // batch_rows),
                      desc=f"writing {shown(path)}"):
        files.append(os.path.basename(path), pc.list_flatten(batch['ids']).to_numpy())
    return n_tokens


def write_stream(records, out_dir, val_every=2000, num_threads=8, batch_docs=1024):
    """Tokenize an iterable of {'text': ...} records (e.g. a streaming dataset) into out_dir/train.bin
    and out_dir/val.bin, appending as it goes: every val_every-th document goes to val, the others to
    train, each followed by <|endoftext|>. Memory holds one batch of batch_docs documents. The two
    replace out_dir's dataset whole (an old meta.pkl is removed) once the stream has ended."""
    enc = gpt2_encoding()
    check_vocab_fits(enc.n_vocab)
    n_tokens = {'train': 0, 'val': 0}
    records = iter(records)
    with DatasetFiles(out_dir) as files, tqdm(unit=' docs', desc=f"tokenizing into {shown(out_dir)}") as bar:
        for first in itertools.count(0, batch_docs):
            texts = [record['text'] for record in itertools.islice(records, batch_docs)]
            if not texts:
                break
            split_ids = {'train': [], 'val': []}
            for i, ids in enumerate(enc.encode_ordinary_batch(texts, num_threads=num_threads), first):
                split_ids['val' if i % val_every == 0 else 'train'] += ids + [enc.eot_token]
            for split in ('train', 'val'):
                files.append(f'{split}.bin', np.array(split_ids[split], dtype=np.uint16))
                n_tokens[split] += len(split_ids[split])
            bar.update(len(texts))
            bar.set_postfix(train_tokens=f"{n_tokens['train']:,}", val_tokens=f"{n_tokens['val']:,}")
        if n_tokens['val'] == 0 or n_tokens['train'] == 0:
            fail(f"empty input: no documents to write to {shown(out_dir)}" if n_tokens['val'] == 0 else
                 f"only {bar.n} document(s), all in val (every {val_every}th goes there): train would be empty")
    return n_tokens
