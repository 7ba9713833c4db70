import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--device=cpu', '--compile=False', '--batch_size=2', '--n_layer=2', '--n_head=2', '--n_embd=32',
        '--block_size=32', '--vocab_size=65']


@pytest.fixture
def workdir(tmp_path):
    for name in ('bench.py', 'model.py', 'configurator.py', 'runtime.py'):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
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
