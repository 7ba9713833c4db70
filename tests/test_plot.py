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



def smoothed_train_loss(stdout, label):
    line = next(line for line in stdout.splitlines() if line.startswith(f'{label}: '))
    return float(line.split('smoothed train loss ')[1].split()[0])


def test_smoothing_is_per_iteration_whatever_the_log_interval(tmp_path):
    """A loss falling by 0.002 an iteration, logged every iteration and every 10th: both smoothed curves end within a
    few iterations' worth of the last loss (3.0), as an average over iterations should, instead of 90 iterations behind."""
    pytest.importorskip('matplotlib')
    for name, interval in (('every-1', 1), ('every-10', 10)):
        write_log(tmp_path / name, [dict(iter=it, loss=5.0 - 0.002 * it, time_ms=10.0, mfu=0.01, tokens_per_sec=1000.0, lr=1e-3)
                                    for it in range(0, 1001, interval)] + [dict(step=1001, train_loss=3.0, val_loss=3.1, lr=1e-3)])
    proc = run(f'--out_dirs={tmp_path / "every-1"},{tmp_path / "every-10"}', f'--out={tmp_path / "loss.png"}')
    assert proc.returncode == 0, proc.stderr
    assert 'every-1: 1001 iterations, 1 evaluations' in proc.stdout
    assert 'every-10: 1001 iterations (101 logged), 1 evaluations' in proc.stdout  # iterations, not logged lines
    # an EMA of 0.9 per iteration lags a linear fall by 0.9 / 0.1 = 9 iterations: 3.018; per logged line it would be 90 (3.18)
    assert smoothed_train_loss(proc.stdout, 'every-1') == pytest.approx(3.018, abs=1e-3)
    assert 3.0 < smoothed_train_loss(proc.stdout, 'every-10') < 3.02


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    return int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')


@pytest.mark.slow
def test_hellaswag_gets_a_panel_with_reference_lines(tmp_path):
    pytest.importorskip('matplotlib')
    records = training_records(range(0, 101), 25, 4.0)
    records += [dict(step=s, hellaswag_acc=0.25 + s / 2000, hellaswag_acc_norm=0.25 + s / 1000) for s in range(0, 101, 25)]
    write_log(tmp_path / 'out-gpt2-fineweb', records)
    plain, lines = tmp_path / 'plain.png', tmp_path / 'lines.png'
    proc = run(f'--out_dirs={tmp_path / "out-gpt2-fineweb"}', f'--out={plain}', '--gpt2_hellaswag=None')
    assert proc.returncode == 0, proc.stderr
    assert 'out-gpt2-fineweb: 101 iterations, 5 evaluations' in proc.stdout and 'HellaSwag acc_norm 0.3500 at step 100' in proc.stdout
    proc = run(f'--out_dirs={tmp_path / "out-gpt2-fineweb"}', f'--out={lines}', '--gpt2_val_loss=3.2924',
               '--reference=GPT-3 124M=0.337,seed 2=0.31', '--loss_reference=llm.c 10B=3.28')
    assert proc.returncode == 0, proc.stderr
    assert png_size(plain) == png_size(lines)
    assert png_size(plain)[0] == 16 * 120  # three panels: train loss, val loss, HellaSwag
    assert plain.read_bytes() != lines.read_bytes()
    # without HellaSwag records: the two loss panels, as before
    write_log(tmp_path / 'out-char', training_records(range(0, 11), 5, 4.0))
    assert run(f'--out_dirs={tmp_path / "out-char"}', f'--out={plain}').returncode == 0
    assert png_size(plain)[0] == 11 * 120


@pytest.mark.parametrize('args, fragment', [
    (['--reference=GPT-3 124M'], "reference='GPT-3 124M' is not 'name=value'"),
    (['--reference==0.3'], "reference='=0.3' is not 'name=value'"),
    (['--loss_reference=llm.c=low'], "loss_reference='llm.c=low' is not 'name=value'"),
    (['--gpt2_val_loss=-3.0'], 'gpt2_val_loss=-3.0 is not a number > 0, or None'),
    (['--gpt2_hellaswag=high'], "gpt2_hellaswag expects float (default 0.2955), got str 'high'"),
    (['--gpt2_hellaswag=True'], 'gpt2_hellaswag expects float'),
])
def test_bad_reference_lines_get_a_one_line_error(tmp_path, monkeypatch, args, fragment):
    import shutil
    shutil.copy(os.path.join(ROOT, 'configurator.py'), tmp_path)
    write_log(tmp_path / 'out', training_records(range(0, 11), 5, 4.0))
    assert fragment in exit_message(monkeypatch, tmp_path, os.path.join(ROOT, 'plot.py'), '--out_dirs=out', *args)
