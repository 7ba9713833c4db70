import contextlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# tests never touch the network: GPT-2's BPE files come from the shared cache when it is there
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
if 'TIKTOKEN_CACHE_DIR' not in os.environ and os.path.isdir(os.path.join(SHARED, 'tiktoken_cache')):
    os.environ['TIKTOKEN_CACHE_DIR'] = os.path.join(SHARED, 'tiktoken_cache')
os.environ.setdefault('WANDB_MODE', 'disabled')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')


def files_under(directory):
    return {os.path.join(d, f) for d, _, names in os.walk(directory) for f in names if '__pycache__' not in d}


def exit_message(monkeypatch, cwd, script, *args):
    """The exit message of `python script *args` run from cwd, run inside this process: for errors found
    before any work there is no interpreter start-up or torch import to pay for. sys.exit with a message is
    what gives exit status 1 and that one line on stderr. Asserts the message is one line starting with the
    script's name, and that the run wrote no file under cwd (out_dir included)."""
    import runpy
    import pytest
    before = files_under(cwd)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, 'argv', [script, *args])
    monkeypatch.setattr(sys, 'path', list(sys.path))  # the data scripts add to it
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name='__main__')
    message = exit_info.value.code
    assert isinstance(message, str) and '\n' not in message, message
    assert message.startswith(f'{os.path.basename(script)}: ') or message.startswith(f'{script}: '), message
    assert files_under(cwd) == before
    return message


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the CPU is shared."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# helpers every test file shares: a copy of the repository, running a script, its one-line error, tiny models

def copy_repo(dest):
    """The repository's scripts (every top-level .py, config/, and the .py files under data/) copied to dest,
    which is returned: a scratch repository to run them in, with its own data/ and out dirs."""
    import glob
    import shutil
    for path in glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, 'config', '*.py')) + \
            glob.glob(os.path.join(ROOT, 'data', '**', '*.py'), recursive=True):
        target = os.path.join(dest, os.path.relpath(path, ROOT))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(path, target)
    return dest


def run_script(cwd, script, *args, nproc=0, env=None, timeout=300, check=False):
    """`python script *args` (or, with nproc, torchrun of nproc processes) in cwd, one OpenMP thread each
    (tiny models, and a CPU shared with other jobs); the CompletedProcess. check: assert it succeeded."""
    import subprocess
    env = {**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] if nproc \
        else [sys.executable]
    result = subprocess.run([*launcher, str(script), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def assert_one_line_error(result, script, *fragments):
    """The run failed with no traceback, and its last line on stderr is `script: ...` holding every fragment
    (libraries may have logged before it). Returns that line."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    last = (result.stderr.strip().splitlines() or [''])[-1]
    assert last.startswith(f'{os.path.basename(str(script))}: '), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def tiny_model(seed=0, **kw):
    """A small random GPT, in eval mode, with weights (biases and LayerNorms too) far from their init, so that a
    wrong transpose, a missing bias or a wrong activation shows in the logits."""
    import torch
    from model import GPT, GPTConfig
    args = dict(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    args.update(kw)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 2 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    return model


def save_tiny_run(path, model, dataset, nanogpt_style=False, iter_num=10):
    """A ckpt.pt as train.py writes it, for model trained on data/<dataset>; nanogpt_style: as the original
    nanoGPT's (compiled names, causal-mask buffers, no flash_attn/alibi/gelu/position)."""
    import torch
    c = model.config
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size, bias=c.bias,
                      vocab_size=c.vocab_size, dropout=c.dropout, flash_attn=c.flash_attn, alibi=c.alibi, gelu=c.gelu,
                      position=c.position, rope_base=c.rope_base)
    state = model.state_dict()
    if nanogpt_style:
        for k in ('flash_attn', 'alibi', 'gelu', 'position', 'rope_base'):
            del model_args[k]
        state = {'_orig_mod.' + k: v for k, v in state.items()}
        state.update({f'_orig_mod.transformer.h.{i}.attn.bias': torch.ones(1, 1, c.block_size, c.block_size).tril()
                      for i in range(c.n_layer)})
    optimizer = torch.optim.AdamW(model.parameters())
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    torch.save({'model': state, 'optimizer': optimizer.state_dict(), 'model_args': model_args, 'iter_num': iter_num,
                'best_val_loss': 1.5, 'config': {'dataset': dataset, 'batch_size': 4, 'learning_rate': 1e-3}}, path)


def save_hf_gpt2(path, vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2, seed=0, **kw):
    """A small random GPT-2 in Hugging Face format at path (no download); returns path."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                               n_head=n_head, **kw)).save_pretrained(path)
    return path


@contextlib.contextmanager
def tmpfs(path, size='1m'):
    """A real file system of size (e.g. '256k') mounted at path, for a real full disk (or, remounted read-only, an
    unwritable one); skips the test where mounting is not allowed (it needs root). Unmounted after."""
    import subprocess
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], check=True)


def write_bins(directory, train, val, meta={'vocab_size': 32}):
    """A dataset in directory: train.bin and val.bin of the given token ids, and meta.pkl unless meta is None."""
    import pickle
    import numpy as np
    os.makedirs(directory, exist_ok=True)
    np.asarray(train, dtype=np.uint16).tofile(os.path.join(directory, 'train.bin'))
    np.asarray(val, dtype=np.uint16).tofile(os.path.join(directory, 'val.bin'))
    if meta:
        with open(os.path.join(directory, 'meta.pkl'), 'wb') as f:
            pickle.dump(meta, f)


def phrase_repo(tmp_path, vocab=32):
    """A copy of the scripts with data/tiny: a random 50-token phrase repeated, so there is something to learn."""
    import numpy as np
    copy_repo(tmp_path)
    phrase = np.random.default_rng(0).integers(0, vocab, 50)
    write_bins(os.path.join(tmp_path, 'data', 'tiny'), np.tile(phrase, 80), np.tile(phrase, 10), {'vocab_size': vocab})
    return tmp_path


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: a test of many seconds; pytest -m "not slow" is the quick subset '
                                       '(about a minute), the whole suite is what CI runs')
