"""train.py end to end, in subprocesses, on tiny token bins made here (a few seconds each)."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import exit_message, phrase_repo, write_bins
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 32
TINY = ['--device=cpu', '--compile=False', '--dtype=float32', '--dataset=tiny', '--out_dir=out',
        '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=4', '--bias=True',
        '--gradient_accumulation_steps=2', '--eval_iters=2', '--log_interval=1', '--learning_rate=1e-2',
        '--warmup_iters=2', '--lr_decay_iters=40', '--dropout=0.1']


SHAPE = ('--n_layer=', '--n_head=', '--n_embd=', '--block_size=', '--bias=')
NANOGPT = os.path.join(os.path.dirname(ROOT), 'shared', 'reference', 'nanoGPT')  # the original's scripts, if here


@pytest.fixture
def repo(tmp_path):
    return phrase_repo(tmp_path, VOCAB)


def run(repo, *args, torchrun=False, python_code=None, check=True, script='train.py'):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    if torchrun:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', script]
    elif python_code:
        cmd = [sys.executable, '-c', python_code]
    else:
        cmd = [sys.executable, script]
    result = subprocess.run(cmd + list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def read_log(repo, out_dir='out'):
    with open(repo / out_dir / 'log.jsonl') as f:
        return [json.loads(line) for line in f]


def iter_losses(records):
    return {r['iter']: r['loss'] for r in records if 'iter' in r}


def load_ckpt(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]  # libraries may have logged before it
    assert last.startswith('train.py: '), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last, last


@pytest.mark.slow
def test_short_run_lowers_loss_and_writes_checkpoint(repo):
    result = run(repo, *TINY, '--max_iters=30', '--eval_interval=15', '--always_save_checkpoint=False')
    assert 'step 30: train loss ' in result.stdout and 'iter 29: loss ' in result.stdout
    records = read_log(repo)
    evals = [r for r in records if 'step' in r]
    assert [r['step'] for r in evals] == [0, 15, 30]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 1.0
    assert sorted(iter_losses(records)) == list(range(30))
    assert set(records[1]) == {'iter', 'loss', 'time_ms', 'mfu', 'tokens_per_sec', 'lr'}

    ckpt = load_ckpt(repo / 'out' / 'ckpt.pt')
    assert {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config'} <= set(ckpt)
    assert ckpt['iter_num'] == 30 and ckpt['best_val_loss'] == pytest.approx(evals[-1]['val_loss'])
    assert ckpt['model_args'] == dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True,
                                      vocab_size=VOCAB, dropout=0.1, flash_attn=True, alibi=False, gelu='erf',
                                      position='learned', rope_base=10000.0)
    assert ckpt['config']['dataset'] == 'tiny' and ckpt['config']['max_iters'] == 30
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    assert not os.path.exists(repo / 'out' / 'ckpt.pt.tmp')


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(repo):
    run(repo, *TINY, '--gelu=tanh', '--position=rope', '--max_iters=12', '--eval_interval=6', '--out_dir=straight')
    run(repo, *TINY, '--gelu=tanh', '--position=rope', '--max_iters=6', '--eval_interval=6', '--out_dir=stopped')
    assert load_ckpt(repo / 'stopped' / 'ckpt.pt')['iter_num'] == 6
    # as nanoGPT, without the shape settings: the checkpoint's shape (and GELU, positions) wins over the defaults, and says so
    settings = [arg for arg in TINY if not arg.startswith(SHAPE)]
    resumed = run(repo, *settings, '--max_iters=12', '--eval_interval=6', '--out_dir=stopped', '--init_from=resume')
    assert ("resuming with the checkpoint's n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, position=rope, "
            "gelu=tanh (the settings said 12, 12, 768, 1024, False, learned, erf)\n") in resumed.stdout
    assert load_ckpt(repo / 'stopped' / 'ckpt.pt')['config']['n_layer'] == 2
    straight, resumed = read_log(repo, 'straight'), read_log(repo, 'stopped')
    assert iter_losses(resumed) == iter_losses(straight)  # dropout is on: its randomness must resume too
    assert [r for r in resumed if 'step' in r][-1] == [r for r in straight if 'step' in r][-1]
    a, b = load_ckpt(repo / 'straight' / 'ckpt.pt'), load_ckpt(repo / 'stopped' / 'ckpt.pt')
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


@pytest.mark.slow
def test_a_batch_split_over_threads_resumes_exactly_and_trains_as_torchs_threads(repo):
    """--split_batch=2 (cpu.py): a stopped and resumed run repeats the uninterrupted one bit for bit, dropout on;
    without dropout its losses are those of one batch on torch's threads, to float rounding."""
    split = [*TINY, '--split_batch=2', '--max_iters=12', '--eval_interval=6']
    straight = run(repo, *split, '--out_dir=straight')
    assert 'each batch split over 2 threads' in straight.stdout and 'explicit attention' in straight.stdout
    run(repo, *split[:-2], '--max_iters=6', '--eval_interval=6', '--out_dir=stopped')
    run(repo, *split, '--out_dir=stopped', '--init_from=resume')
    assert iter_losses(read_log(repo, 'stopped')) == iter_losses(read_log(repo, 'straight'))
    a, b = load_ckpt(repo / 'straight' / 'ckpt.pt'), load_ckpt(repo / 'stopped' / 'ckpt.pt')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    for parts in (1, 2):
        result = run(repo, *TINY, '--dropout=0.0', f'--split_batch={parts}', '--max_iters=8', f'--out_dir=parts{parts}')
        assert ('each batch split' in result.stdout) == (parts == 2)
    one, two = iter_losses(read_log(repo, 'parts1')), iter_losses(read_log(repo, 'parts2'))
    assert one.keys() == two.keys() and all(abs(one[k] - two[k]) < 1e-4 for k in one), (one, two)


@pytest.mark.slow
def test_cpu_bfloat16_trains_as_well_as_float32(repo):
    """dtype='bfloat16' (what 'auto' picks on a CPU with bf16 instructions) autocasts there, float32 elsewhere."""
    for dtype in ('float32', 'bfloat16'):
        run(repo, *TINY, f'--dtype={dtype}', '--max_iters=30', '--eval_interval=30', f'--out_dir={dtype}')
    f32, bf16 = ([r['val_loss'] for r in read_log(repo, d) if 'step' in r] for d in ('float32', 'bfloat16'))
    assert bf16[-1] < bf16[0] - 1.0
    assert bf16[-1] == pytest.approx(f32[-1], abs=0.05)


COUNT_EVAL_BATCHES = """
import os, runpy, model
forward, evaluated = model.GPT.forward, [0]
def counting_forward(self, *args, **kwargs):
    evaluated[0] += not self.training
    return forward(self, *args, **kwargs)
model.GPT.forward = counting_forward
try:
    runpy.run_path('train.py', run_name='__main__')
finally:
    print(f"rank {os.environ.get('RANK', 0)} evaluated {evaluated[0]} batches", file=__import__("sys").__stdout__)  # train.py silences the other ranks
"""


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(repo):
    (repo / 'count_evals.py').write_text(COUNT_EVAL_BATCHES)  # train.py, counting the batches each process evaluates
    args = [*TINY, '--gradient_accumulation_steps=4', '--max_iters=4', '--eval_interval=4', '--eval_iters=3']
    ddp = run(repo, *args, '--out_dir=ddp', torchrun=True, script='count_evals.py')
    single = run(repo, *args, '--out_dir=single', script='count_evals.py')
    assert ddp.stdout.count('step 4: train loss') == 1 and ddp.stdout.count('iter 3: loss') == 1
    # 2 evaluations of 2 splits of 3 batches: one process scores all 12; two share them, 2 forwards a split each
    # (3 is odd: the second process runs one forward it does not count, as FSDP needs the same forwards everywhere)
    assert 'rank 0 evaluated 12 batches' in single.stdout
    assert 'rank 0 evaluated 8 batches' in ddp.stdout and 'rank 1 evaluated 8 batches' in ddp.stdout
    (ddp_start, ddp_end), (single_start, single_end) = ([r for r in read_log(repo, d) if 'step' in r] for d in ('ddp', 'single'))
    for split in ('train_loss', 'val_loss'):  # the same weights at step 0: the same figures up to float rounding
        assert ddp_start[split] == pytest.approx(single_start[split], rel=1e-6)
        assert ddp_end[split] == pytest.approx(single_end[split], abs=1e-4)
    assert sorted(os.listdir(repo / 'ddp')) == ['.lock', 'ckpt.pt', 'log.jsonl']  # .lock: one run at a time in out_dir
    assert sorted(iter_losses(read_log(repo, 'ddp'))) == [0, 1, 2, 3]  # one writer
    a, b = load_ckpt(repo / 'ddp' / 'ckpt.pt'), load_ckpt(repo / 'single' / 'ckpt.pt')
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=1e-4, atol=1e-5, msg=k)
    assert a['best_val_loss'] == pytest.approx(b['best_val_loss'], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('alibi', [False, True])
def test_compiled_training_matches_eager(repo, alibi):
    """compile=True, the default on GPUs: the losses of eager mode, in one process and (learned positions) under
    2-process DDP. No dropout: compiled code draws its own masks. (Not the weights: a key bias has no gradient
    but rounding noise, which Adam turns into whole steps of either sign.)"""
    args = [*TINY, '--n_layer=1', '--dropout=0.0', '--max_iters=3', '--eval_interval=3', f'--alibi={alibi}']
    run(repo, *args, '--out_dir=eager')
    compiled = ['compiled'] + ([] if alibi else ['compiled_ddp'])
    for out_dir in compiled:
        result = run(repo, *args, '--compile=True', f'--out_dir={out_dir}', torchrun=out_dir.endswith('ddp'))
        assert 'compiling the model' in result.stdout
    eager = read_log(repo, 'eager')
    for out_dir in compiled:
        records = read_log(repo, out_dir)
        if out_dir == 'compiled':  # under DDP the logged loss is the first process's share of the batch only
            assert iter_losses(records) == pytest.approx(iter_losses(eager), rel=1e-4)
        for evaluation, eager_evaluation in zip([r for r in records if 'step' in r], [r for r in eager if 'step' in r]):
            assert evaluation == pytest.approx(eager_evaluation, rel=1e-4), out_dir


@pytest.mark.slow
def test_ddp_rejects_accumulation_steps_that_do_not_divide(repo):
    result = run(repo, *TINY, '--gradient_accumulation_steps=3', torchrun=True, check=False)
    assert result.returncode != 0
    assert 'train.py: gradient_accumulation_steps=3 cannot be divided among 2 processes' in result.stderr


def nanogpt_layout(ckpt):
    """Our checkpoint as the original nanoGPT writes it: a compiled model's '_orig_mod.' prefixes,
    the causal-mask buffers of its non-flash attention, its model_args and config keys, its parameter
    order in the optimizer state, and best_val_loss as a tensor."""
    args = ckpt['model_args']
    T, L = args['block_size'], args['n_layer']
    model = {'_orig_mod.' + k: v for k, v in ckpt['model'].items()}
    for i in range(L):
        model[f'_orig_mod.transformer.h.{i}.attn.bias'] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    block = ['ln_1.weight', 'ln_1.bias', 'attn.c_attn.weight', 'attn.c_attn.bias', 'attn.c_proj.weight',
             'attn.c_proj.bias', 'ln_2.weight', 'ln_2.bias', 'mlp.c_fc.weight', 'mlp.c_fc.bias',
             'mlp.c_proj.weight', 'mlp.c_proj.bias']
    order = (['transformer.wte.weight', 'transformer.wpe.weight'] + [f'transformer.h.{i}.{b}' for i in range(L) for b in block]
             + ['transformer.ln_f.weight', 'transformer.ln_f.bias'])
    ours = GPT(GPTConfig(**args))
    by_group = lambda names: [n for n in names if ckpt['model'][n].dim() >= 2] + [n for n in names if ckpt['model'][n].dim() < 2]
    our_names, nanogpt_names = by_group([n for n, _ in ours.named_parameters()]), by_group(order)
    state = ckpt['optimizer']['state']
    optimizer = {'state': {nanogpt_names.index(n): state[i] for i, n in enumerate(our_names)},
                 'param_groups': ckpt['optimizer']['param_groups']}
    new_keys = ('flash_attn', 'alibi', 'eval_block_size', 'pretrained_embeddings', 'seed')
    return {'model': model, 'optimizer': optimizer,
            'model_args': {k: v for k, v in args.items() if k not in new_keys},
            'iter_num': ckpt['iter_num'], 'best_val_loss': torch.tensor(ckpt['best_val_loss']),
            'config': {k: v for k, v in ckpt['config'].items() if k not in new_keys}}


@pytest.mark.slow
def test_resumes_a_checkpoint_in_the_original_nanogpt_layout(repo):
    run(repo, *TINY, '--max_iters=5', '--eval_interval=5', '--out_dir=ours')
    os.makedirs(repo / 'nanogpt')
    torch.save(nanogpt_layout(load_ckpt(repo / 'ours' / 'ckpt.pt')), repo / 'nanogpt' / 'ckpt.pt')
    for out_dir in ('ours', 'nanogpt'):
        run(repo, *TINY, '--max_iters=9', '--eval_interval=5', f'--out_dir={out_dir}', '--init_from=resume')
    ours, nanogpt = iter_losses(read_log(repo, 'ours')), iter_losses(read_log(repo, 'nanogpt'))
    assert sorted(nanogpt) == [5, 6, 7, 8]
    assert nanogpt == {k: ours[k] for k in nanogpt}


KILLED_IN_SAVE = """
import io, os, runpy, signal, sys, torch
def save_half_then_die(obj, f):
    buffer = io.BytesIO()
    torch.serialization.save(obj, buffer)
    f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_half_then_die
sys.argv = ['train.py'] + sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
"""


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_save_leaves_the_previous_checkpoint(repo):
    run(repo, *TINY, '--max_iters=5', '--eval_interval=5')
    killed = run(repo, *TINY, '--max_iters=10', '--eval_interval=5', '--init_from=resume',
                 python_code=KILLED_IN_SAVE, check=False)
    assert killed.returncode == -9 and 'saving checkpoint' in killed.stdout
    assert load_ckpt(repo / 'out' / 'ckpt.pt')['iter_num'] == 5
    run(repo, *TINY, '--max_iters=10', '--eval_interval=5', '--init_from=resume')
    assert load_ckpt(repo / 'out' / 'ckpt.pt')['iter_num'] == 10


@pytest.mark.slow
@pytest.mark.parametrize('setting, position', [('--alibi=True', 'alibi'), ('--position=rope', 'rope'),
                                               ('--position=none', 'none')])
def test_positions_without_a_table_train_at_one_block_size_and_evaluate_at_twice_it(repo, setting, position):
    # a val split of exactly one window of 32 + 1 tokens: the evaluation can only be over that window
    val = np.fromfile(repo / 'data' / 'tiny' / 'val.bin', dtype=np.uint16)[:33]
    val.tofile(repo / 'data' / 'tiny' / 'val.bin')
    run(repo, *TINY, setting, '--eval_block_size=32', '--max_iters=6', '--eval_interval=6')
    final = [r for r in read_log(repo) if 'step' in r][-1]
    ckpt = load_ckpt(repo / 'out' / 'ckpt.pt')
    assert ckpt['model_args']['position'] == position and ckpt['model_args']['block_size'] == 16
    assert ckpt['model_args']['alibi'] == (position == 'alibi')  # kept in step: older code reads alibi
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    model.eval()
    x = torch.from_numpy(val.astype(np.int64))
    _, loss = model(x[None, :32], x[None, 1:])
    assert final['val_loss'] == pytest.approx(loss.item(), rel=1e-5)


@pytest.fixture
def hf_dir(tmp_path):
    """A random GPT-2 in Hugging Face format with a context of 32, saved locally (no download)."""
    from conftest import save_hf_gpt2
    return save_hf_gpt2(tmp_path / 'hf', vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0)


@pytest.mark.slow
def test_init_from_pretrained_crops_and_evaluates_its_weights(repo, hf_dir):
    from transformers import GPT2LMHeadModel
    val = np.fromfile(repo / 'data' / 'tiny' / 'val.bin', dtype=np.uint16)[:17]
    val.tofile(repo / 'data' / 'tiny' / 'val.bin')
    run(repo, *TINY, f'--init_from={hf_dir}', '--eval_only=True')
    x = torch.from_numpy(val.astype(np.int64))
    with torch.no_grad():
        logits = GPT2LMHeadModel.from_pretrained(hf_dir)(x[None, :16]).logits
    expected = torch.nn.functional.cross_entropy(logits[0], x[1:]).item()
    assert read_log(repo)[-1]['val_loss'] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_pretrained_embeddings_start_the_token_embeddings(repo):
    emb = torch.randn(VOCAB - 2, 24)
    torch.save(emb, repo / 'data' / 'tiny' / 'pretrained_embeddings.pt')
    # a learning rate of 0 keeps the initial weights, to be read back from the checkpoint
    run(repo, *TINY, '--pretrained_embeddings=True', '--learning_rate=0.0', '--decay_lr=False', '--max_iters=1', '--eval_interval=1')
    from model import fit_pretrained_embeddings
    wte = load_ckpt(repo / 'out' / 'ckpt.pt')['model']['transformer.wte.weight']
    torch.testing.assert_close(wte[:VOCAB - 2], fit_pretrained_embeddings(emb, 32))


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(repo):
    run(repo, *TINY, '--max_iters=4', '--eval_interval=4')
    result = run(repo, *TINY, '--max_iters=20', '--eval_interval=4', '--init_from=resume',
                 '--learning_rate=1e30', '--decay_lr=False', check=False)
    assert_one_line_error(result, 'loss is nan at iter ', 'out/ckpt.pt still holds iter 4', 'learning_rate')
    ckpt = load_ckpt(repo / 'out' / 'ckpt.pt')
    assert ckpt['iter_num'] == 4 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


def error_of(repo, monkeypatch, *args):
    """The one-line exit message of train.py with TINY and args, run inside this process; it wrote no file."""
    return exit_message(monkeypatch, repo, 'train.py', *TINY, *args)


@pytest.mark.parametrize('args, fragments', [
    (['--dataset=nothing'], ['no data/nothing/train.bin', 'python data/nothing/prepare.py']),
    (['--init_from=resume'], ['no checkpoint out/ckpt.pt', 'train one first']),
    (['--eval_block_size=32'], ['eval_block_size=32 is larger than block_size=16', "position='rope'"]),
    (['--eval_block_size=0'], ['eval_block_size=0 is not an integer >= 1, or None']),
    (['--position=rotary'], ["position='rotary' is not 'learned', 'alibi', 'rope' or 'none'"]),
    (['--alibi=True', '--position=rope'], ["alibi=True and position='rope' disagree", 'set only position']),
    (['--pretrained_embeddings=True'], ['no data/tiny/pretrained_embeddings.pt', 'python data/openwebtext/pretrained_embeddings.py']),
    (['--init_from=gtp2'], ["init_from='gtp2' is not"]),
    (['--dtype=float8'], ["dtype='float8' is not one of 'auto', 'float32', 'bfloat16', 'float16'"]),
    (['--gelu=gelu_new'], ["gelu='gelu_new' is not 'erf' (the exact GELU, as nanoGPT) or 'tanh' (GPT-2's)"]),
    (['--batch_size=0'], ['batch_size=0 is not an integer >= 1']),
    (['--batch_size=None'], ['batch_size=None is not an integer >= 1']),
    (['--block_size=-16'], ['block_size=-16 is not an integer >= 1']),
    (['--n_layer=0'], ['n_layer=0 is not an integer >= 1']),
    (['--n_head=0'], ['n_head=0 is not an integer >= 1']),
    (['--n_embd=33'], ['n_embd=33 is not a multiple of n_head=2']),
    (['--gradient_accumulation_steps=0'], ['gradient_accumulation_steps=0 is not an integer >= 1']),
    (['--eval_iters=0'], ['eval_iters=0 is not an integer >= 1']),
    (['--eval_interval=0'], ['eval_interval=0 is not an integer >= 1']),
    (['--log_interval=0'], ['log_interval=0 is not an integer >= 1']),
    (['--learning_rate=-1'], ['learning_rate=-1.0 is not a number >= 0']),
    (['--weight_decay=-0.1'], ['weight_decay=-0.1 is not a number >= 0']),
    (['--grad_clip=-1.0'], ['grad_clip=-1.0 is not a number >= 0']),
    (['--max_iters=-1'], ['max_iters=-1 is not a number >= 0']),
    (['--warmup_iters=-10'], ['warmup_iters=-10 is not a number >= 0']),
    (['--lr_decay_iters=-1'], ['lr_decay_iters=-1 is not a number >= 0']),
    (['--hellaswag_interval=-1'], ['hellaswag_interval=-1 is not a number >= 0']),
    (['--seed=-1'], ['seed=-1 is not a number >= 0']),
    (['--min_lr=0.1'], ['min_lr=0.1 is not in [0, learning_rate=0.01]', 'decay_lr=False']),
    (['--min_lr=-1e-4'], ['min_lr=-0.0001 is not in [0, learning_rate=0.01]']),
    (['--dropout=1.0'], ['dropout=1.0 is not in [0, 1)']),
    (['--dropout=-0.1'], ['dropout=-0.1 is not in [0, 1)']),
    (['--beta1=1.0'], ['beta1=1.0 is not in [0, 1)']),
    (['--beta2=1.5'], ['beta2=1.5 is not in [0, 1)']),
    (['--device=gpu'], ["device='gpu' is not 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"]),
    (['--device=cuda:x'], ["device='cuda:x' is not 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"]),
    (['--out_dir='], ["out_dir='' is not a directory name"]),
    (['--split_batch=0'], ['split_batch=0 is not None (where it is faster), 1 (off) or an integer >= 2']),
])
def test_bad_settings_get_a_one_line_error(repo, monkeypatch, args, fragments):
    message = error_of(repo, monkeypatch, *args)
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize('split, tokens, fragments', [
    pytest.param('val', bytes(81), ['data/tiny/val.bin has an odd number of bytes', 'prepare.py'], id='odd size'),
    pytest.param('train', b'', ['data/tiny/train.bin has only 0 tokens'], id='empty'),
    pytest.param('train', np.arange(1000, dtype=np.uint16).tobytes(), ['data/tiny/train.bin holds token id ', 'vocab_size 32'],
                 id='ids past the vocabulary'),
    pytest.param('val', np.full(100, VOCAB, np.uint16).tobytes(), [f'data/tiny/val.bin holds token id {VOCAB}', 'meta.pkl'],
                 id='the first id past it'),
])
def test_bad_data_files_get_a_one_line_error_naming_the_file(repo, monkeypatch, split, tokens, fragments):
    (repo / 'data' / 'tiny' / f'{split}.bin').write_bytes(tokens)
    message = error_of(repo, monkeypatch, '--max_iters=2')
    for fragment in fragments:
        assert fragment in message


def test_resume_on_a_dataset_of_another_vocabulary(repo, monkeypatch):
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=VOCAB, dropout=0.1)
    os.makedirs(repo / 'out')
    model = GPT(GPTConfig(**model_args))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    torch.save({'model': model.state_dict(), 'model_args': model_args, 'optimizer': optimizer.state_dict(),
                'iter_num': 0, 'best_val_loss': 1e9}, repo / 'out' / 'ckpt.pt')
    tokens = np.random.default_rng(0).integers(0, 2 * VOCAB, 1000)
    write_bins(repo / 'data' / 'wide', tokens, tokens[:200])
    with open(repo / 'data' / 'wide' / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 2 * VOCAB}, f)
    message = error_of(repo, monkeypatch, '--init_from=resume', '--dataset=wide')
    # refused as a shape that differs, or (when resuming takes the checkpoint's shape) at the first batch of ids past it
    assert f'vocab_size={VOCAB}' in message or "data/wide/train.bin holds token id" in message, message


def test_resume_refuses_a_checkpoint_of_weights_only(repo, monkeypatch):
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=VOCAB, dropout=0.1)
    os.makedirs(repo / 'out')
    torch.save({'model': GPT(GPTConfig(**model_args)).state_dict(), 'model_args': model_args}, repo / 'out' / 'ckpt.pt')
    assert 'out/ckpt.pt has no optimizer, iter_num, best_val_loss' in error_of(repo, monkeypatch, '--init_from=resume')


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_cuda_device_without_a_gpu(repo, monkeypatch):
    assert '--device=cpu' in error_of(repo, monkeypatch, '--device=cuda')


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(NANOGPT), reason=f'the original nanoGPT is not at {NANOGPT}')
def test_resumes_a_checkpoint_written_by_the_original_nanogpt(repo, tmp_path):
    original = tmp_path / 'nanogpt'  # the original's scripts beside our tiny data
    original.mkdir()
    for name in ('train.py', 'model.py', 'configurator.py'):
        shutil.copy(os.path.join(NANOGPT, name), original)
    shutil.copytree(repo / 'data', original / 'data')
    run(original, '--device=cpu', '--compile=False', '--dtype=float32', '--dataset=tiny', '--out_dir=out', '--n_layer=2',
        '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2',
        '--eval_interval=4', '--max_iters=4', '--learning_rate=1e-2', '--warmup_iters=2', '--lr_decay_iters=40')
    os.makedirs(repo / 'out')
    shutil.copy(original / 'out' / 'ckpt.pt', repo / 'out' / 'ckpt.pt')  # iter 4, best_val_loss a tensor

    # nanoGPT's own command: the checkpoint's shape (nanoGPT's default bias=False too) over our defaults
    settings = [arg for arg in TINY if not arg.startswith(SHAPE)]
    result = run(repo, *settings, '--max_iters=8', '--eval_interval=4', '--init_from=resume')
    assert ("resuming with the checkpoint's n_layer=2, n_head=2, n_embd=32, block_size=16 "
            "(the settings said 12, 12, 768, 1024)\n") in result.stdout
    records = read_log(repo)
    assert sorted(iter_losses(records)) == [4, 5, 6, 7]
    assert [r['step'] for r in records if 'step' in r] == [4, 8]

    # the weights nanoGPT saved give our model the logits they give nanoGPT's own
    import importlib.util
    spec = importlib.util.spec_from_file_location('nanogpt_model', original / 'model.py')
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)
    ckpt = load_ckpt(original / 'out' / 'ckpt.pt')
    theirs = nanogpt.GPT(nanogpt.GPTConfig(**ckpt['model_args'])).eval()
    theirs.load_state_dict(ckpt['model'])
    from files import load_checkpoint
    ours = load_checkpoint(original / 'out')[0].eval()
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, x)[0], theirs(x, x)[0], rtol=0, atol=1e-6)  # nanoGPT's exact GELU too


@pytest.mark.parametrize('args', [['--position=rope'], ['--alibi=True']])
def test_pretrained_gpt2_keeps_its_learned_positions(repo, monkeypatch, hf_dir, args):
    message = error_of(repo, monkeypatch, f'--init_from={hf_dir}', *args)
    assert f"is not 'learned', as GPT-2's weights (init_from={hf_dir})" in message


def test_block_size_larger_than_the_pretrained_model(repo, monkeypatch, hf_dir):
    message = error_of(repo, monkeypatch, f'--init_from={hf_dir}', '--block_size=64')
    assert f"block_size=64 is larger than {hf_dir}'s 32: use --block_size=32 or less" in message


@pytest.mark.slow
def test_fsdp_trains_like_one_process_and_its_checkpoints_resume_anywhere(repo):
    """--fsdp=True over 2 processes gives the evaluations of one process with the same global batch; its
    ckpt.pt, gathered whole in the plain layout, samples and resumes under FSDP (exactly), DDP and one
    process. Dropout is on; the interrupted FSDP run recomputes activations (gradient_checkpointing)."""
    args = [*TINY, '--gradient_accumulation_steps=4', '--eval_interval=3']
    run(repo, *args, '--max_iters=6', '--out_dir=single')
    run(repo, *args, '--max_iters=6', '--out_dir=fsdp', '--fsdp=True', torchrun=True)
    run(repo, *args, '--max_iters=3', '--out_dir=fsdp3', '--fsdp=True', '--gradient_checkpointing=True', torchrun=True)
    for out_dir in ('fsdp3_ddp', 'fsdp3_single'):
        shutil.copytree(repo / 'fsdp3', repo / out_dir)
    run(repo, *args, '--max_iters=6', '--out_dir=fsdp3', '--fsdp=True', '--init_from=resume', torchrun=True)
    run(repo, *args, '--max_iters=6', '--out_dir=fsdp3_ddp', '--init_from=resume', torchrun=True)
    run(repo, *args, '--max_iters=6', '--out_dir=fsdp3_single', '--init_from=resume')

    evals = lambda out_dir: {r['step']: r['val_loss'] for r in read_log(repo, out_dir) if 'step' in r}
    assert sorted(evals('fsdp')) == [0, 3, 6] and evals('fsdp') == pytest.approx(evals('single'), rel=1e-5)
    assert evals('fsdp3') == evals('fsdp') and iter_losses(read_log(repo, 'fsdp3')) == iter_losses(read_log(repo, 'fsdp'))
    fsdp, single = load_ckpt(repo / 'fsdp' / 'ckpt.pt'), load_ckpt(repo / 'single' / 'ckpt.pt')
    assert set(fsdp) == set(single) and fsdp['iter_num'] == 6
    assert fsdp['model']['lm_head.weight'] is fsdp['model']['transformer.wte.weight']  # tied, saved once
    resumed = load_ckpt(repo / 'fsdp3' / 'ckpt.pt')
    for k in fsdp['model']:
        assert torch.equal(resumed['model'][k], fsdp['model'][k]), k
    for out_dir in ('single', 'fsdp3_ddp', 'fsdp3_single'):
        other = load_ckpt(repo / out_dir / 'ckpt.pt')
        assert other['iter_num'] == 6 and evals(out_dir)[6] == pytest.approx(evals('fsdp')[6], rel=1e-5), out_dir
        for k in fsdp['model']:
            torch.testing.assert_close(other['model'][k], fsdp['model'][k], rtol=1e-4, atol=1e-4, msg=k)
        # the optimizer state in a plain AdamW's layout (so FSDP resumes any ckpt.pt), parameter for parameter
        assert other['optimizer']['param_groups'] == fsdp['optimizer']['param_groups']
        for i, state in fsdp['optimizer']['state'].items():
            for name, value in state.items():
                torch.testing.assert_close(other['optimizer']['state'][i][name], value, rtol=1e-3, atol=1e-6)

    shutil.copy(os.path.join(ROOT, 'sample.py'), repo)
    chars = 'abcdefghijklmnopqrstuvwxyz .,;!\n'
    with open(repo / 'data' / 'tiny' / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': VOCAB, 'stoi': {c: i for i, c in enumerate(chars)}, 'itos': dict(enumerate(chars))}, f)
    sample = subprocess.run([sys.executable, 'sample.py', '--device=cpu', '--dtype=float32', '--out_dir=fsdp',
                             '--num_samples=1', '--max_new_tokens=20', '--start=a'], cwd=repo, capture_output=True, text=True)
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert any(len(line) == 21 and line.startswith('a') for line in sample.stdout.splitlines()), sample.stdout


@pytest.mark.slow
def test_fsdp_trains_rope_like_one_process(repo):
    args = [*TINY, '--position=rope', '--gradient_accumulation_steps=4', '--eval_interval=3', '--max_iters=3']
    run(repo, *args, '--out_dir=single')
    run(repo, *args, '--out_dir=fsdp', '--fsdp=True', torchrun=True)
    evals = lambda out_dir: [r['val_loss'] for r in read_log(repo, out_dir) if 'step' in r]
    assert evals('fsdp') == pytest.approx(evals('single'), rel=1e-5)
    assert load_ckpt(repo / 'fsdp' / 'ckpt.pt')['model_args']['position'] == 'rope'


@pytest.mark.slow
def test_fsdp_without_torchrun(repo, monkeypatch):
    assert 'torchrun --standalone --nproc_per_node=N' in error_of(repo, monkeypatch, '--fsdp=True')


@pytest.mark.slow
def test_openmp_spins_briefly_when_other_processes_keep_a_cpu_busy(repo):
    busy = subprocess.Popen([sys.executable, '-c', 'while True: pass'])  # another job, on one core
    try:
        env = {k: v for k, v in os.environ.items() if k != 'GOMP_SPINCOUNT'}
        result = subprocess.run([sys.executable, 'train.py', '--help'], cwd=repo, env=env, capture_output=True, text=True)
        assert 'GOMP_SPINCOUNT=1000' in result.stdout.splitlines()[0]
        result = subprocess.run([sys.executable, 'train.py', '--help'], cwd=repo, capture_output=True, text=True,
                                env=dict(env, GOMP_SPINCOUNT='50000'))  # the user's own setting wins
        assert 'GOMP_SPINCOUNT' not in result.stdout
    finally:
        busy.kill()
