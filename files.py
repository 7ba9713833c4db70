"""
The project's files, read and written safely, in one place: checkpoints (ckpt.pt), a dataset's vocabulary
(meta.pkl) and token bins (train.bin, val.bin), and the three things every writer here shares: one atomic
write (a temporary file, synced, then renamed over the old one, so a crash, a kill or a full disk leaves the
previous file whole), one lock on a directory, and one way to say an OSError. Reads run no code from the
file (torch.load(weights_only=True), a pickle reader of plain values). Errors are ValueErrors or OSErrors
whose text is one line naming the file and the fix, for the scripts' fail(). torch is imported only where a
checkpoint is read or written: the data scripts use this file too.
"""
import json
import os
import pickle

import numpy as np

STAMP = 'bins.json'  # beside train.bin and val.bin: the token counts of the pair one prepare wrote together


def os_error_text(e):
    """An OSError in a few words: 'no space left on device', 'read-only file system', 'permission denied'."""
    if not isinstance(e, OSError):
        return str(e)
    return (e.strerror or (os.strerror(e.errno) if e.errno else '') or str(e)).lower()


def fsync_dir(path):
    """Make the renames in a folder durable (POSIX; Windows has no handles on folders to do it with)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path, write):
    """write(f) into path + '.tmp', synced, then renamed over path (and the rename synced). On any failure
    (a full disk, an unwritable directory, Ctrl-C) the temporary file is removed, path is left as it was, and
    the OSError (or the interrupt) goes on up."""
    tmp_path = path + '.tmp'
    try:
        with open(tmp_path, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.remove(tmp_path)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(path) or '.')


class Busy(Exception):
    """lock_directory's: another live process holds the lock; .pid is its process id ('?' when unknown)."""
    def __init__(self, pid):
        super().__init__(pid)
        self.pid = pid


def lock_directory(directory, pid_file=None):
    """Takes an exclusive lock on directory (flock on the folder itself) for as long as the returned handle is kept
    open, or the process lives: the kernel lets go however it ends, kill -9 too. pid_file: a file in directory that
    records the holder's pid, for the message of the next one. Raises Busy when another live process holds it
    (.pid from pid_file, else '?'), OSError when directory cannot be opened. Windows has no advisory locks:
    nothing is guarded there (None is returned)."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        try:
            with open(os.path.join(directory, pid_file)) as f:
                holder = f.read().strip() or '?'
        except (OSError, TypeError):
            holder = '?'
        raise Busy(holder) from None
    if pid_file:
        with open(os.path.join(directory, pid_file), 'w') as f:
            f.write(f"{os.getpid()}\n")
    return fd


def count_nonfinite(checkpoint):
    """How many values of the checkpoint's weights and optimizer state are nan or inf."""
    import torch
    tensors = list(checkpoint['model'].values())
    for state in checkpoint.get('optimizer', {}).get('state', {}).values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


def write_checkpoint(checkpoint, path):
    """torch.save(checkpoint) to path, whole or not at all (write_atomically). Raises OSError saying why, in one
    line, when it cannot be written, and ValueError, writing nothing, when a weight is nan or inf: a checkpoint
    is never one of a diverged model, whatever asked for it (an evaluation, the end, a stop signal)."""
    import torch
    if bad := count_nonfinite(checkpoint):
        raise ValueError(f"not saved to {path}: {bad:,} of the weights and optimizer values are nan or inf at iter "
                         f"{checkpoint.get('iter_num')} (the training diverged)")
    try:
        write_atomically(path, lambda f: torch.save(checkpoint, f))
    except RuntimeError as e:  # torch.save reports a failed write as RuntimeError; the OSError behind it says why
        cause = e.__cause__ or e.__context__
        if isinstance(cause, (SystemExit, KeyboardInterrupt)):  # a stop at once (a second signal) during the save
            raise cause from None
        raise OSError(f"cannot write {path}: {os_error_text(cause) if cause else str(e).splitlines()[0]}") from None
    except OSError as e:
        raise OSError(f"cannot write {path}: {os_error_text(e)}") from None


def load_checkpoint(out_dir, device='cpu', override_args=None):
    """The GPT saved in out_dir/ckpt.pt (ours or the original nanoGPT's) and the checkpoint dict. weights_only=True
    refuses a checkpoint that holds anything but tensors and plain values. override_args: GPTConfig fields that
    leave the weights' shapes alone (dropout, flash_attn) to take over the checkpoint's. Raises ValueError saying
    what is wrong: no ckpt.pt (and where a run set aside is), a damaged or unsafe file, or another model's."""
    import torch
    from model import GPT, GPTConfig, clean_state_dict
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        for kept in ('previous', 'previous.moving'):  # runs.py's: a run set aside, or one whose setting aside was cut
            if os.path.isfile(os.path.join(out_dir, kept, 'ckpt.pt')):
                raise ValueError(f"no checkpoint {ckpt_path}, but {os.path.join(out_dir, kept, 'ckpt.pt')} holds the run "
                                 f"that a new run into {out_dir} set aside: to go on with it, move it back "
                                 f"(mv {os.path.join(out_dir, kept)}/* {out_dir}/)")
        raise ValueError(f"no checkpoint {ckpt_path}: train one first (python train.py --out_dir={out_dir} ...), "
                         f"or pass --out_dir=<the run's directory>")
    if os.path.getsize(ckpt_path) == 0:
        raise ValueError(f"{ckpt_path} is empty (0 bytes: not a checkpoint, or one whose copy was cut short); "
                         f"copy it again, or pass --out_dir=<the run's directory>")
    try:
        checkpoint = torch.load(ckpt_path, map_location=device, weights_only=True)
        assert isinstance(checkpoint, dict), "not a dict"
    except Exception as e:  # weights_only refuses anything but tensors and plain values; or a damaged file
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot load {ckpt_path} safely ({text}); only whole checkpoints of tensors and "
                         f"plain values load: copy it again, or pass --out_dir=<the run's directory>") from None
    try:
        model_args = {**checkpoint['model_args'], **(override_args or {})}
        # older checkpoints have no gelu: ours (with an alibi key) used GPT-2's tanh GELU, nanoGPT's the exact one
        model_args.setdefault('gelu', 'tanh' if 'alibi' in checkpoint['model_args'] else 'erf')
        model = GPT(GPTConfig(**model_args))  # nanoGPT's lack flash_attn and alibi: the defaults match
        model.load_state_dict(clean_state_dict(checkpoint['model']))
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{ckpt_path} is not a checkpoint of this model.py ({str(e).strip().splitlines()[0]})") from None
    return model, checkpoint


def load_pretrained_embeddings(data_dir, n_embd):
    """data_dir/pretrained_embeddings.pt, a [vocab, D] matrix, fitted to n_embd (model.fit_pretrained_embeddings).
    Raises ValueError naming the script that makes it when it is missing or not a matrix."""
    import torch
    from model import fit_pretrained_embeddings
    path = os.path.join(data_dir, 'pretrained_embeddings.pt')
    if not os.path.exists(path):
        raise ValueError(f"pretrained_embeddings=True but there is no {path}: build it with "
                         f"python data/openwebtext/pretrained_embeddings.py")
    try:
        embeddings = torch.load(path, weights_only=True)
        assert isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2
    except Exception:
        raise ValueError(f"{path} is not a [vocab, width] tensor: re-create it with "
                         f"python data/openwebtext/pretrained_embeddings.py") from None
    print(f"token embeddings start from {path}")
    return fit_pretrained_embeddings(embeddings, n_embd)


class PlainUnpickler(pickle.Unpickler):
    """Unpickles plain dicts, lists, tuples, strings and numbers only. Anything else in a pickle is a
    reference to a class or function, which unpickling would call: a meta.pkl from the internet could run code."""
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")


def load_meta(path):
    """A dataset's meta.pkl (nanoGPT's {'vocab_size', 'itos', 'stoi'}), read without running any code.
    Raises ValueError when the file holds anything but plain values."""
    try:
        with open(path, 'rb') as f:
            meta = PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path} is not a plain vocabulary pickle ({e}); refusing to load it: re-create it with "
                         f"the dataset's prepare.py") from None
    if not isinstance(meta, dict) or not isinstance(meta.get('vocab_size'), int):
        raise ValueError(f"{path} has no 'vocab_size': re-create it with the dataset's prepare.py")
    return meta


def dataset_dir(dataset):
    """data/<dataset>, as nanoGPT: under the current directory; where that has none, the repository's own (a script
    run from elsewhere, python /path/to/repo/train.py, as Slurm scripts do: the prepares write there)."""
    here, repo = os.path.join('data', dataset), os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
    return here if os.path.isdir(here) or not os.path.isdir(repo) else repo


def run_vocabulary(checkpoint, ckpt_path, meta_path=None):
    """The character vocabulary (meta.pkl's plain values) a model decodes with, the meta.pkl looked for (default:
    that of the dataset the checkpoint was trained on) and whether the vocabulary came from it: the file where it
    exists (it must be the one the checkpoint records, if it records one), else the checkpoint's record; None for
    GPT-2's BPE. Raises ValueError for a meta.pkl that is unsafe or another vocabulary than the checkpoint's."""
    dataset = (checkpoint.get('config') or {}).get('dataset')
    meta_path = meta_path or (os.path.join(dataset_dir(dataset), 'meta.pkl') if dataset else None)
    recorded = (checkpoint.get('data') or {}).get('meta')
    if not (meta_path and os.path.isfile(meta_path)):
        return recorded, meta_path, False
    found = load_meta(meta_path)
    if recorded and not same_vocabulary(found, recorded):
        raise ValueError(f"{meta_path} is not the vocabulary {ckpt_path} was trained with (the dataset was re-prepared "
                         f"from other text?): put the run's meta.pkl back, or move it aside to use the vocabulary "
                         f"the checkpoint records")
    return found, meta_path, True


def same_vocabulary(a, b):
    """Whether two meta.pkl vocabularies (or None: GPT-2's BPE) are the same: the size, and the characters where
    both list them."""
    if a is None or b is None:
        return a is b
    return a['vocab_size'] == b['vocab_size'] and (a.get('itos') == b.get('itos') or not (a.get('itos') and b.get('itos')))


def open_bin(path, min_tokens=1):
    """The uint16 token ids of a train.bin or val.bin, memory-mapped (nothing is read yet). Raises ValueError,
    naming the file and its prepare.py, when it is missing, not whole uint16 tokens, or shorter than min_tokens."""
    prepare = os.path.join(os.path.dirname(path), 'prepare.py')
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ValueError(f"no {path}: run python {prepare} first") from None
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file (a folder?): move it away and run python {prepare}")
    if size % 2:
        raise ValueError(f"{path} has an odd number of bytes, not whole uint16 tokens (cut short?): "
                         f"re-create it with python {prepare}")
    if size // 2 < min_tokens:
        raise ValueError(f"{path} has only {size // 2} tokens, too few for windows of {min_tokens}: "
                         f"use a smaller block_size or more data")
    return np.memmap(path, dtype=np.uint16, mode='r') if size else np.zeros(0, dtype=np.uint16)


def check_token_ids(top, vocab_size, path):
    """A bin's largest token id must be below the model's vocab_size: else the data and the vocabulary (meta.pkl,
    or the checkpoint's) are not the same dataset's. Raises ValueError naming both."""
    if top >= vocab_size:
        raise ValueError(f"{path} holds token id {top}, past the model's vocab_size {vocab_size}: the data and the "
                         f"vocabulary (meta.pkl, or the checkpoint's) do not match; re-create it with its prepare.py, "
                         f"or pass the dataset the model was trained on")


def check_one_prepare(data_dir, tokens):
    """train.bin and val.bin must be the pair one prepare wrote together: its STAMP records their token counts.
    tokens: {'train': n, 'val': n}, as found. Exactly one of them changed means a pair from two prepares: raises
    ValueError. Both changed: another prepare (nanoGPT's, which writes no stamp) wrote them both; no stamp: bins
    from before it. Those pass."""
    path = os.path.join(data_dir, STAMP)
    try:
        with open(path, encoding='utf-8') as f:
            stamp = json.load(f)
        wrote = {split: int(stamp[f'{split}.bin']) for split in tokens}
    except (OSError, ValueError, KeyError, TypeError):
        return
    changed = [split for split in tokens if tokens[split] != wrote[split]]
    if len(changed) == 1:
        split, other = changed[0], next(s for s in tokens if s != changed[0])
        prepare = stamp.get('prepare') or os.path.join(data_dir, 'prepare.py')
        raise ValueError(f"{os.path.join(data_dir, split + '.bin')} has {tokens[split]:,} tokens, but the prepare that "
                         f"wrote the {other}.bin beside it wrote {wrote[split]:,} ({path}): the two files are from "
                         f"different prepares; run python {prepare} again")
