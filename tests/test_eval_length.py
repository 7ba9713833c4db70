import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, exit_message, tmpfs
from model import GPT, GPTConfig

VOCAB = 50


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    """A project directory as train.py leaves it: data/tiny/val.bin and two trained-at-16 checkpoints,
    with learned positions, ALiBi (as older checkpoints say it: alibi=True), RoPE and none."""
    root = tmp_path_factory.mktemp('project')
    shutil.copy(os.path.join(ROOT, 'configurator.py'), root)
    (root / 'data' / 'tiny').mkdir(parents=True)
    rng = np.random.default_rng(0)
    rng.integers(0, VOCAB, 3000).astype(np.uint16).tofile(root / 'data' / 'tiny' / 'val.bin')
    for name, position in [('out-learned', {}), ('out-alibi', dict(alibi=True)), ('out-rope', dict(position='rope')),
                           ('out-none', dict(position='none'))]:
        torch.manual_seed(0)
        model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False, vocab_size=VOCAB,
                          dropout=0.0, flash_attn=True, gelu='erf', **position)
        (root / name).mkdir()
        torch.save(dict(model=GPT(GPTConfig(**model_args)).state_dict(), model_args=model_args, iter_num=0,
                        config=dict(dataset='tiny', block_size=16)), root / name / 'ckpt.pt')
    return root


def run(project, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'eval_length.py'), '--device=cpu', '--dtype=float32', *args],
                          capture_output=True, text=True, cwd=project)


def expected_loss(project, out_dir, length, n):
    """Mean next-token loss over the first n val tokens cut into windows of length, computed here."""
    ckpt = torch.load(project / out_dir / 'ckpt.pt', weights_only=True)
    model = GPT(GPTConfig(**ckpt['model_args'])).eval()
    model.load_state_dict(ckpt['model'])
    data = torch.from_numpy(np.fromfile(project / 'data' / 'tiny' / 'val.bin', dtype=np.uint16).astype(np.int64))
    with torch.no_grad():
        _, loss = model(data[:n].view(-1, length), data[1:n + 1].view(-1, length))
    return loss.item()


@pytest.mark.slow
@pytest.mark.parametrize('position', ['alibi', 'rope', 'none'])
def test_positions_without_a_table_are_evaluated_past_the_block_size(project, position):
    proc = run(project, f'--out_dir=out-{position}', f'--json_out={position}.json', '--num_tokens=2048', '--batch_tokens=256')
    assert proc.returncode == 0, proc.stderr
    out = json.loads((project / f'{position}.json').read_text())
    assert out['position'] == position and out['alibi'] == (position == 'alibi')
    assert out['block_size'] == 16 and out['tokens'] == 2048
    assert [r['length'] for r in out['results']] == [8, 16, 32, 64]
    for r in out['results']:
        assert r['loss'] == pytest.approx(expected_loss(project, f'out-{position}', r['length'], 2048), abs=1e-5)
    assert '     64       4x  ' in proc.stdout and f'(position={position}, block_size 16)' in proc.stdout


@pytest.mark.slow
def test_learned_positions_stop_at_block_size(project):
    proc = run(project, '--out_dir=out-learned', '--lengths=8,16,32,5000', '--json_out=learned.json')
    assert proc.returncode == 0, proc.stderr
    out = json.loads((project / 'learned.json').read_text())
    by_length = {r['length']: r for r in out['results']}
    # the same tokens as with the lengths an ALiBi model can use: 5000 does not fit in val.bin
    n = (3000 - 1) // 32 * 32  # the tokens with a target, rounded down to a multiple of 8, 16 and 32
    assert out['tokens'] == n
    for L in (8, 16):
        assert by_length[L]['loss'] == pytest.approx(expected_loss(project, 'out-learned', L, n), abs=1e-5)
    assert by_length[32]['loss'] is None and 'block_size=16' in by_length[32]['note']
    assert by_length[5000]['loss'] is None and 'has only 3000 tokens' in by_length[5000]['note']
    assert 'n/a (learned positions stop at block_size=16)' in proc.stdout


@pytest.mark.slow
def test_bad_input_is_one_line(project):
    proc = run(project, '--out_dir=out-missing')
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["eval_length.py: no checkpoint out-missing/ckpt.pt: train one first (python train.py --out_dir=out-missing ...), "
                                              "or pass --out_dir=<the run's directory>"]


@pytest.mark.parametrize('args, fragment', [
    (['--dataset=absent'], 'no data/absent/val.bin: run python data/absent/prepare.py'),
    (['--lengths=64,x'], "lengths='64,x' is not a list of positive integers like '64,128,256'"),
    (['--lengths=0'], "lengths='0' is not a list of positive integers"),
    (['--num_tokens=0'], 'num_tokens=0 is not an integer >= 1'),
    (['--batch_tokens=-1'], 'batch_tokens=-1 is not an integer >= 1'),
    (['--dtype=float64'], "dtype='float64' is not one of 'auto', 'float32', 'bfloat16', 'float16'"),
    (['--device=gpu'], "device='gpu' is not 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    (['--dataset=odd'], 'data/odd/val.bin has an odd number of bytes'),
    (['--dataset=wide'], f'data/wide/val.bin holds token id {VOCAB}, past the model\'s vocab_size {VOCAB}'),
])
def test_bad_settings_and_data_files_get_a_one_line_error(project, monkeypatch, args, fragment):
    for name, data in [('odd', bytes(3001)), ('wide', np.full(200, VOCAB, np.uint16).tobytes())]:
        (project / 'data' / name).mkdir(exist_ok=True)
        (project / 'data' / name / 'val.bin').write_bytes(data)
    message = exit_message(monkeypatch, project, os.path.join(ROOT, 'eval_length.py'), '--device=cpu', '--out_dir=out-alibi', *args)
    assert fragment in message


# ----------------------------------------------------------------------------- issue 21: json_out checked first, written whole

@pytest.fixture
def disk(tmp_path):
    """A real 1 MiB tmpfs at tmp_path/disk (root only: skipped where mount is refused), unmounted after."""
    with tmpfs(tmp_path / 'disk', '1m') as path:
        yield path


def test_unwritable_json_out_is_refused_before_evaluating(project, tmp_path, disk, monkeypatch, capsys):
    (tmp_path / 'afile').write_text('a file')
    (tmp_path / 'afolder').mkdir()
    (disk / 'old.json').write_text('{"old": 1}')
    subprocess.run(['mount', '-o', 'remount,ro', str(disk)], check=True)
    cases = [(tmp_path / 'afolder', 'a folder'), (tmp_path / 'afile' / 'x.json', 'not a directory'),
             (tmp_path / 'afile' / 'sub' / 'x.json', 'not a directory'), (disk / 'new.json', 'not writable'),
             (disk / 'old.json', 'not writable')]
    for path, cause in cases:
        capsys.readouterr()
        message = exit_message(monkeypatch, project, os.path.join(ROOT, 'eval_length.py'), '--device=cpu',
                               '--out_dir=out-alibi', f'--json_out={path}')
        assert message.startswith(f'eval_length.py: cannot write json_out={path}: {cause}'), message
        assert 'val loss' not in capsys.readouterr().out  # nothing was evaluated
    assert (tmp_path / 'afile').read_text() == 'a file' and os.listdir(tmp_path / 'afolder') == []
    assert os.listdir(disk) == ['old.json'] and (disk / 'old.json').read_text() == '{"old": 1}'


@pytest.mark.slow
def test_json_out_is_replaced_whole(project, tmp_path):
    path = tmp_path / 'length.json'
    path.write_text('{"old": 1}')
    inode = os.stat(path).st_ino
    proc = run(project, '--out_dir=out-alibi', '--lengths=8,16', '--num_tokens=256', f'--json_out={path}')
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(path.read_text())
    assert [r['length'] for r in summary['results']] == [8, 16] and summary['tokens'] == 256
    assert os.stat(path).st_ino != inode and os.listdir(tmp_path) == ['length.json']  # renamed over, no .tmp


@pytest.mark.slow
def test_json_out_on_a_full_disk_keeps_the_old_file(project, disk):
    (disk / 'length.json').write_text('{"old": 1}')
    with open(disk / 'filler', 'wb', buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError:
            pass
    proc = run(project, '--out_dir=out-alibi', '--lengths=8,16', '--num_tokens=256', f'--json_out={disk}/length.json')
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f'eval_length.py: cannot write json_out={disk}/length.json: '
                                                f'no space left on device']
    assert sorted(os.listdir(disk)) == ['filler', 'length.json'] and (disk / 'length.json').read_text() == '{"old": 1}'
