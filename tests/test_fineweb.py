"""The GPT-2 (124M) FineWeb-Edu reproduction at tiny scale: data/fineweb/prepare.py on a local FineWeb-like
corpus (killed with SIGKILL, stopped by Ctrl-C and by a full disk, then resumed: the same bytes as a prep never
stopped), config/train_gpt2_fineweb.py's schedule at its real length, and the config itself, with only shape
and length overrides, trained on a CPU with HellaSwag, checkpointed, resumed and plotted."""
import ast
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, assert_one_line_error, copy_repo, exit_message, run_script, tmpfs

PREP = os.path.join('data', 'fineweb', 'prepare.py')
CONFIG = os.path.join('config', 'train_gpt2_fineweb.py')
N_DOCS, SHARD_DOCS, VAL_EVERY = 1200, 15, 25


def fineweb_like_texts(n, seed=0):
    """Web-page-like documents: paragraphs of varied length, digits, punctuation, non-ASCII text; one empty."""
    rng = random.Random(seed)
    words = ("the of and to in is that for it as was with be by on not this are from at which learning students "
             "energy cell water history 1848 3.14 résumé naïve Zürich 東京 über 😀 (see Fig. 2) e.g. -- $40").split()
    texts = []
    for i in range(n):
        paragraphs = [' '.join(rng.choice(words) for _ in range(rng.randint(3, 60))).capitalize() + '.'
                      for _ in range(rng.randint(1, 4))]
        texts.append('' if i == 7 else '\n\n'.join(paragraphs))
    return texts


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """A folder as `hf download HuggingFaceFW/fineweb-edu --include 'sample/10BT/*'` leaves it: parquet files
    (written by datasets.Dataset) with a text column among others. Returns (folder, texts)."""
    from datasets import Dataset
    folder = tmp_path_factory.mktemp('fineweb-edu')
    (folder / 'sample' / '10BT').mkdir(parents=True)
    texts = fineweb_like_texts(N_DOCS)
    for part, (start, end) in enumerate([(0, 700), (700, N_DOCS)]):
        Dataset.from_dict({'text': texts[start:end], 'id': [f'<urn:{i}>' for i in range(start, end)],
                           'score': [3.0] * (end - start)}).to_parquet(str(folder / 'sample' / '10BT' / f'{part:03d}_00000.parquet'))
    return folder, texts


def prep_args(folder):
    return [f'--local_dir={folder}', f'--shard_docs={SHARD_DOCS}', f'--val_every={VAL_EVERY}', '--num_proc=2']


def bins(repo):
    return {split: (repo / 'data' / 'fineweb' / f'{split}.bin').read_bytes() for split in ('train', 'val')}


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, corpus):
    """A scratch repository whose data/fineweb was prepared in one uninterrupted run; (repo, its stdout)."""
    repo = copy_repo(tmp_path_factory.mktemp('repo'))
    result = run_script(repo, repo / PREP, *prep_args(corpus[0]), check=True, timeout=120)
    return repo, result.stdout


def expected_bins(texts):
    """What the bins must hold: every VAL_EVERY-th document by index in val (the first one included), the rest in
    train, each as <|endoftext|> then its GPT-2 BPE ids (build-nanogpt's fineweb.py: the token starts a document), as
    uint16."""
    import numpy as np
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    ids = {'train': [], 'val': []}
    for i, text in enumerate(texts):
        ids['val' if i % VAL_EVERY == 0 else 'train'] += [50256] + enc.encode_ordinary(text)  # build-nanogpt's order
    return {split: np.array(split_ids, dtype=np.uint16).tobytes() for split, split_ids in ids.items()}


@pytest.mark.slow
def test_prep_writes_endoftext_then_every_document_with_a_fixed_val_split(prepared, corpus):
    repo, stdout = prepared
    expected = expected_bins(corpus[1])
    assert bins(repo) == expected
    assert (f"train.bin: {len(expected['train']) // 2:,} tokens, val.bin: {len(expected['val']) // 2:,} tokens, "
            f"from {N_DOCS:,} documents") in stdout
    assert not (repo / 'data' / 'fineweb' / 'shards').exists()  # removed once the bins hold it all


def shards_in_manifest(repo):
    try:
        return len(json.loads((repo / 'data' / 'fineweb' / 'shards' / 'manifest.json').read_text())['shards'])
    except (OSError, ValueError):
        return 0


def start_prep_and_wait(repo, folder, shards, **popen):
    """A prep running in repo, once its manifest lists `shards` shards (of N_DOCS // SHARD_DOCS)."""
    proc = subprocess.Popen([sys.executable, str(repo / PREP), *prep_args(folder)], cwd=repo, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.time() + 60
    while shards_in_manifest(repo) < shards:
        assert proc.poll() is None, f"the prep ended before it could be stopped: {proc.communicate()}"
        assert time.time() < deadline
        time.sleep(0.002)
    return proc


@pytest.mark.slow
def test_prep_killed_with_sigkill_resumes_to_the_same_bytes(tmp_path, corpus, prepared):
    repo = copy_repo(tmp_path)
    proc = start_prep_and_wait(repo, corpus[0], shards=3, start_new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, workers too, as a reboot would
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = shards_in_manifest(repo)
    assert 3 <= done < N_DOCS // SHARD_DOCS
    assert not (repo / 'data' / 'fineweb' / 'train.bin').exists()
    result = run_script(repo, repo / PREP, *prep_args(corpus[0]), check=True, timeout=120)
    assert f"{done} shard(s) of {SHARD_DOCS} documents already in" in result.stdout
    assert f"continuing from document {done * SHARD_DOCS:,}" in result.stdout
    assert bins(repo) == bins(prepared[0])


@pytest.mark.slow
def test_prep_stopped_by_ctrl_c_says_so_in_one_line_and_resumes(tmp_path, corpus, prepared, monkeypatch):
    repo = copy_repo(tmp_path)
    # started with SIGINT ignored, as a shell starts a background job (and CI's runner may): SIGINT still stops it
    proc = start_prep_and_wait(repo, corpus[0], shards=2, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    done = shards_in_manifest(repo)
    assert_one_line_error(result, PREP, 'interrupted;', f'{done} shard(s) ({done * SHARD_DOCS:,} documents) are kept',
                          'run the same command to continue')
    assert not [p for p in os.listdir(repo / 'data' / 'fineweb' / 'shards') if p.endswith('.bin.tmp')]
    # other settings would mix two preps: refused before any work, in one line
    message = exit_message(monkeypatch, repo, PREP, *prep_args(corpus[0])[:-2], '--val_every=30')
    assert 'holds the shards of another prep (its val_every differ)' in message and 'delete' in message
    run_script(repo, repo / PREP, *prep_args(corpus[0]), check=True, timeout=120)
    assert bins(repo) == bins(prepared[0])


@pytest.mark.slow
def test_prep_stopped_by_a_full_disk_resumes_once_there_is_room(tmp_path, corpus, prepared):
    repo = copy_repo(tmp_path)
    shards = repo / 'data' / 'fineweb' / 'shards'
    with tmpfs(shards, '256k'):
        result = run_script(repo, repo / PREP, *prep_args(corpus[0]), timeout=120)
        assert_one_line_error(result, PREP, 'the disk is full', 'free some space and run the same command to continue')
        assert 0 < shards_in_manifest(repo) < N_DOCS // SHARD_DOCS
        subprocess.run(['mount', '-o', 'remount,size=16m', str(shards)], check=True)
        result = run_script(repo, repo / PREP, *prep_args(corpus[0]), '--keep_shards', check=True, timeout=120)
        assert 'continuing from document' in result.stdout
        assert bins(repo) == bins(prepared[0])


@pytest.mark.slow
def test_prep_whose_reading_breaks_mid_way_resumes_once_it_reads_again(tmp_path, corpus):
    """A stream that drops, as a local file that cannot be read past some point (same code path as the stream)."""
    texts = corpus[1][:200]
    folder = tmp_path / 'jsonl'
    folder.mkdir()
    (folder / '000.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts[:120]))
    (folder / '001.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts[120:]) + '{"text": "cut off\n')
    repo = copy_repo(tmp_path / 'repo')
    args = [f'--local_dir={folder}', f'--shard_docs={SHARD_DOCS}', f'--val_every={VAL_EVERY}', '--num_proc=1']
    result = run_script(repo, repo / PREP, *args, timeout=120)
    assert_one_line_error(result, PREP, f'cannot read {folder}/001.jsonl', 'repair, re-download or remove that file',
                          'are kept', 'run the same command to continue')  # the file named, not a stream that broke
    assert 0 < shards_in_manifest(repo) < 200 // SHARD_DOCS + 1
    # the file is mended (the connection is back): the prep continues and ends as one that never broke
    (folder / '001.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts[120:]))
    result = run_script(repo, repo / PREP, *args, check=True, timeout=120)
    assert 'continuing from document' in result.stdout
    assert bins(repo) == expected_bins(texts)


@pytest.mark.slow
def test_prep_errors_are_one_line(tmp_path, monkeypatch):
    assert '--local_dir=nowhere is not a folder' in exit_message(monkeypatch, tmp_path, os.path.join(ROOT, PREP), '--local_dir=nowhere')
    (tmp_path / 'empty').mkdir()
    assert 'no .parquet or .jsonl files under empty' in exit_message(monkeypatch, tmp_path, os.path.join(ROOT, PREP), '--local_dir=empty')
    assert '--shard_docs=0 is not an integer >= 1' in exit_message(monkeypatch, tmp_path, os.path.join(ROOT, PREP), '--shard_docs=0')
    assert '--num_proc=0 is not an integer >= 1' in exit_message(monkeypatch, tmp_path, os.path.join(ROOT, PREP), '--num_proc=0')
    # jsonl files without a text column, read through the same path as the stream
    repo = copy_repo(tmp_path / 'repo')
    (tmp_path / 'jsonl').mkdir()
    (tmp_path / 'jsonl' / 'part.jsonl').write_text('{"content": "no text column here"}\n' * 3)
    result = run_script(repo, repo / PREP, f'--local_dir={tmp_path / "jsonl"}', '--num_proc=1', timeout=120)
    assert_one_line_error(result, PREP, "have no 'text' column")


def config_settings():
    settings = {}
    with open(os.path.join(ROOT, CONFIG)) as f:
        exec(f.read(), settings)
    return settings


def test_config_schedule_is_build_nanogpts_at_its_real_length():
    """train.py's get_lr, taken from its source and run with the config's values (no training)."""
    cfg = config_settings()
    assert cfg['batch_size'] * cfg['block_size'] * cfg['gradient_accumulation_steps'] == 2 ** 19 == 524_288
    assert all(cfg['gradient_accumulation_steps'] % gpus == 0 for gpus in (1, 2, 8))  # shared out among the processes
    assert cfg['max_iters'] == cfg['lr_decay_iters'] == 19073 and cfg['max_iters'] * 2 ** 19 == 9_999_745_024  # 10B tokens, once
    assert (cfg['n_layer'], cfg['n_head'], cfg['n_embd'], cfg['bias'], cfg['dataset']) == (12, 12, 768, True, 'fineweb')
    assert (cfg['weight_decay'], cfg['beta1'], cfg['beta2'], cfg['grad_clip']) == (0.1, 0.9, 0.95, 1.0)
    assert cfg['eval_interval'] == cfg['hellaswag_interval'] == 250 and cfg['always_save_checkpoint']
    with open(os.path.join(ROOT, 'train.py')) as f:
        tree = ast.parse(f.read())
    [get_lr_def] = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == 'get_lr']
    namespace = {'math': math, **{k: cfg[k] for k in ('learning_rate', 'min_lr', 'warmup_iters', 'lr_decay_iters')}}
    exec(compile(ast.Module(body=[get_lr_def], type_ignores=[]), 'train.py', 'exec'), namespace)
    get_lr = namespace['get_lr']
    assert get_lr(0) == pytest.approx(6e-4 / 716, rel=1e-12)  # warmup: (it + 1) / (warmup_iters + 1)
    assert get_lr(714) == pytest.approx(6e-4 * 715 / 716, rel=1e-12)
    assert get_lr(715) == pytest.approx(6e-4, rel=1e-12)  # the peak
    assert get_lr((715 + 19073) // 2) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-12)  # cosine: halfway down at the middle
    assert 6e-5 < get_lr(19072) < 6e-5 * (1 + 1e-6)  # the last step trains at min_lr, to rounding
    assert get_lr(19073) == 6e-5
    lrs = [get_lr(it) for it in range(0, 19074, 7)]
    peak = lrs.index(max(lrs))
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1])) and all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


@pytest.mark.slow
def test_config_trains_end_to_end_on_cpu_with_hellaswag_a_checkpoint_a_resume_and_the_plot(prepared, tmp_path):
    import torch
    repo = prepared[0]
    items = tmp_path / 'hellaswag.jsonl'
    items.write_text(''.join(json.dumps({'ctx': ctx, 'endings': endings, 'label': label}) + '\n' for ctx, endings, label in [
        ('The students opened their books and', ['began to read.', 'flew away.', 'the water.', 'ate the moon.'], 0),
        ('Energy in a cell comes from', ['the mitochondria.', 'a chair.', 'Zürich 1848.', 'blue.'], 0),
        ('She poured the water', ['into the glass.', 'history of.', 'students energy.', 'e.g. 3.14.'], 0)]))
    out_dir = tmp_path / 'out'
    # the config as it is, made small (shape and length) and run on this CPU
    overrides = ['--device=cpu', '--compile=False', '--dtype=float32', '--n_layer=2', '--n_head=2', '--n_embd=32',
                 '--block_size=32', '--batch_size=2', '--gradient_accumulation_steps=2', '--eval_iters=2', '--warmup_iters=2',
                 '--lr_decay_iters=6', '--eval_interval=3', '--hellaswag_interval=3', '--log_interval=2',
                 f'--hellaswag_file={items}', f'--out_dir={out_dir}']
    first = run_script(repo, 'train.py', CONFIG, *overrides, '--max_iters=3', check=True, timeout=180)
    assert 'tokens per iteration will be: 128' in first.stdout
    assert 'step 3: hellaswag acc' in first.stdout
    checkpoint = torch.load(out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert checkpoint['iter_num'] == 3
    assert checkpoint['model_args']['vocab_size'] == 50304 and checkpoint['model_args']['bias'] is True
    assert checkpoint['config']['dataset'] == 'fineweb' and checkpoint['config']['learning_rate'] == 6e-4
    resumed = run_script(repo, 'train.py', CONFIG, *overrides, '--max_iters=6', '--init_from=resume', check=True, timeout=180)
    assert 'resuming training from' in resumed.stdout and 'iter 4: loss' in resumed.stdout
    assert 'step 6: train loss' in resumed.stdout and 'step 6: hellaswag acc' in resumed.stdout
    assert torch.load(out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)['iter_num'] == 6
    records = [json.loads(line) for line in (out_dir / 'log.jsonl').read_text().splitlines()]
    assert sorted({r['step'] for r in records if 'hellaswag_acc_norm' in r}) == [0, 3, 6]
    assert all(0 <= r['hellaswag_acc_norm'] <= 1 for r in records if 'hellaswag_acc_norm' in r)
    png = tmp_path / 'fineweb.png'
    plot = run_script(repo, 'plot.py', f'--out_dirs={out_dir}', f'--out={png}', '--gpt2_val_loss=3.29',
                      '--reference=GPT-3 124M=0.337', check=True, timeout=120)
    hellaswag_last = [r for r in records if r.get('step') == 6 and 'hellaswag_acc_norm' in r][-1]['hellaswag_acc_norm']
    assert "out: 6 iterations (3 logged), 3 evaluations" in plot.stdout  # iterations 0, 2, 4 logged; 6 trained
    assert f"HellaSwag acc_norm {hellaswag_last:.4f} at step 6" in plot.stdout
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_prep_names_the_bad_local_file_or_document_in_one_line(tmp_path, corpus):
    """Local input that no rerun can mend: a line that is not JSON, a null text, texts that are numbers, the
    second of three parquet files cut short. Each prep runs beside the others."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    cases = {}
    for name, lines in (('not_json', ['{"text": "a"}', 'this is not JSON', '{"text": "b"}']),
                        ('null', ['{"text": "a"}', '{"text": null}']), ('numbers', ['{"text": 1}', '{"text": 2}'])):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'part.jsonl').write_text('\n'.join(lines) + '\n')
        cases[name] = tmp_path / name
    (tmp_path / 'cut').mkdir()
    for part in range(3):
        pq.write_table(pa.table({'text': corpus[1][part * 10:(part + 1) * 10]}), tmp_path / 'cut' / f'{part:03d}.parquet')
    with open(tmp_path / 'cut' / '001.parquet', 'r+b') as f:
        f.truncate(os.path.getsize(tmp_path / 'cut' / '001.parquet') // 2)
    cases['cut'] = tmp_path / 'cut'
    repos = {name: copy_repo(tmp_path / f'repo-{name}') for name in cases}
    procs = {name: subprocess.Popen([sys.executable, str(repos[name] / PREP), f'--local_dir={folder}', '--num_proc=1'],
                                    cwd=repos[name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, folder in cases.items()}
    expected = {'not_json': [f"cannot read {cases['not_json']}/part.jsonl", 'JSON parse error', 'repair, re-download or remove'],
                'null': ["has no text (its 'text' is None, not a string)", 'remove it or give it text'],
                'numbers': ["document 0 of", "has no text (its 'text' is 1, not a string)"],
                'cut': [f"cannot read {cases['cut']}/001.parquet as parquet", 'download it again, or remove it']}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), PREP,
                              *expected[name])


def test_prep_with_a_hand_edited_manifest_makes_its_shards_again_from_there(tmp_path, corpus, prepared):
    repo = copy_repo(tmp_path)
    run_script(repo, repo / PREP, *prep_args(corpus[0]), '--keep_shards', check=True, timeout=120)
    manifest = repo / 'data' / 'fineweb' / 'shards' / 'manifest.json'
    edited = json.loads(manifest.read_text())
    del edited['shards'][5]['docs']
    edited['shards'][9] = 'by hand'
    manifest.write_text(json.dumps(edited))
    result = run_script(repo, repo / PREP, *prep_args(corpus[0]), check=True, timeout=120)
    assert 'shard 5 is not as this script writes it; making it again from there' in result.stdout
    assert 'continuing from document 75' in result.stdout
    assert bins(repo) == bins(prepared[0])


def test_prep_that_cannot_write_val_bin_leaves_the_old_train_bin_and_val_bin(tmp_path, corpus, prepared):
    """Issue 27's probe: a full disk while val.bin is joined, after train.bin, over an older prep. The two replace
    the old pair together or not at all; the shards stay for the same command to finish."""
    repo = copy_repo(tmp_path)
    old = bins(prepared[0])
    with tmpfs(repo / 'data' / 'fineweb', '16m') as fineweb:
        shutil.copy(os.path.join(ROOT, PREP), fineweb / 'prepare.py')
        args = [*prep_args(corpus[0]), '--max_docs=600']  # a smaller corpus from the same documents: other bins
        run_script(repo, repo / PREP, *args, '--keep_shards', check=True, timeout=120)
        new = bins(repo)
        for split in ('train', 'val'):  # the older prep's pair in place again, its stamp too
            shutil.copy(prepared[0] / 'data' / 'fineweb' / f'{split}.bin', fineweb / f'{split}.bin')
        shutil.copy(prepared[0] / 'data' / 'fineweb' / 'bins.json', fineweb / 'bins.json')
        st = os.statvfs(fineweb)
        pages = st.f_blocks - st.f_bfree + -(-len(new['train']) // 4096)  # room for the new train.bin, not val.bin
        subprocess.run(['mount', '-o', f'remount,size={pages * 4096}', str(fineweb)], check=True)
        result = run_script(repo, repo / PREP, *args, timeout=120)
        assert_one_line_error(result, PREP, 'cannot write data/fineweb/val.bin: no space left on device',
                              'the dataset in data/fineweb is unchanged', 'the shards are kept')
        assert bins(repo) == old  # both the older prep's
        assert not [p for p in os.listdir(fineweb) if p.endswith('.tmp')]
        subprocess.run(['mount', '-o', 'remount,size=16m', str(fineweb)], check=True)
        run_script(repo, repo / PREP, *args, check=True, timeout=120)  # room again: the same command finishes
        assert bins(repo) == new
