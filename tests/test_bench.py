import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

import runtime
from conftest import copy_repo, exit_message, write_bins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--device=cpu', '--compile=False', '--batch_size=2', '--n_layer=2', '--n_head=2', '--n_embd=32',
        '--block_size=32', '--vocab_size=65']


@pytest.fixture
def workdir(tmp_path):
    copy_repo(tmp_path)
    return tmp_path


def run_bench(cwd, *args):
    env = dict(os.environ, OMP_NUM_THREADS='1')  # one thread: tiny models, and a CPU shared with other jobs
    return subprocess.run([sys.executable, 'bench.py', *TINY, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_train_step_on_random_data_reports_speed_and_mfu(workdir):
    result = run_bench(workdir, '--real_data=False')
    assert result.returncode == 0, result.stderr
    assert 'MFU against' in result.stdout and 'measured just now' in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith('time per iteration: ') and 'tokens/s' in last and 'MFU' in last


@pytest.mark.slow
def test_train_step_on_real_data(workdir):
    os.makedirs(workdir / 'data' / 'tiny')
    np.random.randint(0, 65, 5000).astype(np.uint16).tofile(workdir / 'data' / 'tiny' / 'train.bin')
    result = run_bench(workdir, '--dataset=tiny')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith('time per iteration: ')


def test_real_data_takes_the_datasets_vocabulary_as_train_py_does(workdir):
    write_bins(workdir / 'data' / 'chars', np.random.randint(0, 65, 5000), np.random.randint(0, 65, 500),
               meta={'vocab_size': 65})
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, 'bench.py', *[a for a in TINY if not a.startswith('--vocab_size')],
                             '--dataset=chars'], cwd=workdir, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert 'found vocab_size = 65 (inside data/chars/meta.pkl)' in result.stdout
    first_loss = float(re.search(r'^0/10 loss: ([\d.]+)', result.stdout, re.M).group(1))
    assert first_loss < 5.0  # about ln(65) = 4.17; GPT-2's 50304 tokens would start near 10.8


@pytest.mark.slow
def test_missing_data_is_a_one_line_error(workdir):
    result = run_bench(workdir, '--dataset=nothere')
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert result.stderr.strip() == ("bench.py: no data/nothere/train.bin: run python data/nothere/prepare.py first, "
                                     "or pass --real_data=False")


@pytest.mark.slow
def test_profile_writes_a_trace(workdir):
    result = run_bench(workdir, '--real_data=False', '--profile=True')
    assert result.returncode == 0, result.stderr
    with open(workdir / 'trace_bench.json') as f:
        trace = json.load(f)
    assert any('aten::' in event.get('name', '') for event in trace['traceEvents'])


@pytest.mark.slow
def test_sample_mode_compares_cache_no_cache_and_hugging_face(workdir):
    result = run_bench(workdir, '--mode=sample', '--max_new_tokens=20', '--sample_rounds=2')
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count('round ') == 2
    summary = out.strip().splitlines()[-1]
    for part in ('KV cache', 'no cache (nanoGPT\'s loop)', 'Hugging Face generate', 'KV cache vs Hugging Face'):
        assert part in summary


@pytest.mark.slow
def test_sample_mode_refuses_lengths_past_block_size(workdir):
    result = run_bench(workdir, '--mode=sample', '--max_new_tokens=40')
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert 'past block_size 32' in result.stderr


FAKE_NANOGPT = '''import sys
for i in range(9):
    print(f"iter {i}: loss 4.0000, time {200 if i < 5 else 100}.00ms, mfu 0.00%")
print("step 8: train loss 3.0000, val loss 3.5000")
'''


@pytest.mark.slow
def test_bench_train_compares_ours_float32_and_nanogpt(tmp_path):
    """One quick-start run of each kind at a few iterations (a tiny stand-in for nanoGPT's train.py, which
    prints iter and step lines as it does): the summary names the CPU, each kind's median and the ratios."""
    copy_repo(tmp_path)  # data/shakespeare_char/ comes with its prepare.py
    for split in ('train', 'val'):
        np.random.randint(0, 65, 3000).astype(np.uint16).tofile(tmp_path / 'data' / 'shakespeare_char' / f'{split}.bin')
    with open(tmp_path / 'data' / 'shakespeare_char' / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 65}, f)
    (tmp_path / 'nanogpt').mkdir()
    (tmp_path / 'nanogpt' / 'train.py').write_text(FAKE_NANOGPT)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, 'bench_train.py', '--shapes=quick', '--quick_iters=8', '--repeats=1',
                             '--nanogpt_dir=nanogpt'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert 'CPU: ' in out and 'medians over 1 alternating runs' in out
    summary = out.split('medians over')[1]
    assert 'nanoGPT (float32)' in summary and '100.0 ms/iter (100.0-100.0)  val loss 3.5000' in summary
    # each row names its dtype; a float32 row of ours only where ours runs bfloat16 by default (one run, one row)
    auto = runtime.setup('cpu', 'auto', verbose=False, training=True).dtype
    others = r'[\d.]+x ours \(float32\), ' if auto == 'bfloat16' else ''
    assert re.search(rf'quick ours \({auto}\) .* ms/iter .*speed: {others}[\d.]+x nanoGPT \(float32\)\n', summary)
    assert len(re.findall(r'^quick ', summary, re.M)) == (3 if auto == 'bfloat16' else 2)
    assert ('no separate float32 row' in out) == (auto == 'float32')
    # --float32=False: ours and nanoGPT only
    result = subprocess.run([sys.executable, 'bench_train.py', '--shapes=quick', '--quick_iters=6', '--repeats=1',
                             '--nanogpt_dir=nanogpt', '--float32=False'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r'^quick ', result.stdout.split('medians over')[1], re.M)) == 2
    assert re.search(rf'quick ours \({auto}\) .*speed: [\d.]+x nanoGPT \(float32\)\n', result.stdout)
    if auto == 'bfloat16':  # oneDNN capped below bfloat16: ours runs float32, so one row of ours
        result = subprocess.run([sys.executable, 'bench_train.py', '--shapes=quick', '--quick_iters=6', '--repeats=1'],
                                cwd=tmp_path, env=dict(env, ONEDNN_MAX_CPU_ISA='AVX2'), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert 'no separate float32 row' in result.stdout and 'bfloat16' not in result.stdout


@pytest.mark.slow
def test_bench_train_without_data_is_a_one_line_error(tmp_path):
    copy_repo(tmp_path)
    result = subprocess.run([sys.executable, 'bench_train.py', '--shapes=gpt2'], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip() == (
        "bench_train.py: no data/text/train.bin for the gpt2 shape: run python data/text/prepare.py first (see --help)")


@pytest.mark.parametrize('args, fragment', [
    (['--batch_size=0'], 'batch_size=0 is not an integer >= 1'),
    (['--block_size=0'], 'block_size=0 is not an integer >= 1'),
    (['--n_head=0'], 'n_head=0 is not an integer >= 1'),
    (['--n_embd=33'], 'n_embd=33 is not a multiple of n_head=2'),
    (['--vocab_size=0'], 'vocab_size=0 is not an integer >= 1'),
    (['--mode=sample', '--max_new_tokens=0'], 'max_new_tokens=0 is not an integer >= 1'),
    (['--mode=sample', '--sample_rounds=0'], 'sample_rounds=0 is not an integer >= 1'),
    (['--mode=sample', '--top_k=0'], 'top_k=0 is not an integer >= 1'),
    (['--mode=sampel'], "mode='sampel' is not 'train' or 'sample'"),
    (['--gelu=exact'], "gelu='exact' is not 'erf' or 'tanh'"),
    (['--dtype=half'], "dtype='half' is not one of 'auto', 'float32', 'bfloat16', 'float16'"),
    (['--device=cuda0'], "device='cuda0' is not 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
])
def test_bad_settings_get_a_one_line_error(workdir, monkeypatch, args, fragment):
    assert fragment in exit_message(monkeypatch, workdir, 'bench.py', *TINY, '--real_data=False', *args)


@pytest.mark.parametrize('tokens, fragment', [
    pytest.param(bytes(2001), 'data/tiny/train.bin has an odd number of bytes', id='odd size'),
    pytest.param(np.full(100, 65, np.uint16).tobytes(), "data/tiny/train.bin holds token id 65, past the model's vocab_size 65",
                 id='ids past the vocabulary'),
])
def test_bad_data_files_get_a_one_line_error(workdir, monkeypatch, tokens, fragment):
    os.makedirs(workdir / 'data' / 'tiny')
    (workdir / 'data' / 'tiny' / 'train.bin').write_bytes(tokens)
    assert fragment in exit_message(monkeypatch, workdir, 'bench.py', *TINY, '--dataset=tiny')


@pytest.mark.parametrize('args, fragment', [
    (['--gpt2_iters=5'], 'gpt2_iters=5 is not an integer >= 6 (the first 5 iterations are not timed)'),
    (['--repeats=0'], 'repeats=0 is not an integer >= 1'),
])
def test_bench_train_bad_settings_get_a_one_line_error(workdir, monkeypatch, args, fragment):
    assert fragment in exit_message(monkeypatch, workdir, os.path.join(ROOT, 'bench_train.py'), *args)


class FakeGPU:
    """A stand-in for NVML's energy counter (energy.start's nvml): it moves 1 mJ at every read, as a real one moves
    with time, and by what each forward costs."""
    has_energy, name, value = True, 'fake', 0

    def energy_mj(self):
        self.value += 1
        return self.value


def test_energy_toggles_alternate_the_eight_runs_and_give_their_millijoules_per_token(tmp_path, monkeypatch, capsys):
    """bench.py --energy_toggles=True, its meter on a fake counter where an explicit-attention forward costs three
    times a flash one: the runs alternate round by round, and the printed mJ/token are those costs."""
    import runpy
    import energy
    import model
    gpu, order, forward = FakeGPU(), [], model.GPT.forward

    def costing_forward(self, *args, **kw):
        order.append((self.config.flash_attn, self.config.position))
        gpu.value += 10 * 8 * (1 if self.config.flash_attn else 3)  # 10 or 30 mJ for each of the 8 tokens
        return forward(self, *args, **kw)
    monkeypatch.setattr(model.GPT, 'forward', costing_forward)
    real_start = energy.start
    monkeypatch.setattr(energy, 'start', lambda device, **kw: real_start('cuda:0', verbose=False, nvml=gpu))
    monkeypatch.setenv('GOMP_SPINCOUNT', os.environ.get('GOMP_SPINCOUNT', '1000'))  # (bench.py sets it otherwise)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['bench.py', '--device=cpu', '--compile=False', '--dtype=float32', '--real_data=False',
                                      '--batch_size=1', '--block_size=8', '--n_layer=1', '--n_head=2', '--n_embd=16',
                                      '--vocab_size=16', '--energy_toggles=True', '--energy_rounds=3', '--energy_seconds=0.02'])
    runpy.run_path(os.path.join(ROOT, 'bench.py'), run_name='__main__')
    runs = [(flash, position) for position in ('learned', 'alibi', 'rope', 'none') for flash in (True, False)]
    firsts = [order[0]] + [b for a, b in zip(order, order[1:]) if a != b]
    # a warm-up step each, then rounds forwards, backwards, forwards (a run that ends a round starts the next)
    assert firsts == runs + runs + runs[::-1][1:] + runs[1:]
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith('round ') for line in lines) == 3
    for flash, position in runs:
        summary, = [line for line in lines if line.startswith(f"position={position} flash_attn={flash}: ")]
        assert summary.endswith(' W, median (min-max) of 3'), summary
        assert float(summary.split(': ')[1].split(' ')[0]) == pytest.approx(10 if flash else 30, rel=0.1), summary


FAKE_NANOGPT_TO_TARGET = '''import os
seeds = []
class torch:  # a stand-in for nanoGPT's train.py: the lines bench_target.py patches, then its kind of output
    manual_seed = staticmethod(seeds.append)
seed_offset = 0
torch.manual_seed(1337 + seed_offset)
def get_batch(split):
    ix = torch.randint(len(data) - block_size, (batch_size,))
def estimate_loss():
    for split in ['train', 'val']:
        if True:
            X, Y = get_batch(split)
print("tokens per iteration will be: 768")
for step in range(0, 300, 50):  # seed N reaches 1.88 at step 50 N: the patched seed line took the benchmark's seed
    print(f"step {step}: train loss 4.0, val loss {1.8 if step >= 50 * seeds[0] else 4.0:.4f}")
'''


@pytest.mark.slow
def test_bench_target_stops_each_run_at_its_target_and_goes_on_where_it_stopped(tmp_path):
    """nanoGPT (a stand-in with the lines the benchmark patches), ours with AdamW and with Muon, at the quick shape
    on a repeated phrase: each run stops at its first evaluation under the target and is appended to the results;
    a second invocation repeats none and prints the table; a failing run is one line."""
    copy_repo(tmp_path)
    phrase = np.random.default_rng(0).integers(0, 65, 50)
    write_bins(tmp_path / 'data' / 'shakespeare_char', np.tile(phrase, 200), np.tile(phrase, 40), {'vocab_size': 65})
    (tmp_path / 'nanogpt').mkdir()
    (tmp_path / 'nanogpt' / 'train.py').write_text(FAKE_NANOGPT_TO_TARGET)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    bench = lambda *args: subprocess.run([sys.executable, 'bench_target.py', '--nanogpt_dir=nanogpt', '--seeds=1,2',
                                          '--eval_interval=10', '--results=runs.jsonl', *args], cwd=tmp_path, env=env,
                                         capture_output=True, text=True, timeout=600)
    result = bench('--target=3.0', '--kinds=nanogpt', '--seeds=1')  # one run, then the rest
    assert result.returncode == 0, result.stderr
    result = bench('--target=3.0')
    assert result.returncode == 0, result.stderr
    runs = [json.loads(line) for line in open(tmp_path / 'runs.jsonl')]
    assert [(r['kind'], r['seed']) for r in runs] == [('nanogpt', 1), ('adamw', 1), ('muon', 1), ('nanogpt', 2),
                                                      ('adamw', 2), ('muon', 2)]  # alternating; nanoGPT's seed 1 not again
    assert all(r['reached'] and r['val_loss'] <= 3.0 for r in runs)
    assert [(r['iters'], r['tokens']) for r in runs if r['kind'] == 'nanogpt'] == [(50, 50 * 768), (100, 100 * 768)]
    for r in runs[1:3] + runs[4:]:  # ours: stopped at the first evaluation under the target (the phrase is learnt fast)
        assert 0 < r['iters'] < 300 and r['iters'] % 10 == 0 and r['tokens'] == r['iters'] * 12 * 64
    again = bench('--target=3.0', '--budget_s=0')  # nothing left to run: the table of the six
    assert again.returncode == 0 and len(open(tmp_path / 'runs.jsonl').readlines()) == 6
    assert not re.search(r'^\w+ +seed \d+:', again.stdout, re.M)
    assert again.stdout.split('| run |')[1] == result.stdout.split('| run |')[1]
    assert re.search(r'\| nanoGPT \| 2/2 \(1,2\) \| 75 \(50-100\) \|', again.stdout)
    assert re.search(r'\| ours, Muon \| 2/2 \(1,2\) \| .* \| [\d.]+ \([\d.]+x faster\) \|$', again.stdout, re.M)
    short = bench('--target=3.0', '--seeds=4', '--budget_s=0')  # the budget is checked before each run
    assert 'budget_s=0 spent: run the same command again' in short.stdout
    assert len(open(tmp_path / 'runs.jsonl').readlines()) == 6
    failed = bench('--kinds=muon', '--muon_flags=--muon_lr=-1', '--seeds=3')
    assert failed.returncode == 1 and 'Traceback' not in failed.stderr
    assert failed.stderr.strip() == "bench_target.py: the muon run (seed 3) failed: train.py: muon_lr=-1.0 is not a number >= 0"
