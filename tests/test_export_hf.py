import json
import os
import pickle
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import copy_repo, exit_message
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["Hello world! It's 3.14 o'clock,   isn't it?\n\n\tTabs\tand  spaces   ",
         "naïve café, 東京, Ελληνικά, emoji 🙂🚀 and zero\u200bwidth",
         "def f(x):\n    return x ** 2  # squared\r\n",
         "one<|endoftext|>two <|endoftext|> three"]


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py


def tiny_model(seed=0, **kw):
    """A small random GPT with weights (biases and LayerNorms too) far from their init, so that a wrong
    transpose, a missing bias or a wrong activation shows in the logits."""
    args = dict(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    args.update(kw)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 2 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model


def write_checkpoint(path, model, dataset):
    c = model.config
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                      bias=c.bias, vocab_size=c.vocab_size, dropout=c.dropout, flash_attn=c.flash_attn, alibi=c.alibi,
                      gelu=c.gelu)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'model': model.state_dict(), 'optimizer': {}, 'model_args': model_args, 'iter_num': 10,
                'best_val_loss': 2.0, 'config': {'dataset': dataset}}, path)


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


@pytest.mark.parametrize('bias,gelu', [(False, 'erf'), (True, 'erf'), (True, 'tanh')])
def test_bpe_export_gives_our_logits_in_transformers(repo, monkeypatch, capsys, bias, gelu):
    from transformers import AutoModelForCausalLM
    model = tiny_model(bias=bias, gelu=gelu)
    write_checkpoint(str(repo / 'out' / 'ckpt.pt'), model, 'somebpe')
    export(repo, monkeypatch, capsys)
    hf = AutoModelForCausalLM.from_pretrained(repo / 'hf').eval()
    assert hf.config.vocab_size == 50304 and hf.config.n_positions == 16  # the padded rows are there
    assert hf.config.activation_function == {'erf': 'gelu', 'tanh': 'gelu_new'}[gelu]
    x = ids(16, 50304)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, full_logits(model, x), rtol=1e-5, atol=1e-4)
    assert not [p for p in os.listdir(repo) if '.tmp-' in p]  # the temporary directory was renamed


def test_exported_tokenizer_is_gpt2s_and_matches_tiktoken(repo, monkeypatch, capsys):
    import tiktoken
    from transformers import AutoTokenizer, GPT2Tokenizer
    write_checkpoint(str(repo / 'out' / 'ckpt.pt'), tiny_model(), 'somebpe')
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


def test_init_from_the_export_gives_our_loss_and_trains(repo, monkeypatch, capsys):
    model = tiny_model(bias=False)
    write_checkpoint(str(repo / 'out' / 'ckpt.pt'), model, 'somebpe')
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


def test_alibi_export_is_refused_and_writes_nothing(repo, monkeypatch):
    write_checkpoint(str(repo / 'out' / 'ckpt.pt'), tiny_model(alibi=True), 'somebpe')
    message = exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', '--hf_dir=hf')  # and no file written
    assert 'ALiBi' in message and 'GPT-2' in message


def test_existing_hf_dir_is_kept_unless_overwrite(repo, monkeypatch, capsys):
    write_checkpoint(str(repo / 'out' / 'ckpt.pt'), tiny_model(vocab_size=50257), 'somebpe')
    export(repo, monkeypatch, capsys)
    (repo / 'hf' / 'mine.txt').write_text('keep me')
    assert '--overwrite=True' in exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', '--hf_dir=hf')
    os.makedirs(repo / 'other')
    (repo / 'other' / 'mine.txt').write_text('keep me')
    assert 'not an exported model' in exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', '--hf_dir=other',
                                                   '--overwrite=True')
    assert 'hf_dir=' in exit_message(monkeypatch, repo, 'export_hf.py', '--out_dir=out', '--hf_dir=out', '--overwrite=True')
    assert os.listdir(repo / 'other') == ['mine.txt'] and 'mine.txt' in os.listdir(repo / 'hf')
    export(repo, monkeypatch, capsys, '--overwrite=True')
    assert 'mine.txt' not in os.listdir(repo / 'hf') and 'model.safetensors' in os.listdir(repo / 'hf')
    assert not [p for p in os.listdir(repo) if '.tmp-' in p]


def test_character_level_export_keeps_meta_pkl_as_its_vocabulary(repo, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM
    chars = sorted(set("hello world\n"))
    meta = {'vocab_size': len(chars), 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}}
    os.makedirs(repo / 'data' / 'tinychars')
    with open(repo / 'data' / 'tinychars' / 'meta.pkl', 'wb') as f:
        pickle.dump(meta, f)
    model = tiny_model(vocab_size=len(chars))
    write_checkpoint(str(repo / 'out' / 'ckpt.pt'), model, 'tinychars')
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
