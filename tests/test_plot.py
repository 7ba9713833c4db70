import json
import os
import math
import subprocess
import sys

import pytest

from conftest import ROOT, exit_message


def write_log(out_dir, records, tail=''):
    out_dir.mkdir()
    with open(out_dir / 'log.jsonl', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
        f.write(tail)


def training_records(steps, eval_every, start_loss):
    records = []
    for step in steps:
        loss = start_loss * math.exp(-step / 50)
        if step % eval_every == 0:
            records.append(dict(step=step, train_loss=loss, val_loss=loss + 0.1, lr=1e-3))
        records.append(dict(iter=step, loss=loss, time_ms=10.0, mfu=0.01, tokens_per_sec=1000.0, lr=1e-3))
    return records


def run(*args, env=None):
    return subprocess.run([sys.executable, 'plot.py', *args], capture_output=True, text=True, cwd=ROOT, env=env)


def test_plots_several_runs_into_a_png(tmp_path):
    pytest.importorskip('matplotlib')
    write_log(tmp_path / 'out-learned', training_records(range(0, 101), 20, 4.0))
    # resumed from its step-40 checkpoint after reaching step 60: steps 41..60 come twice, the later ones count;
    # and a half-written last line, as while training still runs
    first = training_records(range(0, 61), 20, 4.2)
    resumed = [dict(r, **({'val_loss': 9.0} if 'step' in r else {})) for r in training_records(range(41, 81), 20, 4.2)]
    write_log(tmp_path / 'out-alibi', first + resumed, tail='{"iter": 81, "lo')
    png = tmp_path / 'assets' / 'loss.png'
    proc = run(f'--out_dirs={tmp_path / "out-learned"},{tmp_path / "out-alibi" / "log.jsonl"}', f'--out={png}')
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10_000
    last_val = 4.0 * math.exp(-100 / 50) + 0.1
    assert f'out-learned: 101 iterations, 6 evaluations, last val loss {last_val:.4f} at step 100' in proc.stdout
    assert 'out-alibi: 81 iterations, 5 evaluations, last val loss 9.0000 at step 80' in proc.stdout


def test_missing_log_is_a_one_line_error(tmp_path):
    proc = run(f'--out_dirs={tmp_path}', f'--out={tmp_path / "loss.png"}')
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip() == f"plot.py: no {tmp_path / 'log.jsonl'}: train with train.py first (it writes log.jsonl in its out_dir)"


def test_without_matplotlib_says_how_to_install_it(tmp_path):
    (tmp_path / 'matplotlib').mkdir()
    (tmp_path / 'matplotlib' / '__init__.py').write_text("raise ImportError('No module named matplotlib')\n")
    proc = run(f'--out={tmp_path / "loss.png"}', env={'PYTHONPATH': str(tmp_path), 'PATH': ''})
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip() == 'plot.py: needs matplotlib: pip install matplotlib'


@pytest.mark.parametrize('args, fragment', [
    (['--smooth=1.0'], 'smooth=1.0 is not in [0, 1) (0: no smoothing)'),
    (['--smooth=-0.5'], 'smooth=-0.5 is not in [0, 1)'),
    (['--out_dirs='], "out_dirs='' is not a comma-separated list of out_dirs"),
    (['--out_dirs=out-a,'], "out_dirs='out-a,' is not a comma-separated list of out_dirs"),
    (['--out='], "out='' is not a file name for the PNG"),
    (['--out=.'], "out='.' is not a file name for the PNG"),
])
def test_bad_settings_get_a_one_line_error(tmp_path, monkeypatch, args, fragment):
    import shutil
    shutil.copy(os.path.join(ROOT, 'configurator.py'), tmp_path)
    write_log(tmp_path / 'out', training_records(range(0, 11), 5, 4.0))
    assert fragment in exit_message(monkeypatch, tmp_path, os.path.join(ROOT, 'plot.py'), '--out_dirs=out', *args)

