"""What a newcomer meets in every script: --help, settings that are settings (not module constants), and a
one-line error where GPT-2's BPE files are neither in tiktoken's cache nor downloadable."""
import json
import os
import runpy
import sys

import numpy as np
import pytest

from conftest import assert_one_line_error, copy_repo, exit_message, run_script, save_tiny_run, tiny_model, write_bins

SCRIPTS = ['train.py', 'sample.py', 'hellaswag.py', 'export_hf.py', 'bench.py', 'bench_train.py', 'eval_length.py',
           'plot.py', 'memory.py', 'energy.py']


@pytest.fixture(scope='module')
def repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp('repo'))


def help_of(repo, monkeypatch, capsys, script):
    """What `python script --help` prints, run inside this process (no torch import to pay for); it must exit 0."""
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, 'argv', [script, '--help'])
    monkeypatch.setattr(sys, 'path', list(sys.path))
    monkeypatch.setenv('GOMP_SPINCOUNT', os.environ.get('GOMP_SPINCOUNT', '30000'))  # cpu.py would set it for good
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name='__main__')
    assert exit_info.value.code in (None, 0)
    return capsys.readouterr().out


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_answers_in_every_script_without_constants(repo, monkeypatch, capsys, script):
    out = help_of(repo, monkeypatch, capsys, script)
    assert script in out
    assert 'GPT2_VOCAB_SIZE' not in out and 'GiB' not in out and 'SHAPES' not in out


def test_help_lists_the_settings_of_a_script(repo, monkeypatch, capsys):
    out = help_of(repo, monkeypatch, capsys, 'sample.py')
    assert "  --out_dir='out'" in out and '  --top_p=None' in out
    assert 'takes no settings' in help_of(repo, monkeypatch, capsys, 'memory.py')


@pytest.mark.parametrize('script', ['train.py', 'sample.py', 'hellaswag.py', 'export_hf.py'])
def test_a_module_constant_is_not_a_setting(repo, monkeypatch, script):
    message = exit_message(monkeypatch, repo, script, '--GPT2_VOCAB_SIZE=3')
    assert "unknown setting 'GPT2_VOCAB_SIZE'" in message


def test_unknown_flags_are_refused_by_scripts_without_settings(repo, monkeypatch):
    assert "unknown setting 'foo'" in exit_message(monkeypatch, repo, 'memory.py', '--foo=1')
    assert 'malformed argument' in exit_message(monkeypatch, repo, 'memory.py', '--foo')
    assert "'--foo' is not a device" in exit_message(monkeypatch, repo, 'energy.py', '--foo')


def test_a_capitalised_name_in_a_config_file_is_a_constant(repo, monkeypatch, capsys):
    (repo / 'consts.py').write_text("TOKENS = 1000\nnum_samples = TOKENS // 500\n")
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, 'argv', ['sample.py', 'consts.py', '--top_k=0'])
    with pytest.raises(SystemExit) as exit_info:  # the config file is taken; top_k=0 then stops it before any work
        runpy.run_path('sample.py', run_name='__main__')
    assert exit_info.value.code == 'sample.py: top_k=0 is not an integer >= 1 (or None: no limit)'
    assert 'Overriding config with consts.py' in capsys.readouterr().out


# -----------------------------------------------------------------------------
# GPT-2's BPE offline: an empty tiktoken cache, and every connection refused by a proxy that is not there

OFFLINE = {'HTTPS_PROXY': 'http://127.0.0.1:9', 'HTTP_PROXY': 'http://127.0.0.1:9', 'https_proxy': 'http://127.0.0.1:9',
           'http_proxy': 'http://127.0.0.1:9', 'ALL_PROXY': 'http://127.0.0.1:9', 'NO_PROXY': '', 'no_proxy': ''}
HELLASWAG_ITEM = {'ctx': 'A man sits down at the piano. He', 'label': 0,
                  'endings': ['plays a song.', 'eats the piano.', 'flies away.', 'turns into a cat.']}


@pytest.fixture(scope='module')
def bpe_repo(tmp_path_factory):
    """A copy of the scripts with a GPT-2 BPE run (out/, no meta.pkl), its data, a HellaSwag file and a text."""
    repo = copy_repo(tmp_path_factory.mktemp('bpe'))
    save_tiny_run(str(repo / 'out' / 'ckpt.pt'), tiny_model(), 'bpe')
    tokens = np.random.default_rng(0).integers(0, 50257, 400)
    write_bins(repo / 'data' / 'bpe', tokens, tokens[:200], meta=None)
    (repo / 'hellaswag.jsonl').write_text(json.dumps(HELLASWAG_ITEM) + '\n')
    (repo / 'book.txt').write_text('Some text to prepare, again and again.\n' * 50)
    (repo / 'empty_cache').mkdir()
    return repo


@pytest.mark.parametrize('script, args', [
    ('sample.py', ['--device=cpu', '--num_samples=1', '--max_new_tokens=2']),
    ('hellaswag.py', ['--device=cpu', '--hellaswag_file=hellaswag.jsonl']),
    ('export_hf.py', ['--hf_dir=hf']),
    ('data/text/prepare.py', ['book.txt']),
])
def test_gpt2_bpe_offline_is_one_line_in_every_script(bpe_repo, monkeypatch, script, args):
    import tiktoken.registry
    monkeypatch.setattr(tiktoken.registry, 'ENCODINGS', {})  # as in a new process: nothing loaded yet
    for key, value in dict(OFFLINE, TIKTOKEN_CACHE_DIR=str(bpe_repo / 'empty_cache')).items():
        monkeypatch.setenv(key, value)
    message = exit_message(monkeypatch, bpe_repo, script, *args)  # one line, and no file written (hf/ included)
    assert "cannot load GPT-2's BPE files" in message and 'TIKTOKEN_CACHE_DIR' in message


def test_gpt2_bpe_offline_is_one_line_in_training_with_hellaswag(bpe_repo):
    env = dict(OFFLINE, TIKTOKEN_CACHE_DIR=str(bpe_repo / 'empty_cache'))
    result = run_script(bpe_repo, 'train.py', '--dataset=bpe', '--out_dir=out-train', '--device=cpu', '--compile=False',
                        '--n_layer=1', '--n_head=1', '--n_embd=8', '--block_size=8', '--batch_size=2',
                        '--gradient_accumulation_steps=1', '--max_iters=1', '--hellaswag_interval=1',
                        '--hellaswag_file=hellaswag.jsonl', '--measure_energy=False', env=env)
    assert_one_line_error(result, 'train.py', "cannot load GPT-2's BPE files", 'TIKTOKEN_CACHE_DIR')
