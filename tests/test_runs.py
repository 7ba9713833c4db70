"""Runs that survive (issue 21): real train.py processes stopped by signals, a full or unwritable disk, a second
run into the same out_dir, data changed under them, and torchrun's workers stopped, killed or orphaned."""
import json
import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, phrase_repo, run_script, tmpfs, write_bins

pytestmark = pytest.mark.slow  # every test here runs train.py processes and waits on their signals

VOCAB = 32
# tiny, with 8 micro-steps an iteration: slow enough (tens of ms) for a signal to land mid-run
TINY = ['--device=cpu', '--compile=False', '--dtype=float32', '--dataset=tiny', '--out_dir=out',
        '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=4', '--bias=True',
        '--gradient_accumulation_steps=8', '--eval_iters=2', '--log_interval=1', '--learning_rate=1e-2',
        '--warmup_iters=2', '--lr_decay_iters=40', '--dropout=0.1']
LONG = ['--max_iters=100000', '--eval_interval=100000']  # a run that only a signal ends


@pytest.fixture
def repo(tmp_path):
    return phrase_repo(tmp_path, VOCAB)


class Run:
    """train.py (or torchrun of it) in the background: stdout read line by line, stderr into a file."""

    def __init__(self, repo, *args, nproc=0):
        launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] \
            if nproc else [sys.executable]
        self.err_path = os.path.join(repo, f'stderr-{time.monotonic_ns()}.txt')
        self.err = open(self.err_path, 'w')
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
        self.proc = subprocess.Popen([*launcher, 'train.py', *args], cwd=repo, env=env, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, start_new_session=True)
        self.pid, self.lines = self.proc.pid, []

    def wait_for(self, text, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if text in line:
                return line
        self.kill()
        raise AssertionError(f"no {text!r} in the output: {''.join(self.lines)[-2000:]}{self.stderr()[-2000:]}")

    def finish(self, timeout=60):
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(out)
        self.err.close()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, ''.join(self.lines), self.stderr())

    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def kill(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def iter_losses(path):
    return {r['iter']: r['loss'] for r in read_log(path) if 'iter' in r}


def assert_no_tmp(directory):
    assert not [n for n in os.listdir(directory) if n.endswith('.tmp')], os.listdir(directory)


def assert_same_weights(a, b):
    a, b = load(a), load(b)
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


def alive(pid):
    try:
        with open(f'/proc/{pid}/status') as f:
            return 'zombie' not in f.read()
    except FileNotFoundError:
        return False


def workers(pid):
    """torchrun's worker processes: {rank: pid}."""
    found = {}
    for _ in range(100):
        out = subprocess.run(['pgrep', '-P', str(pid)], capture_output=True, text=True).stdout.split()
        for child in map(int, out):
            with open(f'/proc/{child}/environ', 'rb') as f:
                env = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
            if b'RANK' in env:
                found[int(env[b'RANK'])] = child
        if len(found) == 2:
            return found
        time.sleep(0.1)
    raise AssertionError(f'no two workers under torchrun {pid}: {found}')


# -----------------------------------------------------------------------------
# 1, 7: a stop request saves, a resume equals the uninterrupted run, the log holds each iteration once

def test_signals_save_and_the_resume_equals_the_uninterrupted_run(repo):
    args = [*TINY, '--max_iters=30', '--eval_interval=15']
    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    runs = {sig: Run(repo, *args, f'--out_dir=out-{sig.name}') for sig in sigs}  # side by side: start-ups overlap
    straight = Run(repo, *args, '--out_dir=straight')
    for sig, run in runs.items():
        assert 'mfu' not in run.wait_for('iter 0:')  # not measured yet
        run.wait_for('iter 3:')
        run.proc.send_signal(sig)
    stopped_at = {}
    for sig, run in runs.items():
        result, out = run.finish(), f'out-{sig.name}'
        assert all('mfu' not in line for line in result.stdout.splitlines() if line.startswith('iter 4:'))
        last = assert_one_line_error(result, 'train.py', f'stopped by {sig.name} at iter ')
        n = stopped_at[sig] = int(last.split(' at iter ')[1].split(':')[0])
        assert 4 <= n < 30 and last == (f"train.py: stopped by {sig.name} at iter {n}: saved {out}/ckpt.pt; "
                                        f"resume with --init_from=resume"), last
        assert result.returncode == 1
        assert load(repo / out / 'ckpt.pt')['iter_num'] == n
        assert_no_tmp(repo / out)
    resumed = {sig: Run(repo, *args, f'--out_dir=out-{sig.name}', '--init_from=resume') for sig in sigs}
    assert straight.finish().returncode == 0
    for sig, run in resumed.items():
        result, out = run.finish(), f'out-{sig.name}'
        assert result.returncode == 0, result.stderr[-2000:]
        assert f'resuming training from {out}/ckpt.pt at iter {stopped_at[sig]}' in result.stdout
        assert_same_weights(repo / 'straight' / 'ckpt.pt', repo / out / 'ckpt.pt')
        assert iter_losses(repo / out / 'log.jsonl') == iter_losses(repo / 'straight' / 'log.jsonl')
        iters = [r['iter'] for r in read_log(repo / out / 'log.jsonl') if 'iter' in r]
        assert iters == list(range(30)), iters  # each once, in order


def test_a_second_signal_stops_at_once_and_keeps_the_checkpoint(repo):
    """(and 7: a resume with nothing left to train)"""
    big = [*TINY, '--n_layer=4', '--n_embd=384', '--gradient_accumulation_steps=1']  # a save that takes a while
    run_script(repo, 'train.py', *big, '--max_iters=3', '--eval_interval=3', check=True)
    before = (repo / 'out' / 'ckpt.pt').read_bytes()
    run = Run(repo, *big, *LONG, '--init_from=resume')
    run.wait_for('iter 5:')
    run.proc.send_signal(signal.SIGINT)
    run.wait_for('saving checkpoint to out')
    time.sleep(0.05)  # into torch.save's writing of the tensors
    run.proc.send_signal(signal.SIGINT)  # while the first stop saves
    result = run.finish()
    last = assert_one_line_error(result, 'train.py')
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert_no_tmp(repo / 'out')
    ckpt = load(repo / 'out' / 'ckpt.pt')  # whole: the old one, or (the save was done first) the stop's own
    if 'at once' in last:
        assert last == 'train.py: stopped at once by a second SIGINT; out/ckpt.pt still holds iter 3'
        assert (repo / 'out' / 'ckpt.pt').read_bytes() == before
    else:
        assert last.startswith('train.py: stopped by SIGINT at iter ') and ckpt['iter_num'] > 5, last
    # and a resume with nothing left to train says so, exit 0, the log as it was
    log = (repo / 'out' / 'log.jsonl').read_bytes()
    result = run_script(repo, 'train.py', *big, '--max_iters=2', '--init_from=resume', check=True)
    assert f"nothing to train: out/ckpt.pt is at iter {ckpt['iter_num']}, and max_iters=2" in result.stdout
    assert (repo / 'out' / 'log.jsonl').read_bytes() == log


# -----------------------------------------------------------------------------
# 3: a write that fails says why in one line, the previous checkpoint kept

@pytest.fixture
def mount():
    """mount(path, size): conftest's tmpfs at path, unmounted when the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda path, size: stack.enter_context(tmpfs(path, size))


def test_full_disk_at_a_save_keeps_the_previous_checkpoint(repo, mount):
    mount(repo / 'small', '600k')  # one checkpoint (~360 KB) fits; its replacement beside it does not
    result = run_script(repo, 'train.py', *TINY, '--max_iters=10', '--eval_interval=5', '--out_dir=small')
    assert_one_line_error(result, 'train.py', 'small/ckpt.pt', 'no space left on device',
                          'small/ckpt.pt still holds iter 5')
    assert load(repo / 'small' / 'ckpt.pt')['iter_num'] == 5
    assert_no_tmp(repo / 'small')


def test_unwritable_out_dirs_get_one_line(repo, mount):
    (repo / 'afile').write_text('not a directory')
    mount(repo / 'ro', '1m')
    subprocess.run(['mount', '-o', 'remount,ro', str(repo / 'ro')], check=True)
    under_file, read_only = (Run(repo, *TINY, '--max_iters=2', f'--out_dir={out}') for out in ('afile/out', 'ro'))
    assert_one_line_error(under_file.finish(), 'train.py', 'afile/out', 'not a directory')
    assert_one_line_error(read_only.finish(), 'train.py', 'ro', 'read-only file system')


# -----------------------------------------------------------------------------
# 4: one run per out_dir; a new run sets the old one aside until its first checkpoint

def test_a_second_run_is_refused_and_a_killed_run_blocks_nothing(repo):
    first = Run(repo, *TINY, *LONG)
    first.wait_for('iter 2:')
    second = run_script(repo, 'train.py', *TINY, '--max_iters=2')
    assert_one_line_error(second, 'train.py', f'out is in use by another run (pid {first.pid})')
    first.kill()
    first.finish()
    run_script(repo, 'train.py', *TINY, '--max_iters=2', '--eval_interval=2', check=True)


def test_a_new_run_keeps_the_old_one_until_its_first_checkpoint(repo):
    run_script(repo, 'train.py', *TINY, '--max_iters=3', '--eval_interval=3', check=True)
    old = {n: (repo / 'out' / n).read_bytes() for n in ('ckpt.pt', 'log.jsonl')}
    run = Run(repo, *TINY, '--max_iters=30', '--eval_interval=20')
    run.wait_for('out held a run (ckpt.pt, log.jsonl): this new run starts over there')
    assert {n: (repo / 'out' / 'previous' / n).read_bytes() for n in old} == old
    run.wait_for('removed out/previous/ (the run this one replaced)')
    assert not (repo / 'out' / 'previous').exists()
    assert run.finish().returncode == 0
    assert load(repo / 'out' / 'ckpt.pt')['iter_num'] == 30


# -----------------------------------------------------------------------------
# 5: data changed under a run, or a resume on another vocabulary

def test_data_changed_under_a_run_is_named(repo):
    run = Run(repo, *TINY, *LONG)
    run.wait_for('iter 2:')
    with open(repo / 'data' / 'tiny' / 'train.bin', 'r+b') as f:
        f.truncate(2000)
    result = run.finish()
    assert_one_line_error(result, 'train.py', 'data/tiny/train.bin changed during training (4000 tokens, now 1000)')


def test_resume_on_another_vocabulary_is_refused(repo):
    tokens = np.random.default_rng(1).integers(0, 20, 4000)
    write_bins(repo / 'data' / 'bpe', tokens, tokens[:800], meta=None)  # GPT-2's BPE: no meta.pkl
    trained = [Run(repo, *TINY, '--max_iters=2', '--eval_interval=2'),
               Run(repo, *TINY, '--dataset=bpe', '--out_dir=bpe', '--max_iters=1', '--eval_interval=1')]
    assert [run.finish().returncode for run in trained] == [0, 0]
    write_bins(repo / 'data' / 'tiny', tokens, tokens[:800], meta={'vocab_size': 20})  # re-prepared, another text
    char, bpe = (Run(repo, *TINY, f'--out_dir={out}', '--max_iters=4', '--init_from=resume') for out in ('out', 'bpe'))
    assert_one_line_error(char.finish(), 'train.py', 'out/ckpt.pt was trained on data/tiny with a vocabulary of 32',
                          'a vocabulary of 20', 'the vocabularies differ')
    # a BPE model resumed on the character dataset
    assert_one_line_error(bpe.finish(), 'train.py', "trained on data/bpe with GPT-2's BPE", 'the vocabularies differ')


# -----------------------------------------------------------------------------
# 6, 7: torchrun's workers stop together, end with torchrun, and time out on a stalled peer

DDP = [*TINY, '--gradient_accumulation_steps=4']


@pytest.mark.parametrize('how', ['SIGTERM to one worker', pytest.param(
    "Ctrl-C (SIGINT to torchrun's process group)", marks=pytest.mark.xfail(strict=False, reason=(
        "passes alone, but in the full suite (2 cores) both workers sometimes miss the stop and torchrun kills "
        "them after its 30 s: under investigation")))])
def test_a_stop_request_stops_both_workers_at_one_iteration(repo, how):
    run = Run(repo, *DDP, *LONG, nproc=2)
    run.wait_for('iter 3:')
    start = time.time()
    if how.startswith('SIGTERM'):
        os.kill(workers(run.pid)[1], signal.SIGTERM)  # not the one that prints and saves
    else:  # torchrun relays the SIGINT its workers already have: still one request, saved
        os.killpg(run.pid, signal.SIGINT)
    result = run.finish()
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith('train.py: stopped by')]
    why = 'a stop request to another process' if how.startswith('SIGTERM') else 'SIGINT'
    assert len(lines) == 1 and f'stopped by {why} at iter' in lines[0], result.stderr[-3000:]
    assert time.time() - start < 20  # not torchrun's 30 s wait before it kills a worker
    n = int(lines[0].split(' at iter ')[1].split(':')[0])
    assert load(repo / 'out' / 'ckpt.pt')['iter_num'] == n
    assert_no_tmp(repo / 'out')
    for line in ('tokens per iteration will be', 'initializing a new model from scratch', 'device cpu'):
        assert result.stdout.count(line) == 1, result.stdout  # only the first process prints
    assert all('mfu' not in line for line in result.stdout.splitlines() if line.startswith('iter 0:'))


def test_workers_end_when_torchrun_is_killed(repo):
    run = Run(repo, *DDP, *LONG, nproc=2)
    run.wait_for('iter 3:')
    pids = workers(run.pid).values()
    os.kill(run.pid, signal.SIGKILL)
    deadline = time.time() + 15
    while time.time() < deadline and any(map(alive, pids)):
        time.sleep(0.2)
    assert not any(map(alive, pids)), 'workers train on as orphans'
    run.finish()
    assert 'the end of torchrun' in run.stderr(), run.stderr()[-2000:]
    assert load(repo / 'out' / 'ckpt.pt')['iter_num'] > 3
    assert_no_tmp(repo / 'out')


def test_a_stopped_worker_ends_the_run_within_ddp_timeout(repo):
    run = Run(repo, *DDP, *LONG, '--ddp_timeout=10', nproc=2)
    run.wait_for('iter 3:')
    stopped = workers(run.pid)[1]
    os.kill(stopped, signal.SIGSTOP)
    start, line = time.time(), None
    try:
        while time.time() - start < 40 and not line:
            line = next((s for s in run.stderr().splitlines() if s.startswith('train.py: ')), None)
            time.sleep(0.5)
    finally:
        os.kill(stopped, signal.SIGKILL)
    assert line and 'did not answer within ddp_timeout=10s' in line, run.stderr()[-3000:]
    assert time.time() - start < 35
    run.finish()
