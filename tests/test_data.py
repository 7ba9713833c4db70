import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tiktoken
import torch

from conftest import ROOT, SHARED, assert_one_line_error, copy_repo, exit_message, run_script

sys.path.insert(0, os.path.join(ROOT, 'data'))
import token_bins  # noqa: E402
from files import check_one_prepare  # noqa: E402
from model import GPT, GPTConfig, fit_pretrained_embeddings  # noqa: E402

SHAKESPEARE = os.path.join(SHARED, 'data', 'tinyshakespeare', 'input.txt')
enc = tiktoken.get_encoding('gpt2')
EOT = enc.eot_token
DOCS = ['Hello world', '', 'The quick brown fox.\n\n  Jumps over\n the lazy dog. ', 'naïve café 日本語 🙂\n',
        "It's 3.14 -- isn't it?"]


def run(script, *args, cwd=ROOT):
    """script run by its absolute path, so that its errors start with its file name (conftest's
    assert_one_line_error); run as data/text/prepare.py they start with that (see test_errors_name_the_script)."""
    return run_script(cwd, os.path.join(cwd, script), *args)


def read_bin(path):
    return np.fromfile(path, dtype=np.uint16)


def bpe_stream(docs):
    return np.array([t for doc in docs for t in enc.encode_ordinary(doc) + [EOT]], dtype=np.uint16)


def test_shakespeare_bpe_gives_nanogpts_token_counts(tmp_path):
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"needs Tiny Shakespeare at {SHAKESPEARE}")
    copy_repo(tmp_path)
    shutil.copyfile(SHAKESPEARE, tmp_path / 'data' / 'shakespeare' / 'input.txt')
    result = run('data/shakespeare/prepare.py', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    train, val = (read_bin(tmp_path / 'data' / 'shakespeare' / f'{s}.bin') for s in ('train', 'val'))
    assert (len(train), len(val)) == (301_966, 36_059)
    text = open(SHAKESPEARE, encoding='utf-8').read()
    assert train.tolist() == enc.encode_ordinary(text[:int(len(text) * 0.9)])
    assert enc.decode(val.tolist()) == text[int(len(text) * 0.9):]


def test_encode_text_cuts_long_texts_without_changing_tokens():
    text = ''.join(f"line {i}:  spaces before the newline  \n\n\tnext\n word's end.\n" for i in range(300))
    if os.path.exists(SHAKESPEARE):
        text += open(SHAKESPEARE, encoding='utf-8').read()[:50_000]
    for chunk_chars in (7, 1000):
        ids = token_bins.encode_text(text, enc, chunk_chars=chunk_chars, num_threads=2)
        assert ids.dtype == np.uint16
        assert ids.tolist() == enc.encode_ordinary(text)
    assert len(token_bins.encode_text('', enc)) == 0


@pytest.mark.slow
@pytest.mark.parametrize('num_proc', [1, 2])
def test_write_dataset_writes_every_document_then_eot_in_order(tmp_path, num_proc):
    from datasets import Dataset
    docs = DOCS * 3
    dset = Dataset.from_dict({'text': docs, 'url': [f'u{i}' for i in range(len(docs))]})
    path = str(tmp_path / 'train.bin')
    n_tokens = token_bins.write_dataset(dset, path, num_proc=num_proc, batch_rows=4)
    expected = bpe_stream(docs)
    assert n_tokens == len(expected)
    assert np.array_equal(read_bin(path), expected)
    assert os.listdir(tmp_path) == ['train.bin']  # no .tmp left behind


def test_write_dataset_refuses_an_empty_dataset(tmp_path):
    from datasets import Dataset
    with pytest.raises(SystemExit, match='empty input'):
        token_bins.write_dataset(Dataset.from_dict({'text': []}), str(tmp_path / 'train.bin'), num_proc=1)
    assert not os.listdir(tmp_path)


def test_write_stream_splits_any_iterable_of_records(tmp_path):
    docs = [f"document {i}: " + DOCS[i % len(DOCS)] for i in range(11)]
    records = ({'text': doc, 'id': i} for i, doc in enumerate(docs))  # a generator, as a stream is
    n_tokens = token_bins.write_stream(records, str(tmp_path), val_every=4, num_threads=2, batch_docs=3)
    val_docs = [doc for i, doc in enumerate(docs) if i % 4 == 0]
    train_docs = [doc for i, doc in enumerate(docs) if i % 4 != 0]
    assert np.array_equal(read_bin(tmp_path / 'val.bin'), bpe_stream(val_docs))
    assert np.array_equal(read_bin(tmp_path / 'train.bin'), bpe_stream(train_docs))
    assert n_tokens == {'train': len(bpe_stream(train_docs)), 'val': len(bpe_stream(val_docs))}
    assert sorted(os.listdir(tmp_path)) == ['bins.json', 'train.bin', 'val.bin']


def test_write_stream_refuses_empty_input_and_an_empty_train_split(tmp_path):
    with pytest.raises(SystemExit, match='empty input'):
        token_bins.write_stream(iter([]), str(tmp_path))
    with pytest.raises(SystemExit, match='train would be empty'):
        token_bins.write_stream([{'text': 'only one'}], str(tmp_path), val_every=2000)
    assert not os.listdir(tmp_path)


@pytest.fixture
def text_folder(tmp_path):
    folder = tmp_path / 'texts'
    (folder / 'sub').mkdir(parents=True)
    files = {'b.txt': 'Second file.\n' * 40, 'a.txt': 'First file, first line.\nSecond line!\n' * 30,
             'sub/c.txt': 'Nested: ümlaut and 🙂 emoji.\n' * 20}
    for name, text in files.items():
        (folder / name).write_text(text, encoding='utf-8')
    (folder / 'notes.md').write_text('not a .txt file', encoding='utf-8')
    return folder, [files[name] for name in ('a.txt', 'b.txt', 'sub/c.txt')]  # sorted path order


def test_own_text_folder_in_gpt2_bpe(tmp_path, text_folder):
    folder, docs = text_folder
    out = tmp_path / 'mydata'
    out.mkdir()
    (out / 'meta.pkl').write_bytes(b'stale')  # from an earlier --char run
    result = run('data/text/prepare.py', folder, '--out_dir', out)
    assert result.returncode == 0, result.stderr
    train, val = read_bin(out / 'train.bin'), read_bin(out / 'val.bin')
    expected = bpe_stream(docs)
    assert np.array_equal(np.concatenate([train, val]), expected)
    assert len(train) == int(len(expected) * 0.9)
    assert not (out / 'meta.pkl').exists()  # else train.py would read the bins as characters


def test_own_text_file_in_characters(tmp_path, text_folder):
    folder, docs = text_folder
    result = run('data/text/prepare.py', folder / 'sub' / 'c.txt', '--char', '--out_dir', tmp_path)
    assert result.returncode == 0, result.stderr
    meta = pickle.loads((tmp_path / 'meta.pkl').read_bytes())
    assert meta['vocab_size'] == len(set(docs[2])) == len(meta['itos'])
    assert all(meta['stoi'][c] == i for i, c in meta['itos'].items())
    train, val = read_bin(tmp_path / 'train.bin'), read_bin(tmp_path / 'val.bin')
    assert len(train) == int(len(docs[2]) * 0.9)
    assert ''.join(meta['itos'][i] for i in np.concatenate([train, val])) == docs[2]


def test_own_text_errors_are_one_line(tmp_path, text_folder):
    folder, _ = text_folder
    assert_one_line_error(run('data/text/prepare.py', tmp_path / 'missing.txt', '--out_dir', tmp_path), 'prepare.py',
                          'missing.txt')
    (tmp_path / 'empty.txt').write_text('')
    assert_one_line_error(run('data/text/prepare.py', tmp_path / 'empty.txt', '--out_dir', tmp_path), 'prepare.py',
                          'empty input')
    assert_one_line_error(run('data/text/prepare.py', folder, '--val_fraction', 0, '--out_dir', tmp_path),
                          'prepare.py', '--val_fraction=0.0 is not in (0, 1)')
    # more distinct characters than uint16 ids can number (planes 1 and 2: no surrogates)
    (tmp_path / 'huge_vocab.txt').write_text(''.join(map(chr, range(0x10000, 0x10000 + 70_000))), encoding='utf-8')
    assert_one_line_error(run('data/text/prepare.py', tmp_path / 'huge_vocab.txt', '--char', '--out_dir', tmp_path),
                          'prepare.py', '65536')
    assert not (tmp_path / 'train.bin').exists()


@pytest.mark.parametrize('script, args, fragment', [
    ('data/text/prepare.py', ['book.txt', '--val_fraction', '1'], '--val_fraction=1.0 is not in (0, 1)'),
    ('data/text/prepare.py', ['book.txt', '--val_fraction', '-0.1'], '--val_fraction=-0.1 is not in (0, 1)'),
    ('data/openwebtext/prepare.py', ['--num_proc', '0'], '--num_proc=0 is not an integer >= 1'),
    ('data/openwebtext/prepare.py', ['--num_proc_load_dataset', '-2'], '--num_proc_load_dataset=-2 is not an integer >= 1'),
    ('data/openwebtext/prepare.py', ['--val_fraction', '1.5'], '--val_fraction=1.5 is not in (0, 1)'),
    ('data/fineweb/prepare.py', ['--val_every', '1'], '--val_every=1 would leave train.bin empty'),
    ('data/fineweb/prepare.py', ['--max_docs', '0'], '--max_docs=0 is not an integer >= 1'),
    ('data/fineweb/prepare.py', ['--num_threads', '0'], '--num_threads=0 is not an integer >= 1'),
    ('data/openwebtext/pretrained_embeddings.py', ['--model', 'gpt2', '--out', '.'], "--out='.' is not a file name"),
])
def test_bad_arguments_get_a_one_line_error_before_any_work(tmp_path, monkeypatch, script, args, fragment):
    (tmp_path / 'book.txt').write_text('Some text to prepare.\n' * 10)
    assert fragment in exit_message(monkeypatch, tmp_path, os.path.join(ROOT, script), *args)


def test_shakespeare_char_offline_without_its_text_is_one_line(tmp_path, monkeypatch):
    import requests

    def offline(*args, **kwargs):
        raise requests.ConnectionError('no network')
    monkeypatch.setattr(requests, 'get', offline)
    copy_repo(tmp_path)
    message = exit_message(monkeypatch, tmp_path, 'data/shakespeare_char/prepare.py')
    assert 'cannot download' in message and 'ConnectionError' in message and 'input.txt instead' in message


@pytest.mark.slow
def test_network_prepare_scripts_fail_in_one_line_when_offline():
    for script in ('data/openwebtext/prepare.py', 'data/fineweb/prepare.py'):
        assert_one_line_error(run(script), script, 'cannot')


@pytest.mark.slow
def test_pretrained_embeddings_script_copies_a_gpt2_models_wte(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=enc.n_vocab, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    hf.save_pretrained(tmp_path / 'hf')
    result = run('data/openwebtext/pretrained_embeddings.py', '--model', tmp_path / 'hf', '--out', tmp_path / 'pretrained_embeddings.pt')
    assert result.returncode == 0, result.stderr
    emb = torch.load(tmp_path / 'pretrained_embeddings.pt', weights_only=True)
    assert emb.dtype == torch.float32
    assert torch.equal(emb, hf.transformer.wte.weight.detach())


@pytest.mark.slow
def test_pretrained_embeddings_script_maps_glove_words_onto_gpt2_tokens(tmp_path):
    g = torch.Generator().manual_seed(0)
    words = ['the', 'The', 'hello', 'world', ',', 'KING', 'king', 'a b', 'zzzqqxx']
    vectors = {w: torch.randn(5, generator=g) for w in words}
    lines = [w + ' ' + ' '.join(f'{x:.6f}' for x in v.tolist()) for w, v in vectors.items()]
    (tmp_path / 'glove.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    result = run('data/openwebtext/pretrained_embeddings.py', '--glove', tmp_path / 'glove.txt', '--out', tmp_path / 'pretrained_embeddings.pt')
    assert result.returncode == 0, result.stderr
    emb = torch.load(tmp_path / 'pretrained_embeddings.pt', weights_only=True)
    assert emb.shape == (enc.n_vocab, 5)

    def row(token):
        [i] = enc.encode_ordinary(token)
        return emb[i]
    for token, word in [('the', 'the'), (' the', 'the'), ('The', 'The'), (' The', 'The'), (',', ','),
                        (' hello', 'hello'), (' Hello', 'hello'), (' king', 'king'), (' KING', 'KING'),
                        (' King', 'KING')]:  # exact first; else the first case-folded word in the file
        assert torch.allclose(row(token), vectors[word], atol=1e-6), token
    matched = torch.stack([torch.isclose(emb, v, atol=1e-6).all(1) for v in vectors.values()]).any(0)
    assert f"found {int(matched.sum()):,} of 50,257 GPT-2 tokens" in result.stdout
    assert not torch.allclose(row(' a'), vectors['a b'], atol=1e-6)  # 'a b' is one word with a space in it
    unknown = emb[~matched]
    assert torch.isfinite(unknown).all() and unknown.std(0).min() > 0.1  # random rows, not zeros


@pytest.mark.slow
def test_pretrained_embeddings_script_errors_are_one_line(tmp_path):
    assert_one_line_error(run('data/openwebtext/pretrained_embeddings.py', '--glove', tmp_path / 'nope.txt'), 'pretrained_embeddings.py',
                          'nope.txt')
    (tmp_path / 'nonsense.txt').write_text('qqqzzzx 1 2\nxxqqzzw 3 4\n')
    assert_one_line_error(run('data/openwebtext/pretrained_embeddings.py', '--glove', tmp_path / 'nonsense.txt',
                              '--out', tmp_path / 'pretrained_embeddings.pt'), 'pretrained_embeddings.py',
                          'no GPT-2 token found')
    assert not (tmp_path / 'pretrained_embeddings.pt').exists()


@pytest.fixture
def one_thread():
    """Tiny matrices: torch's threads only add overhead (tens of seconds on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_embeddings_from_a_trained_model_beat_random_ones(tmp_path, one_thread):
    """Tokens come in groups, and the next token's group follows from the current one's: a model that
    starts from embeddings learned on this data (grouped tokens) learns faster than one from random."""
    V, G, T = 96, 12, 16
    g = torch.Generator().manual_seed(0)
    group = torch.randperm(V, generator=g) % G
    next_group = torch.randperm(G, generator=g)
    members = [torch.nonzero(group == k).flatten() for k in range(G)]
    seq = [0]
    for r in torch.randint(V, (20_000,), generator=g).tolist():
        m = members[next_group[group[seq[-1]]]]
        seq.append(int(m[r % len(m)]))
    data = torch.tensor(seq)

    def batches(seed, n, batch_size=32):
        gb = torch.Generator().manual_seed(seed)
        for _ in range(n):
            ix = torch.randint(len(data) - T - 1, (batch_size,), generator=gb).tolist()
            yield torch.stack([data[i:i + T] for i in ix]), torch.stack([data[i + 1:i + T + 1] for i in ix])

    def train(model, seed, steps, lr):
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for x, y in batches(seed, steps):
            _, loss = model(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def val_loss(model):
        return sum(model(x, y)[1].item() for x, y in batches(999, 5)) / 5

    def config(n_embd):
        return GPTConfig(block_size=T, vocab_size=V, n_layer=1, n_head=2, n_embd=n_embd, dropout=0.0)
    torch.manual_seed(1)
    donor = GPT(config(32))
    train(donor, seed=1, steps=150, lr=3e-3)
    torch.save(donor.transformer.wte.weight.detach().clone(), tmp_path / 'pretrained_embeddings.pt')
    emb = torch.load(tmp_path / 'pretrained_embeddings.pt', weights_only=True)  # as train.py reads it
    for n_embd in (32, 48):  # the same width, and a wider model through the fixed projection
        torch.manual_seed(2)
        pretrained = GPT(config(n_embd), pretrained_embeddings=fit_pretrained_embeddings(emb, n_embd))
        torch.manual_seed(2)
        scratch = GPT(config(n_embd))
        train(pretrained, seed=2, steps=40, lr=1e-3)
        train(scratch, seed=2, steps=40, lr=1e-3)
        assert val_loss(pretrained) < val_loss(scratch) - 0.25, n_embd


@pytest.mark.parametrize('script, writes', [
    ('data/shakespeare_char/prepare.py', 'meta.pkl'), ('data/shakespeare/prepare.py', 'train.bin'),
    ('data/openwebtext/prepare.py', 'train.bin'), ('data/fineweb/prepare.py', 'train.bin'),
    ('data/text/prepare.py', 'train.bin'), ('data/openwebtext/pretrained_embeddings.py', 'pretrained_embeddings.pt'),
])
def test_data_scripts_answer_help_without_writing_anything(tmp_path, script, writes):
    # a copy of data/'s scripts with no input.txt, as a new user has it: a run would download and write
    copy_repo(tmp_path)  # the scripts, and configurator.py they take fail from
    before = sorted(p for p in tmp_path.rglob('*'))
    result = subprocess.run([sys.executable, script, '--help'], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONDONTWRITEBYTECODE='1'), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('usage: ') and writes in result.stdout  # what it does and what it writes
    assert sorted(p for p in tmp_path.rglob('*')) == before


# -----------------------------------------------------------------------------
# a dataset is replaced whole or not at all: full disk, read-only, signals, kill -9, a kill between renames

from conftest import tmpfs  # noqa: E402  (a real full disk)
from test_prepare_char import files_of  # noqa: E402  (a folder's bytes)

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
PREPARE = 'data/text/prepare.py'


def old_set(repo, out, *args):
    """out holding a character-level dataset (train.bin, val.bin, meta.pkl): its files' bytes."""
    (repo / 'old.txt').write_text(TEXT * 100, encoding='utf-8')
    run(PREPARE, repo / 'old.txt', '--char', '--out_dir', out, *args, cwd=repo).check_returncode()
    assert sorted(os.listdir(out)) == ['bins.json', 'meta.pkl', 'train.bin', 'val.bin']
    return files_of(out)


@pytest.mark.parametrize('args, fails_at', [([], 'train.bin'), (['--val_fraction', '0.5'], 'val.bin')])
def test_own_text_on_a_full_disk_keeps_the_old_set(tmp_path, args, fails_at):
    repo = copy_repo(tmp_path / 'repo')
    with tmpfs(tmp_path / 'disk', '256k') as out:
        old = old_set(repo, out)  # 17 KB
        (repo / 'new.txt').write_text(TEXT * 1700, encoding='utf-8')  # 146 KB of text: 292 KB of ids
        result = run(PREPARE, repo / 'new.txt', '--char', '--out_dir', out, *args, cwd=repo)
        assert_one_line_error(result, PREPARE, f'cannot write {out}/{fails_at}: no space left on device; '
                                               f'the dataset in {out} is unchanged')
        assert result.returncode == 1
        assert files_of(out) == old  # byte for byte, meta.pkl too, and no .tmp left
        # and a BPE set (26 KB) that fits replaces the character set, meta.pkl included
        run(PREPARE, repo / 'old.txt', '--out_dir', out, cwd=repo).check_returncode()
        assert sorted(os.listdir(out)) == ['bins.json', 'train.bin', 'val.bin']


def test_own_text_into_a_read_only_or_impossible_place_is_one_line(tmp_path):
    repo = copy_repo(tmp_path / 'repo')
    (repo / 'new.txt').write_text(TEXT * 10, encoding='utf-8')
    with tmpfs(tmp_path / 'disk', '256k') as out:
        old = old_set(repo, out)
        subprocess.run(['mount', '-o', 'remount,ro', str(out)], check=True)
        result = run(PREPARE, repo / 'new.txt', '--out_dir', out, cwd=repo)
        assert_one_line_error(result, PREPARE, f'cannot write to {out}: read-only file system; the dataset there is unchanged')
        assert files_of(out) == old
    (tmp_path / 'a_file').write_text('not a folder')
    assert_one_line_error(run(PREPARE, repo / 'new.txt', '--out_dir', tmp_path / 'a_file' / 'data', cwd=repo),
                          PREPARE, f"cannot create {tmp_path / 'a_file' / 'data'}: not a directory")
    assert_one_line_error(run(PREPARE, repo / 'new.txt', '--out_dir', tmp_path / 'a_file', cwd=repo),
                          PREPARE, f"cannot write the dataset to {tmp_path / 'a_file'}: it is a file, not a folder")
    assert (tmp_path / 'a_file').read_text() == 'not a folder'


def test_errors_name_the_script_as_it_was_typed(tmp_path):
    repo = copy_repo(tmp_path / 'repo')
    result = run_script(repo, PREPARE, repo / 'missing.txt')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"{PREPARE}: no file or folder {repo / 'missing.txt'}"]


def test_a_second_prepare_into_a_folder_being_written_is_refused(tmp_path):
    import fcntl
    repo = copy_repo(tmp_path / 'repo')
    out = tmp_path / 'out'
    old = old_set(repo, out)
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a prepare that is writing there holds it
    try:
        result = run(PREPARE, repo / 'old.txt', '--out_dir', out, cwd=repo)
    finally:
        os.close(fd)
    assert_one_line_error(result, PREPARE, f'another prepare is writing the dataset in {out} now')
    assert files_of(out) == old


def stopped_mid_write(repo, out, old, signum, tries=8):
    """Run text/prepare.py --char on a 14 MB text into out and, while its new train.bin is still under
    its .tmp name (and no journal yet), send it signum: the process is held with SIGSTOP meanwhile, so
    the signal lands there. A try that comes too late (the set already replaced) puts the old set back
    and runs again. Returns the finished Popen and its stderr."""
    big = repo / 'big.txt'
    if not big.exists():
        big.write_text(''.join(f"line {i}: {TEXT}" for i in range(160_000)), encoding='utf-8')
    for _ in range(tries):
        proc = subprocess.Popen([sys.executable, os.path.join(repo, PREPARE), big, '--char', '--out_dir', out],
                                cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, 'OMP_NUM_THREADS': '1'})
        while proc.poll() is None and not (out / 'train.bin.tmp').exists():
            time.sleep(0.0002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGSTOP)
            while open(f'/proc/{proc.pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'T':
                time.sleep(0.0002)
            if (out / 'train.bin.tmp').exists() and not (out / 'prepare.journal').exists():
                os.kill(proc.pid, signum)
                os.kill(proc.pid, signal.SIGCONT)
                _, stderr = proc.communicate(timeout=120)
                return proc, stderr
            os.kill(proc.pid, signal.SIGCONT)
        proc.communicate(timeout=120)
        for name in os.listdir(out):
            os.remove(out / name)
        for name, data in old.items():
            (out / name).write_bytes(data)
    pytest.skip(f"the write never lasted long enough to be stopped in {tries} tries")


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_mid_write_leaves_the_old_set_and_no_tmp(tmp_path, signum):
    repo = copy_repo(tmp_path / 'repo')
    out = tmp_path / 'out'
    old = old_set(repo, out)
    proc, stderr = stopped_mid_write(repo, out, old, signum)
    assert proc.returncode == 1 and 'Traceback' not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (f"prepare.py: stopped by {signal.Signals(signum).name} before the new "
                                               f"dataset was complete; the dataset in {out} is unchanged")
    assert files_of(out) == old


@pytest.mark.slow
def test_kill_9_mid_write_leaves_the_old_set_and_the_next_run_clears_its_tmp(tmp_path):
    repo = copy_repo(tmp_path / 'repo')
    out = tmp_path / 'out'
    old = old_set(repo, out)
    proc, _ = stopped_mid_write(repo, out, old, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    left = files_of(out)
    assert 'train.bin.tmp' in left and 'prepare.journal' not in left  # kill -9 cannot clean up...
    assert {name: left[name] for name in old} == old  # ...but the old set is whole
    # the next run, even one that fails on its input, removes them and keeps the old set
    (repo / 'one.txt').write_text('x')
    result = run(PREPARE, repo / 'one.txt', '--char', '--out_dir', out, cwd=repo)
    assert_one_line_error(result, PREPARE, 'train split is empty')
    assert 'train.bin.tmp' in result.stdout and 'killed while writing' in result.stdout
    assert files_of(out) == old


KILLED_BETWEEN_RENAMES = """
import os, sys
sys.path.insert(0, os.path.join(sys.argv[1], 'data'))
import numpy as np
import token_bins
renames = []
def replace_then_die(src, dst):
    os.rename(src, dst)
    renames.append(dst)
    if len(renames) == 2:  # the journal, then train.bin: val.bin and meta.pkl are still the old ones
        os._exit(9)
token_bins.os.replace = replace_then_die
with token_bins.DatasetFiles(sys.argv[2]) as files:  # a BPE set: meta.pkl is to go
    files.write_ids('train.bin', np.arange(1000, dtype=np.uint16))
    files.write_ids('val.bin', np.arange(100, dtype=np.uint16))
"""


def test_a_run_killed_between_renames_is_finished_by_the_next(tmp_path):
    repo = copy_repo(tmp_path / 'repo')
    out = tmp_path / 'out'
    old = old_set(repo, out)
    killed = subprocess.run([sys.executable, '-c', KILLED_BETWEEN_RENAMES, repo, out], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    assert sorted(os.listdir(out)) == ['bins.json', 'bins.json.tmp', 'meta.pkl', 'prepare.journal', 'train.bin', 'val.bin',
                                      'val.bin.tmp']
    assert files_of(out)['val.bin'] == old['val.bin']  # a mixed set, until...
    with pytest.raises(ValueError, match='the two files are from different prepares'):  # ...which train.py refuses
        check_one_prepare(str(out), {'train': 1000, 'val': len(old['val.bin']) // 2})
    (repo / 'one.txt').write_text('x')
    result = run(PREPARE, repo / 'one.txt', '--char', '--out_dir', out, cwd=repo)  # ...any run into out: this one fails
    assert_one_line_error(result, PREPARE, 'train split is empty')
    assert 'put in place the dataset (train.bin, val.bin, bins.json)' in result.stdout
    assert sorted(os.listdir(out)) == ['bins.json', 'train.bin', 'val.bin']  # the killed run's set, whole
    assert np.array_equal(read_bin(out / 'train.bin'), np.arange(1000)) and np.array_equal(read_bin(out / 'val.bin'),
                                                                                         np.arange(100))


# -----------------------------------------------------------------------------
# what data/text/prepare.py reads: each file once, no whitespace-only corpus, links and folders named *.txt

@pytest.mark.parametrize('as_folder', [False, True])
def test_own_text_of_only_whitespace_is_refused(tmp_path, as_folder):
    (tmp_path / 'texts').mkdir()
    (tmp_path / 'texts' / 'a.txt').write_text(' \n\n\t  \n')
    (tmp_path / 'texts' / 'b.txt').write_text('\r\n')
    source = tmp_path / 'texts' if as_folder else tmp_path / 'texts' / 'a.txt'
    result = run(PREPARE, source, '--out_dir', tmp_path / 'out')
    assert_one_line_error(result, PREPARE, f'empty input: {source} holds only whitespace')
    assert not (tmp_path / 'out').exists()


def test_own_text_folder_with_links_reads_each_file_once(tmp_path, text_folder):
    folder, docs = text_folder
    os.symlink('..', folder / 'sub' / 'up')                 # a loop: sub/up/sub/up/...
    os.symlink(folder / 'a.txt', folder / 'sub' / 'a_again.txt')  # the same file by another name
    (folder / 'notes.txt').mkdir()                          # a folder named *.txt is searched as a folder
    (folder / 'notes.txt' / 'd.txt').write_text('In a folder named notes.txt.\n' * 5, encoding='utf-8')
    out = tmp_path / 'out'
    result = run(PREPARE, folder, '--out_dir', out)
    assert result.returncode == 0, result.stderr
    assert 'from 4 file(s)' in result.stdout
    expected = bpe_stream([docs[0], docs[1], 'In a folder named notes.txt.\n' * 5, docs[2]])  # sorted by path
    assert np.array_equal(np.concatenate([read_bin(out / 'train.bin'), read_bin(out / 'val.bin')]), expected)


def test_own_text_folder_with_a_broken_link_names_it(tmp_path, text_folder):
    folder, _ = text_folder
    os.symlink('moved_away.txt', folder / 'sub' / 'gone.txt')
    result = run(PREPARE, folder, '--out_dir', tmp_path / 'out')
    assert_one_line_error(result, PREPARE, f"{folder / 'sub' / 'gone.txt'} is a link to moved_away.txt, which does not "
                                           f"exist; remove the link or restore its target")
    assert_one_line_error(run(PREPARE, folder / 'sub' / 'gone.txt', '--out_dir', tmp_path / 'out'), PREPARE,
                          'gone.txt is a link to moved_away.txt, which does not exist')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('journal', ['', '{}', '{"replace": ["../../etc/passwd"], "remove": []}'])
def test_a_damaged_or_hand_edited_journal_is_set_aside_and_the_prepare_goes_on(tmp_path, journal):
    repo = copy_repo(tmp_path / 'repo')
    out = tmp_path / 'out'
    old_set(repo, out)
    (out / 'prepare.journal').write_text(journal)
    (repo / 'new.txt').write_text(TEXT * 50, encoding='utf-8')
    result = run(PREPARE, repo / 'new.txt', '--out_dir', out, cwd=repo)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'prepare.journal is not a journal this script wrote; moved it to prepare.journal.damaged' in result.stdout
    assert sorted(os.listdir(out)) == ['bins.json', 'prepare.journal.damaged', 'train.bin', 'val.bin']
    assert (out / 'prepare.journal.damaged').read_text() == journal


def test_the_stamp_refuses_only_a_pair_of_two_prepares(tmp_path):
    """bins.json holds the counts one prepare wrote: one file changed is a mixed pair; both changed is a pair some
    other prepare wrote (nanoGPT's writes no stamp) and passes, as bins without a stamp do."""
    (tmp_path / 'bins.json').write_text('{"prepare": "data/x/prepare.py", "train.bin": 100, "val.bin": 10}')
    check_one_prepare(str(tmp_path), {'train': 100, 'val': 10})
    check_one_prepare(str(tmp_path), {'train': 300, 'val': 30})
    with pytest.raises(ValueError, match=r'train.bin has 101 tokens, but the prepare that wrote the val.bin beside it '
                                         r'wrote 100 .*: the two files are from different prepares; run python '
                                         r'data/x/prepare.py again'):
        check_one_prepare(str(tmp_path), {'train': 101, 'val': 10})
    os.remove(tmp_path / 'bins.json')
    check_one_prepare(str(tmp_path), {'train': 101, 'val': 10})


def test_own_text_from_a_pipe(tmp_path):
    """/dev/stdin (a link to a pipe, no path) is read as a text, not called a broken link."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, PREPARE), '/dev/stdin', '--char', '--out_dir', tmp_path],
                            input=TEXT * 20, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    meta = pickle.load(open(tmp_path / 'meta.pkl', 'rb'))
    assert ''.join(meta['itos'][i] for i in np.concatenate([read_bin(tmp_path / 'train.bin'),
                                                            read_bin(tmp_path / 'val.bin')])) == TEXT * 20
