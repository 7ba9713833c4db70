"""bench_gpu.py, the GPU check, at a tiny shape on this CPU (its twin in CI, so that the GPU run never rots): every run
it makes, and the one table with the GPU run's columns."""
import os
import re
import shutil

from conftest import ROOT, copy_repo, run_script

HEADER = "| run | ms/iter | tokens/s | MFU | peak memory | mJ/token | notes |"
# two of the four training variants and one sampling batch: every kind of run, in fewer processes (each costs seconds)
TWIN = ['--device=cpu', '--shape=tiny', '--compile=False', '--shakespeare_iters=10', '--variants=learned sdpa, ALiBi explicit',
        '--sample_batches=1']
RUNS = ['train step, learned, sdpa', 'train step, ALiBi, explicit', 'train step, learned, sdpa, eager', 'sample, batch 1',
        'train.py config/train_shakespeare_char.py, 10 iters', 'tests/test_cuda.py']


def scratch_repo(tmp_path):
    copy_repo(tmp_path)
    os.makedirs(tmp_path / 'tests')
    for name in ('conftest.py', 'test_cuda.py'):
        shutil.copy(os.path.join(ROOT, 'tests', name), tmp_path / 'tests')
    return tmp_path


def table_of(stdout):
    lines = stdout.splitlines()
    start = lines.index(HEADER)
    return lines[start:start + 2 + len(RUNS)]


def test_the_gpu_check_at_a_tiny_shape_on_a_cpu(tmp_path):
    repo = scratch_repo(tmp_path)
    result = run_script(repo, 'bench_gpu.py', *TWIN, f'--table={tmp_path / "table.md"}', timeout=600, check=True)
    table = table_of(result.stdout)
    assert (tmp_path / 'table.md').read_text() == '\n'.join(table) + '\n'
    cells = [[cell.strip() for cell in line.strip('|').split('|')] for line in table[2:]]
    rows = {cells[0]: cells[1:] for cells in cells}
    assert [name.split(', KV cache')[0] for name in rows] == RUNS
    for name in RUNS[:2]:  # the figures of bench.py's train mode; peak memory and energy are not measured here
        ms, tokens, mfu, peak, mj, note = rows[name]
        assert float(ms) > 0 and int(tokens.replace(',', '')) > 0 and re.fullmatch(r'[\d.]+%', mfu), rows[name]
        assert peak == 'n/a (CUDA only)' and mj == 'n/a' and note.startswith('explicit attention')  # a CPU's bfloat16 plan
    assert 'memory.py predicts ' in rows['train step, learned, sdpa'][5]
    assert 'peak memory is measured on CUDA only; memory.py predicts ' in rows['train step, learned, sdpa, eager'][5]
    _, tokens, _, _, _, note = rows['sample, batch 1, KV cache']
    assert float(tokens.split()[0]) > 0 and re.match(r"Hugging Face generate [\d.]+ \(.*\) tokens/s: ours [\d.]+x", note)
    shakespeare = rows['train.py config/train_shakespeare_char.py, 10 iters']
    assert re.match(r"\*\*val loss [\d.]+\*\* on Python's documentation as characters", shakespeare[5])  # no Tiny Shakespeare here
    assert re.match(r'1 skipped in ', rows['tests/test_cuda.py'][5])  # no CUDA: the whole file, with its reason
    assert 'skipped (time budget): nothing' in result.stdout
    assert re.search(r'^GPU check, .*: cpu, .*; shape tiny: .*s of a 420 s budget', result.stdout, re.M)


def test_a_short_budget_skips_the_runs_and_says_which(tmp_path):
    repo = scratch_repo(tmp_path)
    result = run_script(repo, 'bench_gpu.py', *TWIN, '--budget_s=1', timeout=120, check=True)
    rows = table_of(result.stdout)[2:]
    assert all(row.endswith('| skipped: not enough of the budget left |') for row in rows if 'eager' not in row), rows
    skipped = result.stdout.split('skipped (time budget): ')[1].splitlines()[0]
    for run in ('tests/test_cuda.py', 'shakespeare_char, 10 iters', 'train step, ALiBi, explicit', 'sample, batch 1'):
        assert re.search(re.escape(run) + r': needs about \d+ s, \d+ s of the budget left', skipped), skipped
    assert not os.path.exists(repo / 'data' / 'bench_gpu_text')  # nothing prepared for a run that did not start
