"""
A training run's directory and its life, for train.py: one run at a time in an out_dir, the run before it set
aside rather than deleted, its log and checkpoint writes (RunFiles), a log that holds each iteration once, the data a checkpoint was trained on, and stop
requests (SIGTERM, SIGINT, SIGHUP, or torchrun gone) that every process honours at the same iteration.
torch is imported where it is used: the run directory's steps run (and are tested) without it.
"""
import json
import math
import os
import re
import signal
import sys
import time
from datetime import timedelta

from configurator import fail
from files import Busy, fsync_dir, lock_directory, os_error_text, same_vocabulary, write_atomically, write_checkpoint

PREVIOUS = 'previous'  # out_dir/previous/: the last complete run, kept while a new one has not saved at an evaluation
MOVING = 'previous.moving'  # run files on their way back to out_dir (a setting aside cut short is undone from here)
DROPPING = 'previous.dropping'  # a previous/ being removed, once a new run saved a complete checkpoint
RUN_FILES = ('ckpt.pt', 'log.jsonl', 'loss.png')  # a run's own files in out_dir, set aside together


def lock_out_dir(out_dir):
    """Makes out_dir and takes its lock for this process's lifetime (files.lock_directory). Returns the lock, to be
    kept. Raises ValueError when another live run holds it, OSError (one line, the cause) when
    out_dir cannot be made or written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        return lock_directory(out_dir, pid_file='.lock')
    except Busy as e:
        raise ValueError(f"{out_dir} is in use by another run (pid {e.pid}): wait for it to end, "
                         f"or pass another --out_dir") from None
    except OSError as e:
        raise OSError(f"cannot use out_dir={out_dir}: {os_error_text(e)}; pass a writable --out_dir") from None


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


def check_resumable(checkpoint, ckpt_path, record, config=None):
    """Raises ValueError unless the checkpoint holds a training run that can go on with record's data; says in one
    line which settings differ from the run's own (note_changed_settings)."""
    if missing := [k for k in ('optimizer', 'iter_num', 'best_val_loss') if k not in checkpoint]:
        raise ValueError(f"{ckpt_path} has no {', '.join(missing)}: it holds a model but not a training run to "
                         f"resume; sample from it instead")
    check_same_vocabulary(checkpoint, ckpt_path, record, 'resume')
    if config:
        note_changed_settings(checkpoint, config, ckpt_path)


def trim_log(log_path, iter_num):
    """A resumed run trains again the iterations past its checkpoint: their records (and a half-written last
    line) are dropped from log_path, so that it holds each iteration once, in order. Lines that are not our
    records (hand-written, not JSON, not UTF-8) are kept as they are."""
    if not os.path.exists(log_path):
        return
    try:
        with open(log_path, 'rb') as f:
            lines = f.read().splitlines(keepends=True)
    except OSError as e:
        raise OSError(f"cannot read {log_path}: {os_error_text(e)}") from None
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            if not line.endswith(b'\n'):
                continue  # a half-written last line
            record = None
        at = record.get('iter', record.get('step')) if isinstance(record, dict) else None
        if isinstance(at, (int, float)) and not isinstance(at, bool) and at >= iter_num:
            continue
        kept.append(line if line.endswith(b'\n') else line + b'\n')
    if len(kept) != len(lines):
        write_atomically(log_path, lambda f: f.write(b''.join(kept)))
        print(f"{log_path}: {len(lines) - len(kept)} records past iter {iter_num} dropped (they are trained again now)")


RUN_SETTINGS_ONLY = {'init_from', 'max_iters', 'eval_only', 'out_dir', 'device', 'dtype', 'compile', 'backend',
                     'ddp_timeout', 'measure_energy', 'wandb_log', 'wandb_project', 'wandb_run_name', 'log_interval',
                     'flash_attn', 'chunked_loss', 'hellaswag_file',  # how a run runs, not what it trains
                     'n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'alibi', 'gelu'}  # the checkpoint's, said apart


def note_changed_settings(checkpoint, config, ckpt_path):
    """A resume takes its settings from the command line and config file, as nanoGPT: said in one line when
    training settings differ from those the checkpoint's run recorded (a config file left out, say)."""
    old = checkpoint.get('config')
    if not isinstance(old, dict):
        return
    changed = [f"{k}={config[k]!r} (it had {old[k]!r})" for k in config
               if k in old and k not in RUN_SETTINGS_ONLY and old[k] != config[k]]
    if changed:
        print(f"note: resuming with settings other than those {ckpt_path}'s run trained with: {', '.join(changed)}; "
              f"pass the run's config file (and overrides) to go on as it did")


def take_out_dir(out_dir, log_path, resumed, writes, iter_num):
    """Locks out_dir for this run (lock_out_dir; the lock file is returned, to be kept), finishes what a killed run
    left half done there, and, for a run that writes, trims a resumed run's log to its checkpoint or sets aside
    the run a new one finds there. Stops with one line (fail) when it cannot."""
    try:
        lock = lock_out_dir(out_dir)
        if writes:
            recover(out_dir)
        if writes and resumed:
            trim_log(log_path, iter_num)  # the records past the checkpoint: trained again now
        elif writes:
            set_aside_previous_run(out_dir)
    except (OSError, ValueError) as e:
        fail(e if isinstance(e, ValueError) or e.errno is None else  # ours, already one line
             f"cannot ready {out_dir} for this run: {os_error_text(e)} ({e.filename}); its files are as they were: free the "
             f"disk or make it writable")
    return lock


# A new run into an out_dir that holds one starts over there, as in nanoGPT, but the old run is moved to
# out_dir/previous/ and stays there until the new run saves a complete checkpoint: one written at an evaluation
# or at the end, not by a stop signal. Every step is a rename, and one killed between any two is undone or
# finished by the next run into out_dir (recover): files under MOVING go back to out_dir, DROPPING is removed.
# So kill -9 anywhere, a crash or a stop at any moment leaves the last complete run in out_dir or in previous/.

def _paths(directory):
    return [os.path.join(directory, n) for n in RUN_FILES if os.path.lexists(os.path.join(directory, n))]


def _check_only_ours(directory):
    """Raises OSError (one line) when directory holds files other than run files: the user's, not ours to move."""
    if theirs := sorted(set(os.listdir(directory)) - set(RUN_FILES)):
        raise OSError(f"{directory}/ holds files train.py did not put there ({', '.join(theirs)}): move them out of "
                      f"{os.path.dirname(directory) or '.'}/, or pass another --out_dir")


def _remove_dir(directory):
    """Removes directory/, which holds only run files of ours: anything else there is the user's, and kept."""
    if os.path.isdir(directory):
        _check_only_ours(directory)
    for path in _paths(directory):
        os.remove(path)
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        pass


def _drop_previous(out_dir):
    """The run in previous/ is replaced for good: one rename, then the removal (finished by recover if cut)."""
    previous, dropping = os.path.join(out_dir, PREVIOUS), os.path.join(out_dir, DROPPING)
    if os.path.isdir(previous) and not os.path.islink(previous):
        _check_only_ours(previous)
        os.replace(previous, dropping)
        fsync_dir(out_dir)
    if os.path.lexists(dropping):
        _remove_dir(dropping)
        fsync_dir(out_dir)
        return True
    return False


def _move_back(out_dir):
    """The files under MOVING go to out_dir (where out_dir has none of that name); returns their names."""
    moving = os.path.join(out_dir, MOVING)
    back = [os.path.basename(p) for p in _paths(moving) if not os.path.lexists(os.path.join(out_dir, os.path.basename(p)))]
    for name in back:
        os.replace(os.path.join(moving, name), os.path.join(out_dir, name))
    _remove_dir(moving)
    fsync_dir(out_dir)
    return back


def recover(out_dir):
    """What a run killed between two renames left: run files on their way to out_dir are put there, a previous/
    being removed is removed."""
    if os.path.isdir(os.path.join(out_dir, MOVING)):
        back = _move_back(out_dir)
        print(f"{out_dir}: put back {', '.join(back) or 'nothing'} from {os.path.join(out_dir, MOVING)}/, left there "
              f"by a run killed while it set a run aside")
    if os.path.lexists(os.path.join(out_dir, DROPPING)):
        _remove_dir(os.path.join(out_dir, DROPPING))
        fsync_dir(out_dir)


def complete(ckpt_path):
    """Whether ckpt_path is a checkpoint saved at an evaluation or at a run's end (nanoGPT's are): True; one a stop
    signal saved, or none: False; one that does not load (damaged, or of an old format): None. Memory-mapped: a
    large one is not read."""
    import torch
    if not os.path.lexists(ckpt_path):
        return False
    try:
        checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=True, mmap=True)
        return not checkpoint.get('stopped') if isinstance(checkpoint, dict) and 'model' in checkpoint else None
    except Exception:
        return None


def check_previous_is_ours(out_dir):
    previous = os.path.join(out_dir, PREVIOUS)
    if os.path.lexists(previous) and (os.path.islink(previous) or not os.path.isdir(previous)):
        raise ValueError(f"{previous} is not a folder, but this new run sets the run it finds in {out_dir} aside "
                         f"there: move {previous} elsewhere, or pass another --out_dir")


def set_aside_previous_run(out_dir):
    """A fresh run finds out_dir's files (RUN_FILES). They go to previous/ unless previous/ holds a complete run and
    they are those of a run that never saved at an evaluation (stopped in its first iterations, or killed): then
    previous/ is the run to keep, and they are removed."""
    check_previous_is_ours(out_dir)
    here = [os.path.basename(p) for p in _paths(out_dir)]
    if not here:
        return
    previous = os.path.join(out_dir, PREVIOUS)
    kept = os.path.isfile(os.path.join(previous, 'ckpt.pt'))
    if kept and (state := complete(os.path.join(out_dir, 'ckpt.pt'))) is None:  # neither is to go
        raise ValueError(f"{os.path.join(out_dir, 'ckpt.pt')} does not load, and {previous}/ holds the run before it: "
                         f"move one of them out of {out_dir}, or pass another --out_dir")
    if kept and not state:
        for name in here:
            os.remove(os.path.join(out_dir, name))
        fsync_dir(out_dir)
        print(f"{out_dir}: removed {', '.join(here)} of a run that saved no checkpoint at an evaluation; {previous}/ "
              f"keeps the complete run before it until this new run saves one")
        return
    _drop_previous(out_dir)  # an older run, replaced by the complete one in out_dir (or junk: no checkpoint)
    moving = os.path.join(out_dir, MOVING)
    os.makedirs(moving, exist_ok=True)
    for name in here:  # killed in these renames: recover puts them back
        os.replace(os.path.join(out_dir, name), os.path.join(moving, name))
    os.replace(moving, previous)
    fsync_dir(out_dir)
    print(f"{out_dir} held a run ({', '.join(here)}): this new run starts over there; the old files are kept in "
          f"{previous}/ until it saves a checkpoint at an evaluation")


def forget_previous_run(out_dir, stopped=False):
    """After a complete checkpoint (at an evaluation or the end, not stopped): the run in previous/ is removed, and
    that is said."""
    if not stopped and _drop_previous(out_dir):
        print(f"removed {os.path.join(out_dir, PREVIOUS)}/ (the run this one replaced)")


def put_back_previous_run(out_dir):
    """A new run that ends without any checkpoint of its own (max_iters=0, say) puts the run in previous/ back, as
    nanoGPT leaves an out_dir's ckpt.pt it never overwrote; the new run's own log goes."""
    previous = os.path.join(out_dir, PREVIOUS)
    if os.path.lexists(os.path.join(out_dir, 'ckpt.pt')) or not os.path.isfile(os.path.join(previous, 'ckpt.pt')):
        return
    _check_only_ours(previous)
    for path in _paths(out_dir):
        os.remove(path)
    os.replace(previous, os.path.join(out_dir, MOVING))  # killed from here on: recover finishes it
    _move_back(out_dir)
    print(f"this run saved no checkpoint: the run it had set aside in {previous}/ is back in {out_dir}")


class RunFiles:
    """What a training run writes into out_dir: log.jsonl (and wandb), ckpt.pt; and what is on disk should it stop
    early. Every process keeps one (checkpoint_iter, the iteration ckpt.pt holds, decides collective saves alike);
    only the one that writes (the first) logs and writes."""

    def __init__(self, out_dir, writes):
        self.out_dir, self.writes = out_dir, writes
        self.ckpt_path, self.log_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'log.jsonl')
        self.checkpoint_iter = None  # None: no checkpoint of this run, or resumed from, on disk
        self.wandb_run, self.wandb_run_id = None, None  # a resumed run logs on to its wandb run

    def kept(self):
        return (f"{self.ckpt_path} still holds iter {self.checkpoint_iter}" if self.checkpoint_iter is not None
                else "no checkpoint was written")

    def log(self, record):
        """One record per printed log line, appended to log.jsonl (and sent to wandb)."""
        try:
            with open(self.log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:
            fail(f"cannot write {self.log_path}: {os_error_text(e)} ({self.kept()}); free the disk or "
                 f"make {self.out_dir} writable, then resume with --init_from=resume")
        if self.wandb_run:
            self.wandb_run.log(record)

    def stop_on_nonfinite(self, what, value, iter_num):
        """A nan or inf loss stops the run before it can be saved: the checkpoint on disk stays good."""
        if not math.isfinite(value):
            fail(f"{what} is {value} at iter {iter_num}: stopped ({self.kept()}); try a lower learning_rate, "
                 f"a longer warmup_iters or dtype='bfloat16'")

    def save(self, checkpoint, iter_num, stopped=False):
        """ckpt.pt replaced whole by checkpoint (the state at iter_num; stopped: a stop signal's save), then the run
        set aside at the start goes. A failed write stops the run in one line, the previous ckpt.pt kept."""
        if self.writes:
            checkpoint['wandb_run_id'] = self.wandb_run.id if self.wandb_run else self.wandb_run_id
            print(f"saving checkpoint to {self.out_dir}")
            try:
                write_checkpoint(checkpoint, self.ckpt_path)
            except (OSError, ValueError) as e:  # a full or read-only disk; nan or inf weights (ValueError)
                fail(f"{e} ({self.kept()}); " + (f"free the disk or make {self.out_dir} writable, then resume with "
                     f"--init_from=resume" if isinstance(e, OSError) else
                     "try a lower learning_rate, a longer warmup_iters or dtype='bfloat16'"))
            forget_previous_run(self.out_dir, stopped)  # a complete checkpoint: the run set aside at the start goes
        self.checkpoint_iter = iter_num


class StopRequest:
    """SIGTERM (Slurm, cloud preemption), SIGINT (Ctrl-C) and SIGHUP ask the run to stop after the current
    iteration, saved; a second one stops it at once (sys.exit: a checkpoint being written is removed, the one
    before it kept; kept() says what is on disk). Under torchrun the request is agreed between the processes at
    iteration boundaries, so a signal that reaches one of them stops all at the same iteration; a worker whose
    torchrun is gone (killed with -9) stops too, instead of training on as an orphan. The agreement is an
    all_reduce of a CPU flag in a gloo group of its own, started at one boundary and read at the next: no
    iteration waits for the GPU or for the other processes because of it."""

    def __init__(self, ddp, kept, timeout=600, training=True):
        self.ddp, self.kept, self.why, self.when = ddp, kept, None, 0.0
        self.parent = os.getppid()
        if ddp:
            import torch
            self.group = torch.distributed.new_group(backend='gloo', timeout=timedelta(seconds=timeout))
            self.flag, self.pending = torch.zeros(1), None
        for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, 'SIGHUP', None)):
            if sig is not None and training:  # eval_only: nothing to save, a signal ends it at once
                signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        # under torchrun a terminal's Ctrl-C reaches every process and torchrun then relays it: that copy is no second request
        if self.why and not (self.ddp and time.monotonic() - self.when < 3):
            sys.exit(f"train.py: stopped at once by a second {name}; {self.kept()}")
        adopted = self.why in (None, 'a stop request to another process')  # its own copy names it better
        self.why, self.when = name if adopted else self.why, time.monotonic()

    def requested(self):
        """Why the run should stop now (the same answer in every process), or None."""
        if self.ddp and not self.why and os.getppid() != self.parent:
            self.why = 'the end of torchrun (its process is gone)'
        if not self.ddp:
            return self.why
        import torch
        agreed = False
        if self.pending is not None:  # the reduction started at the last boundary: long done
            self.pending.wait()
            self.pending = None
            agreed = self.flag.item() > 0
            if agreed and not self.why:  # its own copy of the signal may still come: no second request either
                self.why, self.when = 'a stop request to another process', time.monotonic()
            if agreed:
                return self.why
        self.flag.fill_(1.0 if self.why else 0.0)
        self.pending = torch.distributed.all_reduce(self.flag, op=torch.distributed.ReduceOp.MAX, group=self.group,
                                                    async_op=True)
        return None

    def close(self):
        """At the end of a run under torchrun: waits for the reduction started at the last boundary and lets it go
        (c10d work still held when Python exits can free its tensor after the interpreter is gone: an abort)."""
        if self.ddp and self.pending is not None:
            self.pending.wait()
        self.pending = None


def bytes_text(n):
    return f"{n / 2 ** 30:,.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:,.1f} MiB"


def memory_text(config, error):
    """An allocator's out-of-memory error, in one line that says which settings need the memory."""
    L, D, H, T, B = (config[k] for k in ('n_layer', 'n_embd', 'n_head', 'block_size', 'batch_size'))
    model = 16 * (12 * L * D * D + 50304 * D + T * D)  # float32 weights, gradients and AdamW's two moments
    scores = 4 * B * H * T * T  # one layer's float32 attention scores, (B, nh, T, T)
    asked = re.search(r'allocate ([\d.]+ ?[KMGT]i?B|\d+ bytes)', str(error))
    return (f"train.py: out of memory{f' (it asked for {asked.group(1)} more)' if asked else ''}: the model's weights, "
            f"gradients and AdamW state need about {bytes_text(model)} (n_layer={L}, n_embd={D}), one layer's attention "
            f"scores {bytes_text(scores)} (batch_size={B} x n_head={H} x block_size={T} squared); lower the settings of "
            f"the larger, or use gradient_checkpointing=True or a smaller batch_size with more gradient_accumulation_steps")


def name_failures(config):
    """What ends train.py before or outside the places that say why, in one line instead of a traceback: Ctrl-C
    while it starts, running out of memory, and under torchrun a collective that times out or loses a peer
    (other errors keep their traceback)."""
    ckpt_path = os.path.join(config['out_dir'], 'ckpt.pt')

    def hook(kind, value, tb):
        text = str(value)
        err = sys.__stderr__  # init_process_group wraps this hook and buffers sys.stderr until it returns: it does not
        if issubclass(kind, KeyboardInterrupt):
            print("train.py: stopped by Ctrl-C before any training; nothing was written", file=err)
        elif issubclass(kind, MemoryError) or (issubclass(kind, RuntimeError) and (
                "can't allocate memory" in text or 'out of memory' in text.lower())):
            print(memory_text(config, value), file=err)
        elif 'RANK' in os.environ and issubclass(kind, RuntimeError) and any(
                s in text.lower() for s in ('timed out', 'timeout', 'connection closed', 'connection reset', 'broken pipe')):
            print(f"train.py: another process did not answer within ddp_timeout={config['ddp_timeout']}s or is gone "
                  f"({text.strip().splitlines()[0][:160]}); {ckpt_path} holds the last save: resume with "
                  f"--init_from=resume", file=err)
        else:
            return sys.__excepthook__(kind, value, tb)
        err.flush()
        os._exit(1)
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
