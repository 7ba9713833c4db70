"""data/shakespeare_char/prepare.py on a small text: nanoGPT's files, offline, replaced whole or not at all.
Also files_of(), a folder's bytes, which test_data.py shares."""
import os
import pickle
import shutil

import numpy as np
import pytest

from conftest import SHARED, assert_one_line_error, copy_repo, run_script, tmpfs

SCRIPT = 'data/shakespeare_char/prepare.py'
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 3
NANOGPT = os.path.join(SHARED, 'reference', 'nanoGPT', 'data', 'shakespeare_char', 'prepare.py')
SHAKESPEARE = os.path.join(SHARED, 'data', 'tinyshakespeare', 'input.txt')


def files_of(folder):
    """{name: bytes} of every file in folder: equal before and after means byte-identical, nothing added."""
    return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))}


def prepared(repo, text):
    (repo / 'data' / 'shakespeare_char' / 'input.txt').write_text(text, encoding='utf-8')
    return run_script(repo, SCRIPT, check=True)


def test_prepare_writes_character_bins_and_meta(tmp_path):
    copy_repo(tmp_path)
    text = TEXT
    prepared(tmp_path, text)
    out = tmp_path / 'data' / 'shakespeare_char'

    with open(out / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    chars = sorted(set(text))
    assert list(meta) == ['vocab_size', 'itos', 'stoi']
    assert meta['vocab_size'] == len(chars)
    assert meta['stoi'] == {ch: i for i, ch in enumerate(chars)}
    assert meta['itos'] == {i: ch for i, ch in enumerate(chars)}

    train = np.fromfile(out / 'train.bin', dtype=np.uint16)
    val = np.fromfile(out / 'val.bin', dtype=np.uint16)
    assert len(train) == int(len(text) * 0.9)
    assert ''.join(meta['itos'][i] for i in np.concatenate([train, val])) == text
    assert os.path.getsize(out / 'train.bin') == 2 * len(train)  # raw uint16, no header
    assert sorted(os.listdir(out)) == ['bins.json', 'input.txt', 'meta.pkl', 'prepare.py', 'train.bin', 'val.bin']  # no .tmp


def test_same_files_and_output_as_nanogpts_prepare(tmp_path):
    if not os.path.exists(NANOGPT):
        pytest.skip(f"needs nanoGPT's script at {NANOGPT}")
    text = open(SHAKESPEARE, encoding='utf-8').read() if os.path.exists(SHAKESPEARE) else TEXT
    (tmp_path / 'nanogpt').mkdir()
    shutil.copy(NANOGPT, tmp_path / 'nanogpt')
    (tmp_path / 'nanogpt' / 'input.txt').write_text(text, encoding='utf-8')
    theirs = run_script(tmp_path / 'nanogpt', 'prepare.py', check=True)
    copy_repo(tmp_path / 'ours')
    ours = prepared(tmp_path / 'ours', text)
    assert ours.stdout == theirs.stdout
    for name in ('train.bin', 'val.bin', 'meta.pkl'):
        assert (tmp_path / 'ours' / 'data' / 'shakespeare_char' / name).read_bytes() == \
            (tmp_path / 'nanogpt' / name).read_bytes(), name


def test_a_full_disk_leaves_the_old_set_byte_for_byte(tmp_path):
    """nanoGPT's script truncates train.bin in place on a full disk; this one keeps the old set."""
    copy_repo(tmp_path)
    out = tmp_path / 'data' / 'shakespeare_char'
    shutil.move(out / 'prepare.py', tmp_path / 'prepare.py')
    with tmpfs(out, '400k'):
        shutil.move(tmp_path / 'prepare.py', out / 'prepare.py')
        prepared(tmp_path, TEXT * 40)  # 10 KB of text: a 20 KB set
        old = files_of(out)
        (out / 'input.txt').write_text(TEXT * 600, encoding='utf-8')  # 146 KB: a 292 KB set does not fit
        old['input.txt'] = (out / 'input.txt').read_bytes()
        result = run_script(tmp_path, SCRIPT)
        assert result.returncode == 1 and 'Traceback' not in result.stderr
        # run as typed, the line starts with the script's path (conftest's helper wants a name: see below)
        assert result.stderr.strip().splitlines()[-1] == (f"{SCRIPT}: cannot write data/shakespeare_char/train.bin: "
                                                          f"no space left on device; the dataset in "
                                                          f"data/shakespeare_char is unchanged")
        assert files_of(out) == old  # the same three files, byte for byte, and no .tmp
        assert_one_line_error(run_script(tmp_path, tmp_path / SCRIPT), 'prepare.py', 'no space left on device')
        assert files_of(out) == old  # the same three files, byte for byte, and no .tmp
        # once there is room, the same command replaces the set
        os.remove(out / 'input.txt')
        (out / 'input.txt').write_text(TEXT * 60, encoding='utf-8')
        run_script(tmp_path, SCRIPT, check=True)
        assert len(np.fromfile(out / 'train.bin', dtype=np.uint16)) == int(len(TEXT * 60) * 0.9)
        assert sorted(os.listdir(out)) == ['bins.json', 'input.txt', 'meta.pkl', 'prepare.py', 'train.bin', 'val.bin']



def test_an_input_txt_that_is_a_folder_or_not_utf8_is_one_line(tmp_path, monkeypatch):
    from conftest import exit_message
    copy_repo(tmp_path)
    text = tmp_path / 'data' / 'shakespeare_char' / 'input.txt'
    text.mkdir()
    assert 'input.txt is a folder, not a text file' in exit_message(monkeypatch, tmp_path, SCRIPT)
    text.rmdir()
    text.write_bytes('caf\xe9 in Windows-1252\n'.encode('cp1252'))
    message = exit_message(monkeypatch, tmp_path, SCRIPT)
    assert 'input.txt is not UTF-8 text' in message and 'iconv -f WINDOWS-1252 -t UTF-8' in message
