import json
import os
import pickle
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import copy_repo, exit_message, save_tiny_run, tiny_model, tmpfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["Hello world! It's 3.14 o'clock,   isn't it?\n\n\tTabs\tand  spaces   ",
         "naïve café, 東京, Ελληνικά, emoji 🙂🚀 and zero\u200bwidth",
         "def f(x):\n    return x ** 2  # squared\r\n",
         "one<|endoftext|>two <|endoftext|> three"]


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py


@pytest.fixture
def repo(tmp_path):
    copy_repo(tmp_path)
    return tmp_path


def run(repo, script, *args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, script, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def export(repo, monkeypatch, capsys, *args):
    """Runs export_hf.py in this process (transformers is imported once for all tests); returns its output."""
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, 'argv', ['export_hf.py', '--out_dir=out', '--hf_dir=hf', *args])
    capsys.readouterr()
    runpy.run_path('export_hf.py', run_name='__main__')
    return capsys.readouterr().out


def ids(length, vocab, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, vocab, (2, length)))


def full_logits(model, x):
    with torch.no_grad():
        return model(x, targets=x)[0]  # with targets: the logits at every position


@pytest.mark.slow
@pytest.mark.parametrize('bias,gelu', [(False, 'erf'), (True, 'erf'), (True, 'tanh')])
def test_bpe_export_gives_our_logits_in_transformers(repo, monkeypatch, capsys, bias, gelu):
    from transformers import AutoModelForCausalLM
    model = tiny_model(bias=bias, gelu=gelu)
    save_tiny_run(str(repo / 'out' / 'ckpt.pt'), model, 'somebpe')
    export(repo, monkeypatch, capsys)
    hf = AutoModelForCausalLM.from_pretrained(repo / 'hf').eval()
    assert hf.config.vocab_size == 50304 and hf.config.n_positions == 16  # the padded rows are there
    assert hf.config.activation_function == {'erf': 'gelu', 'tanh': 'gelu_new'}[gelu]
    x = ids(16, 50304)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, full_logits(model, x), rtol=1e-5, atol=1e-4)
    assert not [p for p in os.listdir(repo) if '.tmp-' in p]  # the temporary directory was renamed


@pytest.mark.slow
def test_exported_tokenizer_is_gpt2s_and_matches_tiktoken(repo, monkeypatch, capsys):
    import tiktoken
    from transformers import AutoTokenizer, GPT2Tokenizer
    save_tiny_run(str(repo / 'out' / 'ckpt.pt'), tiny_model(), 'somebpe')
    export(repo, monkeypatch, capsys)
    enc = tiktoken.get_encoding('gpt2')
    for tokenizer in (AutoTokenizer.from_pretrained(repo / 'hf'), GPT2Tokenizer.from_pretrained(repo / 'hf')):
        assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
        for text in TEXTS:
            token_ids = tokenizer(text)['input_ids']
            assert token_ids == enc.encode(text, allowed_special='all'), text
            assert tokenizer.decode(token_ids) == text
    # the files are OpenAI's, where tiktoken's cache holds them (encoder.json and vocab.bpe under hashed names)
    cache = os.environ.get('TIKTOKEN_CACHE_DIR', '')
    checked = 0
    for name in os.listdir(cache) if os.path.isdir(cache) else []:
        with open(os.path.join(cache, name), 'rb') as f:
            raw = f.read()
        if raw.startswith(b'{'):
            assert json.loads(raw) == json.load(open(repo / 'hf' / 'vocab.json', encoding='utf-8'))
            checked += 1
        elif raw.startswith(b'#version'):
            assert raw.decode().split('\n')[1:50001] == open(repo / 'hf' / 'merges.txt', encoding='utf-8').read().split('\n')[1:50001]
            checked += 1
    assert checked == 2 or not os.path.isdir(cache)


@pytest.mark.slow
def test_init_from_the_export_gives_our_loss_and_trains(repo, monkeypatch, capsys):
    model = tiny_model(bias=False)
    save_tiny_run(str(repo / 'out' / 'ckpt.pt'), model, 'somebpe')
    export(repo, monkeypatch, capsys)
    data = np.random.default_rng(1).integers(0, 50257, 200).astype(np.uint16)
    os.makedirs(repo / 'data' / 'somebpe')
    data.tofile(repo / 'data' / 'somebpe' / 'train.bin')
    data[:17].tofile(repo / 'data' / 'somebpe' / 'val.bin')
    result = run(repo, 'train.py', '--init_from=hf', '--out_dir=out2', '--dataset=somebpe', '--device=cpu',
                 '--compile=False', '--dtype=float32', '--block_size=16', '--batch_size=2', '--gradient_accumulation_steps=1',
                 '--eval_iters=1', '--eval_interval=2', '--max_iters=2', '--learning_rate=1e-3')
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in open(repo / 'out2' / 'log.jsonl')]
    x = torch.from_numpy(data[:17].astype(np.int64))[None]
    with torch.no_grad():
        expected = model(x[:, :16], targets=x[:, 1:])[1].item()
    assert log[0]['step'] == 0 and log[0]['val_loss'] == pytest.approx(expected, rel=1e-5)
    assert log[-1]['step'] == 2 and np.isfinite(log[-1]['val_loss']) and (repo / 'out2' / 'ckpt.pt').exists()
    # sample.py from the export: greedy, its tokens are our model's
    result = run(repo, 'sample.py', '--init_from=hf', '--device=cpu', '--dtype=float32', '--start=Hello',
                 '--top_k=1', '--num_samples=1', '--max_new_tokens=8')
    assert result.returncode == 0, result.stderr[-3000:]
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    out = model.generate(torch.tensor([enc.encode('Hello')]), 8, top_k=1)[0].tolist()
    expected_text = enc.decode([i for i in out if i < 50256] if 50256 not in out else out[:out.index(50256)])
    assert expected_text in result.stdout


@pytest.mark.parametrize('position', [dict(alibi=True), dict(position='rope'), dict(position='none')])
def test_export_without_learned_positions_is_refused_and_writes_nothing(repo, monkeypatch, position):
    save_tiny_run(str(repo / 'out' / 'ckpt.pt'), tiny_model(**position), 'somebpe')
    message = exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', '--hf_dir=hf')  # and no file written
    assert f"position='{position.get('position', 'alibi')}' model" in message and 'only learned positions' in message
    assert not os.path.exists(repo / 'hf')


@pytest.mark.slow
def test_existing_hf_dir_is_kept_unless_overwrite(repo, monkeypatch, capsys):
    save_tiny_run(str(repo / 'out' / 'ckpt.pt'), tiny_model(vocab_size=50257), 'somebpe')
    export(repo, monkeypatch, capsys)
    (repo / 'hf' / 'mine.txt').write_text('keep me')
    assert '--overwrite=True' in exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', '--hf_dir=hf')
    os.makedirs(repo / 'other')
    (repo / 'other' / 'mine.txt').write_text('keep me')
    assert 'not an exported model' in exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', '--hf_dir=other',
                                                   '--overwrite=True')
    assert 'hf_dir=' in exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', '--hf_dir=out', '--overwrite=True')
    assert os.listdir(repo / 'other') == ['mine.txt'] and 'mine.txt' in os.listdir(repo / 'hf')
    # --overwrite=True never deletes what an export did not write: refused, naming the file, nothing changed
    before = snapshot(repo / 'hf')
    message = exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', '--hf_dir=hf', '--overwrite=True')
    assert 'holds files an export does not write (mine.txt)' in message
    assert snapshot(repo / 'hf') == before
    os.remove(repo / 'hf' / 'mine.txt')
    export(repo, monkeypatch, capsys, '--overwrite=True')
    assert 'model.safetensors' in os.listdir(repo / 'hf')
    assert not [p for p in os.listdir(repo) if '.tmp-' in p]


@pytest.mark.slow
def test_character_level_export_keeps_meta_pkl_as_its_vocabulary(repo, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM
    chars = sorted(set("hello world\n"))
    meta = {'vocab_size': len(chars), 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}}
    os.makedirs(repo / 'data' / 'tinychars')
    with open(repo / 'data' / 'tinychars' / 'meta.pkl', 'wb') as f:
        pickle.dump(meta, f)
    model = tiny_model(vocab_size=len(chars))
    save_tiny_run(str(repo / 'out' / 'ckpt.pt'), model, 'tinychars')
    out = export(repo, monkeypatch, capsys)
    assert 'the vocabulary is data/tinychars/meta.pkl' in out and 'not a Hugging Face tokenizer' in out
    with open(repo / 'hf' / 'meta.pkl', 'rb') as f:
        assert pickle.load(f) == meta
    assert not (repo / 'hf' / 'vocab.json').exists()
    hf = AutoModelForCausalLM.from_pretrained(repo / 'hf').eval()
    x = ids(16, len(chars))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, full_logits(model, x), rtol=1e-5, atol=1e-4)
    # sample.py from the export decodes with the copied meta.pkl: greedy, our model's characters
    result = run(repo, 'sample.py', '--init_from=hf', '--device=cpu', '--dtype=float32', '--start=hello',
                 '--temperature=0', '--num_samples=1', '--max_new_tokens=8')
    assert result.returncode == 0, result.stderr[-3000:]
    start = torch.tensor([[meta['stoi'][c] for c in 'hello']])
    expected = ''.join(meta['itos'][i] for i in model.generate(start, 8, temperature=0)[0].tolist())
    assert expected in result.stdout


# ----------------------------------------------------------------------------- issue 21: an export loses nothing

def snapshot(directory):
    """Every file under directory and its bytes."""
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), 'rb').read()
            for d, _, names in os.walk(directory) for f in names}


def char_meta(text="hello world\n"):
    chars = sorted(set(text))
    return {'vocab_size': len(chars), 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}}


def save_char_run(repo, meta, record=True, seed=0):
    """A character-level ckpt.pt in repo/out whose data record (as train.py writes it) holds meta; no meta.pkl."""
    from conftest import save_tiny_run
    model = tiny_model(seed, vocab_size=meta['vocab_size'])
    path = str(repo / 'out' / 'ckpt.pt')
    save_tiny_run(path, model, 'tinychars')
    if record:
        checkpoint = torch.load(path, weights_only=True)
        checkpoint['data'] = {'dataset': 'tinychars', 'vocab_size': meta['vocab_size'], 'meta': meta}
        torch.save(checkpoint, path)
    return model


@pytest.fixture
def disk(repo):
    """A real 1 MiB file system at repo/disk (conftest's tmpfs)."""
    with tmpfs(repo / 'disk', '1m') as path:
        yield path


def fill(directory):
    """Writes directory's file system full; returns the filler's path."""
    path = os.path.join(directory, 'filler')
    with open(path, 'wb', buffering=0) as f:
        try:
            while True:
                f.write(b'\0' * 4096)
                f.flush()
        except OSError:
            pass
    return path


def test_overwrite_replaces_an_exports_own_files(repo, monkeypatch, capsys):
    meta = char_meta()
    save_char_run(repo, meta, seed=0)
    export(repo, monkeypatch, capsys)
    first = snapshot(repo / 'hf')
    model = save_char_run(repo, meta, seed=1)  # a later checkpoint of the run
    export(repo, monkeypatch, capsys, '--overwrite=True')
    second = snapshot(repo / 'hf')
    assert set(second) == set(first) and second['model.safetensors'] != first['model.safetensors']
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(repo / 'hf').eval()
    x = ids(16, meta['vocab_size'])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, full_logits(model, x), rtol=1e-5, atol=1e-4)
    assert sorted(os.listdir(repo)).count('hf') == 1 and not [p for p in os.listdir(repo) if '.tmp-' in p]


def test_user_files_in_the_old_export_are_named_and_kept(repo, monkeypatch, capsys):
    save_char_run(repo, char_meta())
    export(repo, monkeypatch, capsys)
    (repo / 'hf' / 'NOTES.md').write_text('my notes')
    (repo / 'hf' / 'eval').mkdir()
    (repo / 'hf' / 'eval' / 'scores.json').write_text('{}')
    before = snapshot(repo / 'hf')
    message = exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', '--hf_dir=hf', '--overwrite=True')
    assert 'NOTES.md' in message and 'eval' in message and 'move them out first' in message
    assert snapshot(repo / 'hf') == before and not [p for p in os.listdir(repo) if '.tmp-' in p]


def test_a_killed_exports_leftovers_are_removed_by_the_next(repo, monkeypatch, capsys):
    meta = char_meta()
    save_char_run(repo, meta)
    # as an export killed while writing leaves it, and one killed after its first rename (hf moved aside)
    export(repo, monkeypatch, capsys, '--hf_dir=hf.tmp-k1ll3d-old')
    old = snapshot(repo / 'hf.tmp-k1ll3d-old')
    (repo / 'hf.tmp-a8x2q1').mkdir()
    (repo / 'hf.tmp-a8x2q1' / 'model.safetensors').write_bytes(b'half a file')
    # hf is missing: the -old one is the user's previous export, put back, and refused as hf exists without overwrite
    message = exit_message_allowing_changes(monkeypatch, repo, 'export_hf.py', '--out_dir=out', '--hf_dir=hf')
    assert 'already exists' in message and '--overwrite=True' in message
    assert snapshot(repo / 'hf') == old
    assert sorted(p for p in os.listdir(repo) if p.startswith('hf')) == ['hf']
    # leftovers beside an existing hf are removed, the export done
    (repo / 'hf.tmp-zz9').mkdir()
    (repo / 'hf.tmp-zz9-old').mkdir()
    out = export(repo, monkeypatch, capsys, '--overwrite=True')
    assert 'removed' in out and 'hf.tmp-zz9' in out
    assert sorted(p for p in os.listdir(repo) if p.startswith('hf')) == ['hf']


def exit_message_allowing_changes(monkeypatch, cwd, script, *args):
    """exit_message (conftest) for a run that may change files under cwd before its one-line exit."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, 'argv', [script, *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name='__main__')
    message = exit_info.value.code
    assert isinstance(message, str) and '\n' not in message and message.startswith(f'{script}: '), message
    return message


@pytest.mark.slow
def test_kill_9_during_an_export_loses_nothing(repo, monkeypatch, capsys):
    import signal
    import time
    save_tiny_run(str(repo / 'out' / 'ckpt.pt'), tiny_model(vocab_size=50257), 'somebpe')
    export(repo, monkeypatch, capsys)
    before = snapshot(repo / 'hf')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, 'export_hf.py', '--out_dir=out', '--hf_dir=hf', '--overwrite=True'],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not [p for p in os.listdir(repo) if p.startswith('hf.tmp-')] and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, 'the export ended before its temporary folder could be seen'
    time.sleep(0.2)  # inside save_pretrained or the tokenizer rebuild
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in os.listdir(repo) if p.startswith('hf.tmp-')]
    assert leftovers and snapshot(repo / 'hf') == before  # the old export is whole
    out = export(repo, monkeypatch, capsys, '--overwrite=True')
    assert all(f'removed {os.path.join(str(repo), p)}' in out for p in leftovers), out
    assert sorted(p for p in os.listdir(repo) if p.startswith('hf')) == ['hf'] and snapshot(repo / 'hf') == before


@pytest.mark.parametrize('umask', [0o022, 0o027])
def test_export_gets_the_users_umask_permissions(repo, monkeypatch, capsys, umask):
    save_char_run(repo, char_meta())
    old = os.umask(umask)
    try:
        export(repo, monkeypatch, capsys)
    finally:
        os.umask(old)
    assert os.stat(repo / 'hf').st_mode & 0o777 == 0o777 & ~umask
    names = os.listdir(repo / 'hf')
    assert 'model.safetensors' in names and 'meta.pkl' in names
    for name in names:
        assert os.stat(repo / 'hf' / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_a_full_disk_is_one_line_and_changes_nothing(repo, disk, monkeypatch, capsys):
    save_char_run(repo, char_meta())
    export(repo, monkeypatch, capsys, f'--hf_dir={disk}/hf')
    fill(disk)
    before = snapshot(disk)
    save_char_run(repo, char_meta(), seed=1)
    message = exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', f'--hf_dir={disk}/hf', '--overwrite=True')
    assert f'cannot write {disk}/hf: no space left on device' in message and 'nothing was changed' in message
    assert snapshot(disk) == before and sorted(os.listdir(disk)) == ['filler', 'hf']
    # a new export onto the full disk: no half directory left either
    message = exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', f'--hf_dir={disk}/hf2')
    assert 'no space left on device' in message and sorted(os.listdir(disk)) == ['filler', 'hf']


def test_hf_dir_under_a_file_is_one_line(repo, monkeypatch):
    save_char_run(repo, char_meta())
    (repo / 'afile').write_text('not a folder')
    for hf_dir in ('afile/hf', 'afile/sub/hf'):
        message = exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', f'--hf_dir={hf_dir}')
        assert f'cannot write {hf_dir}' in message and 'not a directory' in message, message
    assert (repo / 'afile').read_text() == 'not a folder'


def test_character_level_export_without_meta_pkl_uses_the_checkpoints_vocabulary(repo, monkeypatch, capsys):
    meta = char_meta()
    save_char_run(repo, meta)
    assert not (repo / 'data' / 'tinychars' / 'meta.pkl').exists()
    out = export(repo, monkeypatch, capsys)
    with open(repo / 'hf' / 'meta.pkl', 'rb') as f:
        assert pickle.load(f) == meta
    assert 'recorded in out/ckpt.pt' in out and 'data/tinychars/meta.pkl' not in out, out
    assert not (repo / 'hf' / 'vocab.json').exists()


def test_character_level_export_without_any_vocabulary_is_refused(repo, monkeypatch):
    save_char_run(repo, char_meta(), record=False)
    message = exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', '--hf_dir=hf')
    assert 'vocab_size=9 is smaller than GPT-2' in message and 'data/tinychars/meta.pkl' in message


def test_a_meta_pkl_other_than_the_recorded_vocabulary_is_refused(repo, monkeypatch):
    meta = char_meta()
    save_char_run(repo, meta)
    os.makedirs(repo / 'data' / 'tinychars')
    with open(repo / 'data' / 'tinychars' / 'meta.pkl', 'wb') as f:
        pickle.dump(char_meta('olleh dlrow?\n'), f)  # re-prepared from another text
    message = exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', '--hf_dir=hf')
    assert 'data/tinychars/meta.pkl is not the vocabulary out/ckpt.pt was trained with' in message
