"""The safety mechanisms themselves, tried the way users break things (issue 27): a finished run set aside by a new
one is never lost (stopped at once, killed -9 before its first checkpoint or between any two renames and deletes,
a run that saves nothing), nothing non-finite is saved, a train.bin and val.bin of two prepares are refused, and
what used to end in a traceback or a misleading line ends in one line naming the file or setting and the fix."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_one_line_error, phrase_repo, run_script, write_bins
from files import load_checkpoint
import runs
from test_runs import LONG, TINY, Run, load

VOCAB = 32
RUN_FILES = ('ckpt.pt', 'log.jsonl', 'loss.png')
STRACE = shutil.which('strace')
needs_strace = pytest.mark.skipif(not STRACE, reason="needs strace (apt-get install strace) to kill at a chosen syscall")


@pytest.fixture(scope='module')
def repo(tmp_path_factory):
    """A scratch repository with one finished run, out_dir 'finished' (iter 3, with a plot beside it), to copy."""
    repo = phrase_repo(tmp_path_factory.mktemp('safety'), VOCAB)
    run_script(repo, 'train.py', *TINY, '--max_iters=3', '--eval_interval=3', '--out_dir=finished', check=True)
    (repo / 'finished' / 'loss.png').write_bytes(b'a plot of the finished run')
    return repo


def finished_run(repo, out):
    """repo/out: a copy of the finished run; returns its files' bytes."""
    shutil.copytree(repo / 'finished', repo / out)
    return files(repo / out)


def files(directory):
    return {n: (directory / n).read_bytes() for n in RUN_FILES if (directory / n).exists()}


# -----------------------------------------------------------------------------
# a finished run set aside in previous/ survives whatever the new run does

def test_a_finished_run_set_aside_survives_a_stop_a_kill_9_and_the_runs_that_follow(repo, monkeypatch):
    """Side by side: (o1) a mistaken fresh run stopped at once, then one that saves nothing (max_iters=0); (o2) a
    fresh run killed -9 before its first checkpoint, a resume, then a second fresh run that trains."""
    old = finished_run(repo, 'o1')
    assert finished_run(repo, 'o2') == old
    stopped, killed = Run(repo, *TINY, *LONG, '--out_dir=o1'), Run(repo, *TINY, *LONG, '--out_dir=o2')
    stopped.wait_for('iter 2:')
    stopped.proc.send_signal(signal.SIGTERM)  # the user undoes the mistaken run
    killed.wait_for('iter 2:')
    killed.kill()
    killed.finish()
    assert_one_line_error(stopped.finish(), 'train.py', 'stopped by SIGTERM at iter')
    assert files(repo / 'o1' / 'previous') == old  # the stop's own save does not replace it
    assert load(repo / 'o1' / 'ckpt.pt')['stopped'] is True
    monkeypatch.chdir(repo)
    with pytest.raises(ValueError) as error:  # what --init_from=resume (and sample.py) say now: where the run is
        load_checkpoint('o2')
    assert 'no checkpoint o2/ckpt.pt, but o2/previous/ckpt.pt holds the run' in str(error.value)
    assert 'mv o2/previous/* o2/' in str(error.value)
    nothing = Run(repo, *TINY, '--out_dir=o1', '--max_iters=0')
    second = Run(repo, *TINY, '--out_dir=o2', '--max_iters=4', '--eval_interval=4')
    second.wait_for('o2: removed log.jsonl of a run that saved no checkpoint at an evaluation')
    assert files(repo / 'o2' / 'previous') == old
    second.wait_for('removed o2/previous/ (the run this one replaced)')  # only at its complete checkpoint
    assert second.finish().returncode == 0
    assert load(repo / 'o2' / 'ckpt.pt')['iter_num'] == 4 and not (repo / 'o2' / 'previous').exists()
    # max_iters=0 saves nothing: the stopped run goes, the finished one is back, as nanoGPT leaves it
    result = nothing.finish()
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'o1: removed ckpt.pt, log.jsonl of a run that saved no checkpoint at an evaluation' in result.stdout
    assert 'this run saved no checkpoint: the run it had set aside in o1/previous/ is back in o1' in result.stdout
    assert files(repo / 'o1') == old and not (repo / 'o1' / 'previous').exists()


def strace(*args, inject=None):
    """strace of the main thread's renames, deletes and rmdirs (the file steps of the run directory), with
    kill -9 injected at the inject=(syscall, n)-th one of that syscall: the process dies before it happens."""
    kill = ['-e', f'inject={inject[0]}:signal=SIGKILL:when={inject[1]}'] if inject else []
    return [STRACE, '-qq', '-e', 'signal=none', '-e', 'trace=rename,unlink,rmdir', *kill, *args]


def run_dir_steps(trace):
    """From strace's output: (syscall, its count among calls of that syscall) for each one on a path under out."""
    counts, steps = {}, []
    for line in trace.splitlines():
        if m := re.match(r'(\w+)\("([^"]*)"', line):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
            if '/out/' in '/' + m.group(2) or m.group(2).startswith('out/'):
                steps.append((m.group(1), counts[m.group(1)]))
    return steps


STEP = """
import os, sys
sys.path.insert(0, sys.argv[1])
import runs
step = sys.argv[2]
if step == 'fresh':  # what a new run does first (under its lock)
    runs.take_out_dir('out', 'out/log.jsonl', resumed=False, writes=True, iter_num=0)
elif step == 'saved':  # a new run's first complete checkpoint
    runs.forget_previous_run('out')
elif step == 'saved_nothing':  # a new run that ends without a checkpoint
    runs.put_back_previous_run('out')
"""


def checkpoint_file(path, name, stopped=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'model': {'w': torch.zeros(2)}, 'iter_num': 3, 'name': name, 'stopped': stopped}, path)


def scenario(directory, kind):
    """out/ as each step finds it; returns the name of the run that must survive and where it lies then."""
    out = directory / 'out'
    if kind == 'fresh':  # a finished run A in out
        where = out
    else:  # A set aside in previous/
        where = out / 'previous'
    checkpoint_file(where / 'ckpt.pt', 'A')
    (where / 'log.jsonl').write_text('{"iter": 0, "loss": 3.0}\n')
    (where / 'loss.png').write_bytes(b'A')
    if kind == 'fresh over a stopped run':  # B: a new run stopped in its first iterations
        checkpoint_file(out / 'ckpt.pt', 'B', stopped=True)
        (out / 'log.jsonl').write_text('{"iter": 0, "loss": 3.1}\n')
    if kind == 'saved':  # C has just saved a complete checkpoint: C is the run to keep now
        checkpoint_file(out / 'ckpt.pt', 'C')
        (out / 'log.jsonl').write_text('{"iter": 0, "loss": 3.2}\n')
        return 'C', files(out)
    if kind == 'saved_nothing':  # D logged, saved nothing
        (out / 'log.jsonl').write_text('{"iter": 0, "loss": 3.3}\n')
    return 'A', files(where)


STEPS = {'fresh': 'fresh', 'fresh over a stopped run': 'fresh', 'saved': 'saved', 'saved_nothing': 'saved_nothing'}


@needs_strace
def test_kill_9_at_every_rename_and_delete_of_the_run_directory_then_a_new_run_loses_no_complete_run(tmp_path):
    env = {**os.environ, 'PYTHONDONTWRITEBYTECODE': '1'}
    (tmp_path / 'step.py').write_text(STEP)

    def start(directory, kind, inject=None, output='/dev/null'):
        return subprocess.Popen(strace('-o', output, sys.executable, tmp_path / 'step.py', ROOT, STEPS[kind], inject=inject),
                                cwd=directory, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # each step once, traced: its renames and deletes under out/, counted as strace counts them
    procs = {}
    for kind in STEPS:
        scenario(tmp_path / f'count-{kind}', kind)
        procs[kind] = start(tmp_path / f'count-{kind}', kind, output=tmp_path / f'count-{kind}' / 'trace.txt')
    trials = []
    for kind, proc in procs.items():
        assert proc.wait() == 0, proc.stderr.read()
        steps = run_dir_steps((tmp_path / f'count-{kind}' / 'trace.txt').read_text())
        assert steps, kind
        trials += [(kind, i, step) for i, step in enumerate(steps)]
    assert len(trials) >= 15
    # killed before each one of them, side by side
    procs = {}
    for kind, i, step in trials:
        directory = tmp_path / f'{kind}-{i}'
        procs[kind, i] = (scenario(directory, kind), start(directory, kind, inject=step))
    for (kind, i), ((name, kept), proc) in procs.items():
        assert proc.wait() in (-9, 137), (kind, i, proc.stderr.read())
    # then the next run into out (its first step, here in this process): it finishes or undoes what was cut, and
    # the run to keep is whole, in out or in previous/
    for kind, i in procs:
        out = tmp_path / f'{kind}-{i}' / 'out'
        os.close(runs.take_out_dir(str(out), str(out / 'log.jsonl'), resumed=False, writes=True, iter_num=0))
        (name, kept) = procs[kind, i][0]
        assert kept in (files(out), files(out / 'previous')), (kind, i, sorted(os.listdir(out)))
        assert torch.load(out / 'previous' / 'ckpt.pt', weights_only=True)['name'] == name, (kind, i)
        assert not {'previous.moving', 'previous.dropping'} & set(os.listdir(out)), (kind, i)


# -----------------------------------------------------------------------------
# nothing non-finite is saved; signals at any moment end in a true line

def test_signals_at_the_wrong_moment_end_in_a_true_line_and_nothing_non_finite_is_saved(repo):
    """Two SIGTERMs in the step-0 evaluation, SIGINT in eval_only's, Ctrl-C while importing, SIGTERM once the
    weights are nan between log lines (and a resume with other settings than the run's says which)."""
    old = finished_run(repo, 'o6')
    shutil.copytree(repo / 'finished', repo / 'o6e')
    shutil.copytree(repo / 'finished', repo / 'o6n')
    diverged = Run(repo, *TINY, *LONG, '--out_dir=o6n', '--init_from=resume', '--learning_rate=1e30', '--decay_lr=False',
                   '--grad_clip=0.0', '--log_interval=100000')
    eval_at_0 = Run(repo, *TINY, *LONG, '--out_dir=o6', '--eval_iters=4000')  # a fresh run into a finished out_dir
    eval_only = Run(repo, *TINY, '--out_dir=o6e', '--init_from=resume', '--eval_only=True', '--eval_iters=4000')
    starting = Run(repo, *TINY, '--out_dir=o6s')
    time.sleep(0.5)
    os.kill(starting.pid, signal.SIGINT)  # Ctrl-C while it imports
    eval_at_0.wait_for('o6 held a run')
    eval_only.wait_for('MFU')
    time.sleep(1)  # into the step-0 evaluation
    for sig in (signal.SIGTERM, signal.SIGTERM):
        eval_at_0.proc.send_signal(sig)
        time.sleep(0.3)
    eval_only.proc.send_signal(signal.SIGINT)
    last = assert_one_line_error(eval_at_0.finish(), 'train.py')
    assert last == 'train.py: stopped at once by a second SIGTERM; no checkpoint was written', last
    assert files(repo / 'o6' / 'previous') == old
    assert_one_line_error(eval_only.finish(), 'train.py', 'stopped by Ctrl-C before any training; nothing was written')
    result = starting.finish()
    assert result.returncode != 0
    assert result.stderr.strip() == 'train.py: stopped by Ctrl-C before any training; nothing was written', result.stderr
    assert not (repo / 'o6s').exists()
    note = diverged.wait_for('note: resuming with settings other than those o6n/ckpt.pt')
    assert 'learning_rate=1e+30 (it had 0.01)' in note and 'decay_lr=False (it had True)' in note, note
    diverged.wait_for('resuming training from o6n/ckpt.pt at iter 3')
    time.sleep(2)  # dozens of iterations: the weights are nan long before
    diverged.proc.send_signal(signal.SIGTERM)
    assert_one_line_error(diverged.finish(), 'train.py', 'not saved to o6n/ckpt.pt', 'are nan or inf',
                          'o6n/ckpt.pt still holds iter 3', 'lower learning_rate')
    assert (repo / 'o6n' / 'ckpt.pt').read_bytes() == old['ckpt.pt']


# -----------------------------------------------------------------------------
# files and settings that used to end in a traceback: one line each, naming the file or setting and the fix

def test_train_py_names_bad_files_and_impossible_settings_in_one_line(repo):
    data = repo / 'data'
    rng = np.random.default_rng(0)
    long = np.tile(rng.integers(0, VOCAB, 50), 4100)  # 205,000 tokens
    write_bins(data / 'long', long, long, {'vocab_size': VOCAB})
    write_bins(data / 'mixed', long[:4000], long[:500], {'vocab_size': VOCAB})
    (data / 'mixed' / 'bins.json').write_text('{"prepare": "data/mixed/prepare.py", "train.bin": 4000, "val.bin": 800}')
    write_bins(data / 'dirbin', long[:4000], long[:500], {'vocab_size': VOCAB})
    os.remove(data / 'dirbin' / 'train.bin')
    os.mkdir(data / 'dirbin' / 'train.bin')
    for out in ('empty', 'cut', 'hand_log', 'user_previous', 'user_folder'):
        finished_run(repo, out)
    (repo / 'empty' / 'ckpt.pt').write_bytes(b'')
    size = os.path.getsize(repo / 'cut' / 'ckpt.pt')
    with open(repo / 'cut' / 'ckpt.pt', 'r+b') as f:
        f.truncate(size // 2)
    with open(repo / 'hand_log' / 'log.jsonl', 'ab') as f:  # a hand-added record and bytes that are not UTF-8
        f.write(b'{"step": null, "note": "lr changed by hand"}\n\xff\xfe not text\n')
    (repo / 'user_previous' / 'previous').write_text("the user's own notes")
    (repo / 'user_folder' / 'previous').mkdir()  # a folder of the user's own, not one of ours
    (repo / 'user_folder' / 'previous' / 'notes.txt').write_text("the user's own notes")
    cases = {
        'shape': (['--n_embd=1000000', '--n_head=2'], ['out of memory', 'n_layer=2, n_embd=1000000', 'lower the settings']),
        'block_size': (['--dataset=long', '--block_size=200000', '--flash_attn=False', '--batch_size=1', '--eval_iters=1'],
                       ['out of memory', 'block_size=200000 squared']),
        'mixed': (['--dataset=mixed'], ['data/mixed/val.bin has 500 tokens, but the prepare that wrote the train.bin beside '
                                        'it wrote 800 (data/mixed/bins.json)', 'run python data/mixed/prepare.py again']),
        'dirbin': (['--dataset=dirbin'], ['data/dirbin/train.bin is not a file (a folder?)']),
        'empty': (['--out_dir=empty', '--init_from=resume'], ['empty/ckpt.pt is empty (0 bytes']),
        'cut': (['--out_dir=cut', '--init_from=resume'], ['cannot load cut/ckpt.pt safely', 'copy it again']),
        'user_previous': (['--out_dir=user_previous', '--max_iters=2'], ['user_previous/previous is not a folder',
                                                                         'move user_previous/previous elsewhere']),
        'user_folder': (['--out_dir=user_folder', '--max_iters=2'], ['user_folder/previous/ holds files train.py did not '
                                                                     'put there (notes.txt): move them out']),
    }
    procs = {name: Run(repo, *TINY, '--max_iters=4', *args) for name, (args, _) in cases.items()}
    resumed = Run(repo, *TINY, '--out_dir=hand_log', '--init_from=resume', '--max_iters=5', '--eval_interval=5')
    for name, (args, fragments) in cases.items():
        assert_one_line_error(procs[name].finish(timeout=120), 'train.py', *fragments)
    assert (repo / 'user_previous' / 'previous').read_text() == "the user's own notes"
    assert (repo / 'user_folder' / 'previous' / 'notes.txt').read_text() == "the user's own notes"
    assert load(repo / 'user_previous' / 'ckpt.pt')['iter_num'] == 3  # the run there, untouched
    result = resumed.finish()
    assert result.returncode == 0, result.stderr[-2000:]
    log = (repo / 'hand_log' / 'log.jsonl').read_bytes()
    assert b'{"step": null, "note": "lr changed by hand"}\n\xff\xfe not text\n' in log  # kept as they were


def test_the_stop_agreement_under_ddp_never_waits_on_the_device(monkeypatch, tmp_path):
    """The stop flag is reduced on the CPU, in a gloo group of its own, asynchronously: started at one iteration's
    end and read at the next, so no iteration syncs with the GPU (or waits for the others) for it."""
    import runs
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        calls = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, 'all_reduce', lambda t, **kw: calls.append((t.device.type, kw)) or real(t, **kw))
        stop = runs.StopRequest(True, lambda: 'kept', training=False)
        answers = [stop.requested() for _ in range(3)]
        stop.why = 'SIGTERM'
        answers += [stop.requested(), stop.requested()]
        assert answers == [None, None, None, None, 'SIGTERM']  # agreed one boundary later, by every process alike
        assert calls and all(device == 'cpu' and kw['async_op'] and kw['group'] is stop.group for device, kw in calls)
        assert dist.get_backend(stop.group) == 'gloo'
    finally:
        dist.destroy_process_group()
