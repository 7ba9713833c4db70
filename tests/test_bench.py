import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

import runtime
from conftest import copy_repo, exit_message

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


def test_train_step_on_random_data_reports_speed_and_mfu(workdir):
    result = run_bench(workdir, '--real_data=False')
    assert result.returncode == 0, result.stderr
    assert 'MFU against' in result.stdout and 'measured just now' in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith('time per iteration: ') and 'tokens/s' in last and 'MFU' in last


def test_train_step_on_real_data(workdir):
    os.makedirs(workdir / 'data' / 'tiny')
    np.random.randint(0, 65, 5000).astype(np.uint16).tofile(workdir / 'data' / 'tiny' / 'train.bin')
    result = run_bench(workdir, '--dataset=tiny')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith('time per iteration: ')


def test_missing_data_is_a_one_line_error(workdir):
    result = run_bench(workdir, '--dataset=nothere')
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert result.stderr.strip() == ("bench.py: no data/nothere/train.bin: run python data/nothere/prepare.py first, "
                                     "or pass --real_data=False")


def test_profile_writes_a_trace(workdir):
    result = run_bench(workdir, '--real_data=False', '--profile=True')
    assert result.returncode == 0, result.stderr
    with open(workdir / 'trace_bench.json') as f:
        trace = json.load(f)
    assert any('aten::' in event.get('name', '') for event in trace['traceEvents'])


def test_sample_mode_compares_cache_no_cache_and_hugging_face(workdir):
    result = run_bench(workdir, '--mode=sample', '--max_new_tokens=20', '--sample_rounds=2')
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count('round ') == 2
    summary = out.strip().splitlines()[-1]
    for part in ('KV cache', 'no cache (nanoGPT\'s loop)', 'Hugging Face generate', 'KV cache vs Hugging Face'):
        assert part in summary


def test_sample_mode_refuses_lengths_past_block_size(workdir):
    result = run_bench(workdir, '--mode=sample', '--max_new_tokens=40')
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert 'past block_size 32' in result.stderr


FAKE_NANOGPT = '''import sys
for i in range(9):
    print(f"iter {i}: loss 4.0000, time {200 if i < 5 else 100}.00ms, mfu 0.00%")
print("step 8: train loss 3.0000, val loss 3.5000")
'''


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
