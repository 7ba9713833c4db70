import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, exit_message
from hellaswag import evaluate_hellaswag, load_hellaswag, score_examples
from model import GPT, GPTConfig

# items in the layout of hellaswag_val.jsonl (same keys; our own sentences), endings of unequal length
ITEMS = [
    dict(ctx_a="A woman stands in a kitchen holding a bowl.", ctx_b="she",
         endings=["cracks two eggs into the bowl and whisks them.", "flies.",
                  "puts on a helmet and rides a bicycle down a steep hill.", "sings to the cat."], label=0),
    dict(ctx_a="Two men are rowing a boat across a lake.", ctx_b="they",
         endings=["paint the boat red.", "reach the far shore and pull the boat onto the sand.",
                  "eat.", "start a fire in the middle of the boat and keep rowing."], label=1),
    dict(ctx_a="A child kneels on the carpet with a box of blocks.", ctx_b="the child",
         endings=["drives away.", "reads the newspaper aloud to the dog sleeping next to the sofa.",
                  "stacks the blocks into a tall tower.", "is."], label=2),
    dict(ctx_a="A man ties his shoes at the door.", ctx_b="he",
         endings=["opens the door and goes out for a run.", "melts.", "orders a pizza by phone.",
                  "jumps into the swimming pool with his shoes on and swims ten laps."], label=0),
    dict(ctx_a="A dog runs across a park after a ball.", ctx_b="the dog",
         endings=["writes a letter.", "catches it and brings it back to its owner.", "sleeps.",
                  "climbs a ladder to the roof of a house and sits there watching the birds."], label=1),
    dict(ctx_a="A girl sits at a piano in a concert hall.", ctx_b="she",
         endings=["closes the lid and leaves the stage without a word to anyone.", "bakes bread.",
                  "plays a short piece and the audience claps.", "sneezes."], label=2),
    dict(ctx_a="People wait at a bus stop in the rain.", ctx_b="a bus",
         endings=["turns into a boat.", "stops.", "sings loudly.",
                  "folds its wings, lifts off and flies away over the roofs of the town."], label=1),
]


def write_jsonl(path, items):
    with open(path, 'w') as f:
        for i, item in enumerate(items):
            ctx = item['ctx_a'] + ' ' + item['ctx_b']
            f.write(json.dumps(dict(ind=i, activity_label='Everyday life', ctx_a=item['ctx_a'], ctx_b=item['ctx_b'],
                                    ctx=ctx, split='val', split_type='indomain', label=item['label'],
                                    endings=item['endings'], source_id=f'test~{i}')) + '\n')


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
    """A small random GPT-2 with GPT-2's vocabulary, in Hugging Face format (no download). Its
    larger init spread makes the candidates' losses clearly different."""
    from conftest import save_hf_gpt2
    return save_hf_gpt2(tmp_path_factory.mktemp('hf_gpt2'), initializer_range=0.1)


@pytest.fixture(scope='module')
def items_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('hellaswag') / 'hellaswag_val.jsonl'
    write_jsonl(path, ITEMS)
    return path


def reference(hf_dir, items):
    """Completion-style scoring computed independently with transformers, one candidate at a time:
    predictions by summed and by mean loss over the ending's tokens, and the summed losses."""
    import tiktoken
    from transformers import GPT2LMHeadModel
    enc = tiktoken.get_encoding('gpt2')
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    preds, preds_norm, all_sums = [], [], []
    for item in items:
        ctx = enc.encode(item['ctx_a'] + ' ' + item['ctx_b'])
        sums, means = [], []
        for ending in item['endings']:
            end = enc.encode(' ' + ending)
            ids = torch.tensor([ctx + end])
            with torch.no_grad():
                logprobs = hf(ids).logits[0].log_softmax(-1)
            nll = [-logprobs[t - 1, ids[0, t]].item() for t in range(len(ctx), ids.size(1))]
            sums.append(sum(nll))
            means.append(sum(nll) / len(nll))
        preds.append(min(range(4), key=sums.__getitem__))
        preds_norm.append(min(range(4), key=means.__getitem__))
        all_sums.append(sums)
    return preds, preds_norm, torch.tensor(all_sums)


@pytest.mark.slow
def test_scoring_matches_transformers(hf_dir, items_file):
    preds, preds_norm, ref_sums = reference(hf_dir, ITEMS)
    labels = [item['label'] for item in ITEMS]
    correct = sum(p == l for p, l in zip(preds, labels))
    correct_norm = sum(p == l for p, l in zip(preds_norm, labels))
    # the fixture is a real test: varied choices, some right, summed and per-token loss disagree somewhere
    assert len(set(preds_norm)) > 1 and preds != preds_norm and correct > 0 and correct_norm > 0

    model = GPT.from_pretrained(str(hf_dir))
    examples = load_hellaswag(items_file)
    sums, counts = score_examples(model, examples, 'cpu')
    assert (sums - ref_sums).abs().max().item() < 1e-3
    assert sums.argmin(1).tolist() == preds
    assert (sums / counts).argmin(1).tolist() == preds_norm
    assert evaluate_hellaswag(model, examples, 'cpu', batch_size=3) == (correct, correct_norm, len(ITEMS))
    # split over 2 ranks, the shares add up to the whole
    shares = [evaluate_hellaswag(model, examples, 'cpu', batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert tuple(map(sum, zip(*shares))) == (correct, correct_norm, len(ITEMS))


def test_padding_in_a_batch_changes_nothing():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=32)).eval()
    examples = [dict(ctx=torch.randint(0, 100, (n,)).tolist(), label=0,
                     endings=[torch.randint(0, 100, (k,)).tolist() for k in (2, 5, 3, 7)]) for n in (3, 11, 6)]
    sums, counts = score_examples(model, examples, 'cpu')
    alone = torch.cat([score_examples(model, [ex], 'cpu')[0] for ex in examples])
    assert torch.allclose(sums, alone, atol=1e-5)
    assert counts.tolist() == [[2, 5, 3, 7]] * 3


def test_scoring_builds_no_autograd_graph():
    """train.py calls evaluate_hellaswag inside its training loop, where autograd is on: every forward of the
    scoring must run without it (a graph per forward is memory and time for nothing)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=1, n_head=2, n_embd=16))
    examples = [dict(ctx=[1, 2, 3], label=0, endings=[[4], [5, 6], [7], [8, 9]]) for _ in range(3)]
    graphs = []
    model.register_forward_hook(lambda module, args, out: graphs.append(out[0].requires_grad))
    assert torch.is_grad_enabled()
    sums, counts = score_examples(model, examples, 'cpu')
    evaluate_hellaswag(model, examples, 'cpu', batch_size=2)
    assert graphs == [False] * 3 and not sums.requires_grad
    assert model.training  # and the model is left as it was


@pytest.mark.parametrize('position', ['learned', 'alibi', 'rope', 'none'])
def test_long_contexts_are_cropped_from_the_left_only_with_learned_positions(position):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32, position=position)).eval()
    ctx = torch.randint(0, 100, (40,)).tolist()
    endings = [torch.randint(0, 100, (5,)).tolist() for _ in range(4)]
    long_sums, _ = score_examples(model, [dict(ctx=ctx, endings=endings, label=0)], 'cpu')
    cropped_sums, _ = score_examples(model, [dict(ctx=ctx[-11:], endings=endings, label=0)], 'cpu')
    if position != 'learned':  # the whole 45 tokens, past the block_size
        assert not torch.allclose(long_sums, cropped_sums, atol=1e-4)
    else:  # the last 16 tokens: the end of the context and the whole ending
        assert torch.allclose(long_sums, cropped_sums, atol=1e-5)


def run_script(*args):
    return subprocess.run([sys.executable, 'hellaswag.py', '--device=cpu', '--dtype=float32', *args],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_script_scores_a_checkpoint(hf_dir, items_file, tmp_path):
    model = GPT.from_pretrained(str(hf_dir))
    c = model.config
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                      bias=c.bias, vocab_size=c.vocab_size, dropout=0.0, gelu=c.gelu)  # no flash_attn/alibi, as nanoGPT's
    torch.save(dict(model=model.state_dict(), model_args=model_args, iter_num=0, config={}), tmp_path / 'ckpt.pt')
    proc = run_script(f'--out_dir={tmp_path}', f'--hellaswag_file={items_file}', '--limit=5', '--batch_size=2')
    assert proc.returncode == 0, proc.stderr
    preds, preds_norm, _ = reference(hf_dir, ITEMS[:5])
    labels = [item['label'] for item in ITEMS[:5]]
    correct = sum(p == l for p, l in zip(preds, labels))
    correct_norm = sum(p == l for p, l in zip(preds_norm, labels))
    m = re.search(r'5 items, acc ([\d.]+) \((\d+)/5\), acc_norm ([\d.]+) \((\d+)/5\)', proc.stdout)
    assert m, proc.stdout
    assert (int(m.group(2)), int(m.group(4))) == (correct, correct_norm)
    assert float(m.group(3)) == pytest.approx(correct_norm / 5, abs=1e-4)


@pytest.mark.slow
def test_script_refuses_a_character_level_model(items_file, tmp_path):
    model_args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, bias=False, vocab_size=65, dropout=0.0,
                      flash_attn=True, alibi=False)
    torch.save(dict(model=GPT(GPTConfig(**model_args)).state_dict(), model_args=model_args), tmp_path / 'ckpt.pt')
    proc = run_script(f'--out_dir={tmp_path}', f'--hellaswag_file={items_file}')
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert 'vocabulary of 65 tokens' in proc.stderr and 'GPT-2' in proc.stderr


@pytest.mark.parametrize('args, fragment', [
    (['--batch_size=0'], 'batch_size=0 is not an integer >= 1'),
    (['--limit=0'], 'limit=0 is not an integer >= 1 (or None: all items)'),
    (['--dtype=bf16'], "dtype='bf16' is not one of 'auto', 'float32', 'bfloat16', 'float16'"),
    (['--device=GPU'], "device='GPU' is not 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
])
def test_script_bad_settings_get_a_one_line_error(tmp_path, monkeypatch, args, fragment):
    import shutil
    shutil.copy(os.path.join(ROOT, 'configurator.py'), tmp_path)
    assert fragment in exit_message(monkeypatch, tmp_path, os.path.join(ROOT, 'hellaswag.py'), '--device=cpu', *args)


def train_repo(tmp_path, vocab_size=None):
    """A copy of the scripts with data/tiny: random tokens, of GPT-2's vocabulary unless a meta.pkl says otherwise."""
    import numpy as np
    from conftest import copy_repo
    copy_repo(tmp_path)
    data = tmp_path / 'data' / 'tiny'
    data.mkdir(parents=True)
    tokens = np.random.default_rng(0).integers(0, vocab_size or 50257, 2000).astype(np.uint16)
    tokens[:1800].tofile(data / 'train.bin')
    tokens[1800:].tofile(data / 'val.bin')
    if vocab_size:
        import pickle
        with open(data / 'meta.pkl', 'wb') as f:
            pickle.dump({'vocab_size': vocab_size}, f)
    return tmp_path


def run_train(repo, *args, nproc=1):
    launch = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] if nproc > 1 else []
    return subprocess.run([sys.executable, *launch, 'train.py', '--device=cpu', '--compile=False', '--dtype=float32',
                           '--dataset=tiny', '--out_dir=out', '--n_layer=1', '--n_head=2', '--n_embd=16',
                           '--block_size=16', '--batch_size=4', '--gradient_accumulation_steps=2', '--eval_iters=1',
                           '--log_interval=1', '--warmup_iters=1', *args],
                          capture_output=True, text=True, cwd=repo, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize('fsdp', [False, True])
def test_train_scores_hellaswag_split_over_two_processes(items_file, tmp_path, fsdp):
    # 7 items: one process scores 4, the other 3, yet under FSDP both must run as many forwards
    repo = train_repo(tmp_path)
    proc = run_train(repo, '--max_iters=3', '--eval_interval=3', '--hellaswag_interval=2',
                     f'--hellaswag_file={items_file}', f'--fsdp={fsdp}', nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(repo / 'out' / 'log.jsonl') as f:
        scored = [r for r in map(json.loads, f) if 'hellaswag_acc_norm' in r]
    assert [r['step'] for r in scored] == [0, 2, 3]  # every hellaswag_interval steps and at the end

    # the whole set, scored by the two processes together, is what one process scores on the saved weights
    checkpoint = torch.load(repo / 'out' / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert checkpoint['iter_num'] == 3
    model = GPT(GPTConfig(**checkpoint['model_args']))
    model.load_state_dict(checkpoint['model'])
    correct, correct_norm, total = evaluate_hellaswag(model, load_hellaswag(items_file), 'cpu')
    assert scored[-1]['hellaswag_acc'] == correct / total and scored[-1]['hellaswag_acc_norm'] == correct_norm / total
    assert (f"step 3: hellaswag acc {correct / total:.4f} ({correct}/{total}), "
            f"acc_norm {correct_norm / total:.4f} ({correct_norm}/{total})") in proc.stdout
    assert total == len(ITEMS)

    # plot.py draws the losses of a log with HellaSwag records in it
    png = tmp_path / 'loss.png'
    plot = subprocess.run([sys.executable, 'plot.py', f'--out_dirs={repo / "out"}', f'--out={png}'],
                          capture_output=True, text=True, cwd=ROOT)
    assert plot.returncode == 0 and png.exists(), plot.stderr


@pytest.mark.slow
def test_train_refuses_hellaswag_for_a_character_level_model(items_file, tmp_path):
    repo = train_repo(tmp_path, vocab_size=65)
    proc = run_train(repo, '--max_iters=3', '--hellaswag_interval=2', f'--hellaswag_file={items_file}')
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('train.py: hellaswag_interval=2') and 'vocab_size >= 50257' in last and 'has 65' in last
    assert not (repo / 'out' / 'ckpt.pt').exists()


# ----------------------------------------------------------------------------- issue 21: items checked, files named

def good_item(**changes):
    item = dict(ctx="A man ties his shoes at the door. he", endings=["runs.", "melts.", "sings.", "sleeps."], label=0)
    item.update(changes)
    return item


BAD_ITEMS = [
    (dict(label=7), 'label 0, 1, 2 or 3 (got 7)'),
    (dict(label=-1), 'label 0, 1, 2 or 3 (got -1)'),
    (dict(label='4'), "label 0, 1, 2 or 3 (got '4')"),
    (dict(label=True), 'label 0, 1, 2 or 3 (got True)'),
    (dict(label=None), 'label 0, 1, 2 or 3 (got None)'),
    (dict(endings="runs. melts. sings. sleeps."), 'endings must be a list of 4 strings'),
    (dict(endings=["runs.", "melts.", "sings."]), 'endings must be a list of 4 strings'),
    (dict(endings=["runs.", "melts.", "sings.", 4]), 'endings must be a list of 4 strings'),
    (dict(ctx=["A man", "he"]), 'ctx must be a string'),
]


@pytest.mark.parametrize('changes, fragment', BAD_ITEMS)
def test_bad_items_are_refused_naming_file_and_line(tmp_path, changes, fragment):
    path = tmp_path / 'items.jsonl'
    path.write_text(json.dumps(good_item()) + '\n\n' + json.dumps(good_item(**changes)) + '\n')
    with pytest.raises(ValueError) as e:
        load_hellaswag(str(path))
    assert f'{path} line 3' in str(e.value) and fragment in str(e.value) and '\n' not in str(e.value)
    assert [ex['label'] for ex in load_hellaswag(str(path), limit=1)] == [0]  # the good item before it still loads


def test_string_labels_0_to_3_are_items(tmp_path):
    path = tmp_path / 'items.jsonl'
    path.write_text(''.join(json.dumps(good_item(label=label)) + '\n' for label in ('3', 2, '0')))
    assert [ex['label'] for ex in load_hellaswag(str(path))] == [3, 2, 0]


@pytest.fixture
def bpe_repo(tmp_path):
    """A copy of the scripts with a tiny GPT-2-vocabulary checkpoint in out/."""
    from conftest import copy_repo, save_tiny_run, tiny_model
    copy_repo(tmp_path)
    save_tiny_run(str(tmp_path / 'out' / 'ckpt.pt'), tiny_model(vocab_size=50257), 'somebpe')
    return tmp_path


def test_script_names_a_folder_a_binary_file_and_a_bad_item(bpe_repo, monkeypatch):
    (bpe_repo / 'items').mkdir()
    (bpe_repo / 'items.bin').write_bytes(bytes(range(256)) * 4)
    (bpe_repo / 'bad.jsonl').write_text(json.dumps(good_item()) + '\n' + json.dumps(good_item(label=7)) + '\n')
    for file, fragment in [('items', 'items is a folder, not a HellaSwag jsonl file (hellaswag_val.jsonl)'),
                           ('items.bin', 'items.bin is not UTF-8 text: point --hellaswag_file at hellaswag_val.jsonl'),
                           ('bad.jsonl', 'bad.jsonl line 2: ctx must be a string and label 0, 1, 2 or 3 (got 7)')]:
        message = exit_message(monkeypatch, bpe_repo, 'hellaswag.py', '--device=cpu', '--dtype=float32',
                               f'--hellaswag_file={file}')
        assert message == f'hellaswag.py: {fragment}', message
    # the setting is train.py's name: the old --file is no setting
    message = exit_message(monkeypatch, bpe_repo, 'hellaswag.py', '--device=cpu', '--file=items.bin')
    assert message == 'hellaswag.py: --file is now --hellaswag_file (as in train.py): pass --hellaswag_file=path/to/hellaswag_val.jsonl'


def test_training_names_a_folder_a_binary_file_and_a_bad_item(tmp_path):
    from hellaswag import examples_for_training
    (tmp_path / 'items').mkdir()
    (tmp_path / 'items.bin').write_bytes(bytes(range(256)) * 4)
    (tmp_path / 'bad.jsonl').write_text(json.dumps(good_item(endings='one string')) + '\n')
    for name, fragment in [('items', 'is a folder'), ('items.bin', 'is not UTF-8 text'),
                           ('bad.jsonl', 'line 1: endings must be a list of 4 strings')]:
        with pytest.raises(ValueError) as e:
            examples_for_training(str(tmp_path / name))
        assert f'{tmp_path / name}' in str(e.value) and fragment in str(e.value) and '\n' not in str(e.value)
