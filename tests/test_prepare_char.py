"""data/shakespeare_char/prepare.py on a small text: nanoGPT's files, offline."""
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prepare_writes_character_bins_and_meta(tmp_path):
    shutil.copy(os.path.join(ROOT, 'data', 'shakespeare_char', 'prepare.py'), tmp_path)
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 3
    (tmp_path / 'input.txt').write_text(text, encoding='utf-8')
    subprocess.run([sys.executable, 'prepare.py'], cwd=tmp_path, check=True, capture_output=True)

    with open(tmp_path / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    chars = sorted(set(text))
    assert list(meta) == ['vocab_size', 'itos', 'stoi']
    assert meta['vocab_size'] == len(chars)
    assert meta['stoi'] == {ch: i for i, ch in enumerate(chars)}
    assert meta['itos'] == {i: ch for i, ch in enumerate(chars)}

    train = np.fromfile(tmp_path / 'train.bin', dtype=np.uint16)
    val = np.fromfile(tmp_path / 'val.bin', dtype=np.uint16)
    assert len(train) == int(len(text) * 0.9)
    assert ''.join(meta['itos'][i] for i in np.concatenate([train, val])) == text
    assert os.path.getsize(tmp_path / 'train.bin') == 2 * len(train)  # raw uint16, no header
