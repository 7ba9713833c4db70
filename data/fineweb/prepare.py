"""
FineWeb-Edu (HuggingFaceFW/fineweb-edu), educational web pages, in GPT-2 BPE, every document preceded by
<|endoftext|> (50256), as build-nanogpt trains on it; by default its sample-10BT subset (9,672,101
documents, about 10B tokens), streamed from Hugging Face, or read from a local copy (--local_dir: a
folder of parquet or jsonl files with a `text` column, such as
`hf download HuggingFaceFW/fineweb-edu --repo-type=dataset --include 'sample/10BT/*' --local-dir=DIR` leaves).
Every val_every-th document by index (the same documents every time) goes to val.bin, the others to
train.bin (~19 GB for the whole sample), next to this file.
It can be left running for hours: the documents are tokenized with every core, shard_docs at a time, and
each shard is written whole to shards/ and recorded in shards/manifest.json. Stopped in any way (Ctrl-C, a
dropped connection, a full disk, a reboot), the same command continues after the last shard written and
ends with the same train.bin and val.bin, byte for byte, as a run that was never stopped. The two replace the
dataset here together or not at all (token_bins.DatasetFiles).
"""
import argparse
import collections
import glob
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))  # data/: token_bins
sys.path.insert(0, os.path.dirname(os.path.dirname(here)))  # the repository: configurator

SAMPLE_DOCS = {'sample-10BT': 9_672_101}  # documents in the stream, for the progress bar's ETA

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--subset', default='sample-10BT', help="sample-10BT, sample-100BT, sample-350BT or a CC dump")
parser.add_argument('--local_dir', default=None, help="read this folder of parquet or jsonl files (a `text` column) "
                    "instead of streaming from Hugging Face")
parser.add_argument('--max_docs', type=int, default=None, help="stop after this many documents (a smaller corpus)")
parser.add_argument('--val_every', type=int, default=2000, help="every val_every-th document goes to val.bin")
parser.add_argument('--num_proc', '--num_threads', dest='num_proc', type=int, default=os.cpu_count() or 1,
                    help="tokenizing processes (default: every core)")
parser.add_argument('--shard_docs', type=int, default=50_000, help="documents per shard: at most this much work "
                    "is lost when a run stops")
parser.add_argument('--keep_shards', action='store_true', help="keep shards/ once train.bin and val.bin are written")
args = parser.parse_args()
from configurator import fail  # noqa: E402 (after the arguments: --help needs nothing else)
num_proc_flag = '--num_threads' if any(a.startswith('--num_threads') for a in sys.argv[1:]) else '--num_proc'
if args.val_every < 2:
    fail(f"--val_every={args.val_every} would leave train.bin empty; use 2 or more")
if args.max_docs is not None and args.max_docs < 1:
    fail(f"--max_docs={args.max_docs} is not an integer >= 1 (leave it out for the whole subset)")
if args.num_proc < 1:
    fail(f"{num_proc_flag}={args.num_proc} is not an integer >= 1")
if args.shard_docs < 1:
    fail(f"--shard_docs={args.shard_docs} is not an integer >= 1")

# the documents: their source, and how many there are (None: unknown until the end)
if args.local_dir is not None:
    if not os.path.isdir(args.local_dir):
        fail(f"--local_dir={args.local_dir} is not a folder; give the folder that holds the parquet or jsonl files")
    files = {kind: sorted(f for ext in exts for f in glob.glob(os.path.join(args.local_dir, '**', '*' + ext), recursive=True))
             for kind, exts in (('parquet', ['.parquet']), ('json', ['.jsonl', '.json', '.jsonl.gz', '.json.gz']))}
    if files['parquet'] and files['json']:
        fail(f"{args.local_dir} holds both parquet and jsonl files; point --local_dir at a folder of one kind")
    builder = 'parquet' if files['parquet'] else 'json'
    data_files = files[builder]
    if not data_files:
        fail(f"no .parquet or .jsonl files under {args.local_dir}")
    source = {'local_files': [os.path.relpath(f, args.local_dir) for f in data_files]}  # by name: a file whose download was finished later still counts
    source_name = args.local_dir
    n_source_docs = None
    if builder == 'parquet':
        import pyarrow.parquet as pq
        n_source_docs = 0
        for f in data_files:
            try:
                n_source_docs += pq.ParquetFile(f).metadata.num_rows
            except Exception as e:  # pyarrow's errors for a damaged file are of several types
                fail(f"cannot read {f} as parquet ({type(e).__name__}: {e}); download it again, or remove it")
else:
    source = {'dataset': 'HuggingFaceFW/fineweb-edu', 'subset': args.subset}
    source_name = f"HuggingFaceFW/fineweb-edu ({args.subset})"
    n_source_docs = SAMPLE_DOCS.get(args.subset)
total_docs = min(filter(None, (n_source_docs, args.max_docs)), default=None)

# the shards done so far: reused when they were made from the same documents with the same settings
shard_dir = os.path.join(here, 'shards')
manifest_path = os.path.join(shard_dir, 'manifest.json')
settings = {'source': source, 'val_every': args.val_every, 'shard_docs': args.shard_docs, 'encoding': 'gpt2',
            'endoftext': 'before each document'}
S = args.shard_docs


def shard_paths(k):
    return {split: os.path.join(shard_dir, f'{k:06d}_{split}.bin') for split in ('train', 'val')}


shards = []
if os.path.exists(manifest_path):
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        manifest_settings, manifest_shards = manifest['settings'], list(manifest['shards'])
        differ = ', '.join(k for k in settings if settings[k] != manifest_settings.get(k))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        fail(f"{manifest_path} is unreadable ({type(e).__name__}); delete {shard_dir} to start over")
    if differ:
        fail(f"{shard_dir} holds the shards of another prep (its {differ} differ); run that prep's command to "
             f"continue it, or delete {shard_dir} to start over")
    for k, shard in enumerate(manifest_shards):
        first = k * S
        if args.max_docs is not None and first >= args.max_docs:
            break
        wanted = S if args.max_docs is None else min(S, args.max_docs - first)
        try:
            whole = all(os.path.exists(p) and os.path.getsize(p) == 2 * shard[f'{split}_tokens'] for split, p in shard_paths(k).items())
            # a shard cut short by an earlier --max_docs is made again; one where the documents ended is the end
            if not whole or not (shard['docs'] == wanted or (shard['end'] and shard['docs'] < wanted)):
                break
            shard['stream_state']
        except (KeyError, TypeError):  # a hand-edited entry: the shards from it on are made again
            print(f"{manifest_path}: shard {k} is not as this script writes it; making it again from there")
            break
        shards.append(shard)
        if shard['end'] or shard['docs'] < S:
            break


def save_manifest():
    write_atomically(manifest_path, lambda f: f.write(json.dumps({'settings': settings, 'shards': shards}, indent=1).encode()))


def finished():
    docs = sum(shard['docs'] for shard in shards)
    return bool(shards) and (shards[-1]['end'] or shards[-1]['docs'] < S or docs == args.max_docs)


from files import os_error_text, write_atomically  # noqa: E402 (after the arguments: --help stays quick)
from token_bins import DatasetFiles, gpt2_encoding  # noqa: E402
import numpy as np  # noqa: E402

enc = gpt2_encoding()


def tokenize(batch):
    """(index of the first document, texts) -> (train, val) token ids as uint16 bytes, each document after <|endoftext|>."""
    first, texts = batch
    ids = {'train': [], 'val': []}
    for i, text in enumerate(texts, first):
        ids['val' if i % args.val_every == 0 else 'train'] += [enc.eot_token] + enc.encode_ordinary(text)
    return {split: np.array(split_ids, dtype=np.uint16).tobytes() for split, split_ids in ids.items()}


class StreamBroke(Exception):
    pass


if not finished():
    done_docs = len(shards) * S
    # the workers are forked before the dataset starts any threads; they leave Ctrl-C to this process
    pool = multiprocessing.get_context('fork').Pool(args.num_proc, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    # Ctrl-C (SIGINT) stops the shards' loop below even where a shell started this with SIGINT ignored (a
    # background job): the join at the end takes it too (token_bins.DatasetFiles), as train.py does
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from datasets import load_dataset
    try:
        if args.local_dir is not None:
            records = load_dataset(builder, data_files=data_files, split='train', streaming=True)
        else:
            records = load_dataset('HuggingFaceFW/fineweb-edu', name=args.subset, split='train', streaming=True)
    except Exception as e:  # offline, a misspelt subset, unreadable files: datasets raises many types
        pool.terminate()
        fail(f"cannot open {source_name} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
             f"{'; or read a local copy with --local_dir' if args.local_dir is None else ''}")
    if records.column_names is not None and 'text' not in records.column_names:
        pool.terminate()
        fail(f"the documents of {source_name} have no 'text' column (they have {', '.join(records.column_names)})")
    if records.column_names is not None:  # else known only once read
        records = records.select_columns(['text'])
    os.makedirs(shard_dir, exist_ok=True)
    print(f"{source_name}: {len(shards)} shard(s) of {S:,} documents already in {shard_dir}, continuing from document {done_docs:,}"
          if shards else f"{source_name}: tokenizing into {shard_dir}, {S:,} documents a shard, in {args.num_proc} process(es)")
    if shards:  # start after the last shard: the stream's own position, else by reading past the documents
        try:
            records.load_state_dict(shards[-1]['stream_state'])
        except Exception:  # a state from another version of datasets
            records = records.skip(done_docs)
    stream = iter(records)

    def stop(msg):
        """fail(msg), with the stream and the progress bar closed first: a generator left open complains while the
        interpreter shuts down, and a bar would be drawn after the message."""
        pool.terminate()
        if 'bar' in globals():
            bar.close()
        try:
            stream.close()
        except Exception:
            pass
        fail(msg)

    def file_at_fault():
        """The local file the stream was reading (its state names the file by index), or the folder."""
        state = records.state_dict()
        while isinstance(state, dict) and 'shard_idx' not in state:
            state = state.get('examples_iterable')
        index = state.get('shard_idx') if isinstance(state, dict) else None
        return data_files[index] if isinstance(index, int) and 0 <= index < len(data_files) else args.local_dir

    def read(n, first):
        try:
            texts = [record['text'] for record in itertools.islice(stream, n)]
        except KeyError:
            stop(f"the documents of {source_name} have no 'text' column")
        except Exception as e:  # a dropped connection surfaces as requests', aiohttp's or fsspec's errors
            text = (str(e).strip().splitlines() or [''])[0][:200]
            if args.local_dir is not None:  # a file that does not read now will not read on the next run either
                stop(f"cannot read {file_at_fault()} ({type(e).__name__}: {text}); repair, re-download or remove that "
                     f"file, then run the same command to continue ({len(shards)} shard(s) are kept in {shard_dir})")
            raise StreamBroke(f"{type(e).__name__}: {text}") from None
        if (bad := next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)) is not None:
            stop(f"document {first + bad:,} of {file_at_fault() if args.local_dir else source_name} has no text (its 'text' is {texts[bad]!r}, not a string); "
                 f"remove it or give it text")
        return texts

    from tqdm import tqdm
    bar = tqdm(total=total_docs, initial=done_docs, unit='doc', unit_scale=True, smoothing=0.1, dynamic_ncols=True,
               desc='fineweb', bar_format='{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} docs [{elapsed}<{remaining}, {rate_fmt}{postfix}]'
               if total_docs else None)
    count = {'tokens': sum(shard['train_tokens'] + shard['val_tokens'] for shard in shards), 'this_run': 0}
    t0 = time.time()

    def write(result, n_docs, shard, files):
        for split, f in files.items():
            f.write(result[split])
            shard[f'{split}_tokens'] += len(result[split]) // 2
            count['tokens'] += len(result[split]) // 2
            count['this_run'] += len(result[split]) // 2
        bar.update(n_docs)
        bar.set_postfix_str(f"{count['tokens']:,} tokens, {count['this_run'] / (time.time() - t0) / 1e6:.2f}M tokens/s", refresh=False)

    batch_docs = 256  # documents per task: enough to amortize sending them, few enough to keep every process busy
    k = len(shards)
    paths = shard_paths(k)
    try:
        while not finished():
            first, paths = k * S, shard_paths(k)
            wanted = S if args.max_docs is None else min(S, args.max_docs - first)
            shard = {'docs': 0, 'train_tokens': 0, 'val_tokens': 0, 'end': False}
            pending = collections.deque()
            with open(paths['train'] + '.tmp', 'wb') as f_train, open(paths['val'] + '.tmp', 'wb') as f_val:
                files = {'train': f_train, 'val': f_val}
                while shard['docs'] < wanted:
                    texts = read(min(batch_docs, wanted - shard['docs']), first + shard['docs'])
                    if not texts:
                        shard['end'] = True
                        break
                    pending.append((len(texts), pool.apply_async(tokenize, ((first + shard['docs'], texts),))))
                    shard['docs'] += len(texts)
                    # written in order; at most 2 tasks a process waiting, so memory holds a few batches, not the stream
                    while pending and (len(pending) > 2 * args.num_proc or pending[0][1].ready()):
                        n_docs, result = pending.popleft()
                        write(result.get(), n_docs, shard, files)
                for n_docs, result in pending:
                    write(result.get(), n_docs, shard, files)
                for f in files.values():
                    f.flush()
                    os.fsync(f.fileno())
            if shard['docs'] == 0:  # the documents ended with the previous shard
                for p in paths.values():
                    os.remove(p + '.tmp')
                if not shards:
                    stop(f"empty input: no documents in {source_name}")
                shards[-1]['end'] = True
            else:
                for p in paths.values():
                    os.replace(p + '.tmp', p)
                shard['stream_state'] = records.state_dict()  # where the next shard starts
                shards.append(shard)
            save_manifest()  # a shard counts as done once the manifest lists it
            k += 1
    except (KeyboardInterrupt, StreamBroke, OSError) as e:
        for p in paths.values():  # the shard in progress: this script's own partial file
            if os.path.exists(p + '.tmp'):
                os.remove(p + '.tmp')
        try:  # what the manifest on disk lists: a stop between a shard's rename and its manifest has one fewer
            with open(manifest_path) as f:
                done = len(json.load(f)['shards'])
        except (OSError, ValueError, KeyError):
            done = 0
        kept = f"{done} shard(s) ({done * S:,} documents) are kept in {shard_dir}"
        bar.close()
        if isinstance(e, KeyboardInterrupt):
            stop(f"interrupted; {kept}: run the same command to continue")
        if isinstance(e, StreamBroke):
            stop(f"reading {source_name} broke at shard {k} ({e}); {kept}: run the same command to continue")
        if e.errno == 28:  # ENOSPC
            stop(f"the disk is full (writing in {shard_dir}); {kept}: free some space and run the same command to continue")
        stop(f"cannot write shard {k} to {shard_dir} ({os_error_text(e)}); {kept}: run the same command to continue")
    bar.close()
    stream.close()
    pool.close()

# train.bin and val.bin: the shards, in order, each written whole under a temporary name and then renamed
n_tokens = {split: sum(shard[f'{split}_tokens'] for shard in shards) for split in ('train', 'val')}
n_docs = sum(shard['docs'] for shard in shards)
if n_tokens['train'] == 0:
    fail(f"only {n_docs} document(s), all in val (every {args.val_every}th goes there): train would be empty")


# train.bin and val.bin replace the dataset here together, or (a full disk, a signal, a kill) not at all
with DatasetFiles(here, kept=f"; the shards are kept in {shard_dir}: run the same command to write it") as dataset:
    for split in ('train', 'val'):
        for k in range(len(shards)):
            with open(shard_paths(k)[split], 'rb') as shard_file:
                while chunk := shard_file.read(1 << 24):
                    dataset.append(f'{split}.bin', chunk)
print(f"train.bin: {n_tokens['train']:,} tokens, val.bin: {n_tokens['val']:,} tokens, from {n_docs:,} documents")
if not args.keep_shards:
    try:
        shutil.rmtree(shard_dir)
        print(f"removed {shard_dir} (train.bin and val.bin hold it all; --keep_shards keeps it)")
    except OSError as e:  # e.g. shards/ is a mount point
        print(f"could not remove {shard_dir} ({type(e).__name__}: {e}); train.bin and val.bin hold it all")
