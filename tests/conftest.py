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
