"""
A training run's directory and its life, for train.py: one run at a time in an out_dir, the run before it set
aside rather than deleted, a log that holds each iteration once, the data a checkpoint was trained on, and stop
requests (SIGTERM, SIGINT, SIGHUP, or torchrun gone) that every process honours at the same iteration.
"""
import json
import os
import shutil
import signal
import sys
import time

import torch

from files import os_error_text, same_vocabulary, write_atomically

PREVIOUS = 'previous'  # out_dir/previous/: the run a new one replaces, until the new one saves


def lock_out_dir(out_dir):
    """Makes out_dir and takes its lock for this process's lifetime (the kernel releases it however the process
    ends, kill -9 too). Returns the open lock file, to be kept. Raises ValueError when another live run holds it,
    OSError (one line, the cause) when out_dir cannot be made or written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, '.lock'), 'a+')
    except OSError as e:
        raise OSError(f"cannot use out_dir={out_dir}: {os_error_text(e)}; pass a writable --out_dir") from None
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are not guarded there
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or '?'
        raise ValueError(f"{out_dir} is in use by another run (pid {holder}): wait for it to end, "
                         f"or pass another --out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def data_record(dataset, meta):
    """What a checkpoint records of its data: the dataset's name and, for a character-level one, its whole
    vocabulary (meta.pkl's plain values), so that a resume or a sample on other data is caught and a model can
    be decoded without its meta.pkl."""
    return {'dataset': dataset, 'vocab_size': meta['vocab_size'] if meta else None, 'meta': meta}


def describe(record):
    vocab = f"a vocabulary of {record['vocab_size']} (meta.pkl)" if record['meta'] else "GPT-2's BPE (no meta.pkl)"
    return f"data/{record['dataset']} with {vocab}"


def check_same_vocabulary(checkpoint, ckpt_path, record, what):
    """Raises ValueError when the checkpoint was trained on a vocabulary other than record's; says in one line
    when only the dataset differs. Checkpoints from before this record pass."""
    old = checkpoint.get('data')
    if not old:
        return
    if not same_vocabulary(old.get('meta'), record['meta']):
        raise ValueError(f"{ckpt_path} was trained on {describe(old)}, but {describe(record)} is here: the vocabularies "
                         f"differ; {what} with --dataset={old['dataset']} (re-prepare it if it was replaced)")
    if old['dataset'] != record['dataset']:
        print(f"note: {ckpt_path} was trained on data/{old['dataset']}; going on with data/{record['dataset']} "
              f"(the same vocabulary)")


def check_resumable(checkpoint, ckpt_path, record):
    """Raises ValueError unless the checkpoint holds a training run that can go on with record's data."""
    if missing := [k for k in ('optimizer', 'iter_num', 'best_val_loss') if k not in checkpoint]:
        raise ValueError(f"{ckpt_path} has no {', '.join(missing)}: it holds a model but not a training run to "
                         f"resume; sample from it instead")
    check_same_vocabulary(checkpoint, ckpt_path, record, 'resume')


def trim_log(log_path, iter_num):
    """A resumed run trains again the iterations past its checkpoint: their records (and a half-written last
    line) are dropped from log_path, so that it holds each iteration once, in order."""
    if not os.path.exists(log_path):
        return
    with open(log_path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get('iter', record.get('step', -1)) >= iter_num:
            continue
        kept.append(line if line.endswith('\n') else line + '\n')
    if len(kept) != len(lines):
        write_atomically(log_path, lambda f: f.write(''.join(kept).encode()))
        print(f"{log_path}: {len(lines) - len(kept)} records past iter {iter_num} dropped (they are trained again now)")


def take_out_dir(out_dir, log_path, resumed, writes, iter_num):
    """Locks out_dir for this run (lock_out_dir; the lock file is returned, to be kept) and, for a run that writes,
    trims a resumed run's log to its checkpoint or sets aside the run a new one finds there."""
    lock = lock_out_dir(out_dir)
    if writes and resumed:
        trim_log(log_path, iter_num)  # the records past the checkpoint: trained again now
    elif writes:
        set_aside_previous_run(out_dir)
    return lock


_set_aside = []  # the out_dir/previous/ this process made


def set_aside_previous_run(out_dir):
    """A new run into an out_dir that holds one starts over there, as in nanoGPT, but its ckpt.pt and log.jsonl
    are moved to out_dir/previous/ (replacing an older one there) until the new run saves its first checkpoint."""
    names = [n for n in ('ckpt.pt', 'log.jsonl') if os.path.exists(os.path.join(out_dir, n))]
    if not names:
        return
    previous = os.path.join(out_dir, PREVIOUS)
    if os.path.isdir(previous):
        shutil.rmtree(previous)
    os.makedirs(previous)
    for name in names:
        os.replace(os.path.join(out_dir, name), os.path.join(previous, name))
    _set_aside.append(previous)
    print(f"{out_dir} held a run ({', '.join(names)}): this new run starts over there; the old files are kept in "
          f"{previous}/ until it saves its first checkpoint")


def forget_previous_run(out_dir):
    """After the new run's first checkpoint: the run it replaced is removed, and that is said."""
    while _set_aside:
        previous = _set_aside.pop()
        shutil.rmtree(previous, ignore_errors=True)
        print(f"removed {previous}/ (the run this one replaced)")


class StopRequest:
    """SIGTERM (Slurm, cloud preemption), SIGINT (Ctrl-C) and SIGHUP ask the run to stop after the current
    iteration, saved; a second one stops it at once (sys.exit: a checkpoint being written is removed, the one
    before it kept). Under torchrun the request is agreed between the processes at every iteration boundary,
    so a signal that reaches one of them stops all at the same iteration; a worker whose torchrun is gone
    (killed with -9) stops too, instead of training on as an orphan."""

    def __init__(self, ddp, device):
        self.ddp, self.device, self.why, self.when = ddp, device, None, 0.0
        self.parent = os.getppid()
        for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, 'SIGHUP', None)):
            if sig is not None:
                signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        # under torchrun a terminal's Ctrl-C reaches every process and torchrun then relays it: that copy is no second request
        if self.why and not (self.ddp and time.monotonic() - self.when < 3):
            sys.exit(f"train.py: stopped at once by a second {name}; the last checkpoint written is kept whole")
        adopted = self.why in (None, 'a stop request to another process')  # its own copy names it better
        self.why, self.when = name if adopted else self.why, time.monotonic()

    def requested(self):
        """Why the run should stop now (the same answer in every process), or None."""
        if self.ddp and not self.why and os.getppid() != self.parent:
            self.why = 'the end of torchrun (its process is gone)'
        if not self.ddp:
            return self.why
        flag = torch.tensor([1.0 if self.why else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not self.why:  # its own copy of the signal may still come: no second request either
            self.why, self.when = 'a stop request to another process', time.monotonic()
        return self.why


def name_ddp_failures(ddp_timeout, ckpt_path):
    """Under torchrun: a collective that times out or loses a peer ends the process with one line instead of a
    traceback (other errors keep theirs)."""
    def hook(kind, value, tb):
        text = str(value)
        if isinstance(value, RuntimeError) and any(s in text.lower() for s in ('timed out', 'timeout', 'connection closed',
                                                                              'connection reset', 'broken pipe')):
            print(f"train.py: another process did not answer within ddp_timeout={ddp_timeout}s or is gone "
                  f"({text.strip().splitlines()[0][:160]}); {ckpt_path} holds the last save: resume with "
                  f"--init_from=resume", file=sys.stderr)
            os._exit(1)
        sys.__excepthook__(kind, value, tb)
    sys.excepthook = hook


def start_wandb(project, name, config, run_id=None):
    """The run's Weights & Biases run (train.py's wandb_log=True). run_id: the one a resumed run's checkpoint saved,
    continued (resume='allow'), so that a run stopped and resumed any number of times is one run there. Without a
    login or a network it logs offline instead and says where, in one line (wandb sync uploads it later)."""
    try:
        import wandb
    except ImportError:
        sys.exit("train.py: wandb_log=True needs wandb (pip install wandb), or set wandb_log=False")
    args = dict(project=project, name=name, config=config, id=run_id, resume='allow')
    try:
        return wandb.init(**args)
    except wandb.errors.Error as e:  # no API key (wandb login), or no network
        run = wandb.init(**args, mode='offline')
        where = os.path.dirname(run.dir)
        print(f"wandb: {str(e).strip().splitlines()[0]} ({type(e).__name__}): logging offline to {where}; upload it "
              f"later with: wandb sync {where}")
        return run
