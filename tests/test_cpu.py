"""cpu.py: the CPU speed-ups keep the model's parameters, state_dict and results, and step aside elsewhere."""
import os
import subprocess
import statistics
import sys

import platform

import pytest
import torch

import cpu
from conftest import ROOT, tiny_model


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('p', [0.1, 0.5])
def test_cpu_dropout_drops_with_probability_p_and_keeps_the_expectation(p, dtype):
    torch.manual_seed(0)
    drop = cpu.BitMaskDropout(p).train()
    x = (torch.rand(1000, 1001) + 0.5).to(dtype)
    x.requires_grad_()
    torch.manual_seed(1)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 3e-3
    for lane in range(4):  # every 16-bit lane of the random words is uniform
        assert abs(kept.view(-1)[lane::4].float().mean().item() - (1 - p)) < 5e-3
    assert abs(y.float().sum().item() / x.float().sum().item() - 1) < 3e-3
    y.sum().backward()  # the gradient passes exactly the kept elements, scaled alike
    torch.testing.assert_close(x.grad, (y.float() / x.float()).detach().to(dtype))  # within dtype's rounding
    torch.manual_seed(1)
    assert torch.equal(drop(x), y)  # follows torch's seed, as F.dropout does (resumes repeat it)
    assert torch.equal(drop.eval()(x), x) and torch.equal(cpu.BitMaskDropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('out_features', [96, 65])  # 65: no slices of equal size, the plain product
def test_decoding_linear_equals_nn_linear(bias, out_features):
    torch.manual_seed(0)
    linear = cpu.DecodingLinear(48, out_features, bias=bias)
    with torch.no_grad():
        for rows in [(1, 1, 48), (3, 1, 48), (2, 2, 48), (1, 5, 48), (48,)]:  # decoded rows; 5 or more rows: F.linear
            x = torch.randn(*rows)
            torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 1, 48, requires_grad=True)  # with autograd: nn.Linear's own path, gradients included
    linear(x).sum().backward()
    torch.testing.assert_close(x.grad, linear.weight.detach().sum(0).expand(2, 1, 48))
    assert list(linear.state_dict()) == list(torch.nn.Linear(48, out_features, bias=bias).state_dict())


@pytest.mark.parametrize('training', [True, False])
def test_speed_up_keeps_parameters_state_dict_and_outputs(training):
    model = tiny_model(dropout=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    idx = torch.randint(0, 50304, (2, 8))
    with torch.no_grad():
        expected = model(idx, idx)[0]
    cpu.speed_up(model, training=training)
    swapped = cpu.BitMaskDropout if training else cpu.DecodingLinear
    assert any(type(m) is swapped for m in model.modules())
    assert list(model.parameters()) == params  # the same tensors, not copies: an optimizer made before still works
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(model(idx, idx)[0], expected, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    generated = model.generate(idx[:, :2], 5, temperature=0)
    assert generated.shape == (2, 7)


def run_spin_choice(env):
    """What set_openmp_wait printed and chose, in a fresh process with env."""
    code = ("import cpu; cpu.set_openmp_wait(); import os; "
            "print('SPIN', os.environ.get('GOMP_SPINCOUNT'), 'THREADS', os.environ.get('OMP_NUM_THREADS'))")
    return subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60).stdout


@pytest.mark.slow
def test_openmp_wait_keeps_the_users_own_setting():
    assert run_spin_choice({**os.environ, 'GOMP_SPINCOUNT': '7', 'OMP_NUM_THREADS': '3'}).strip() == 'SPIN 7 THREADS 3'


@pytest.mark.slow
def test_openmp_threads_and_wait_when_other_processes_keep_the_cpus_busy():
    if not os.path.exists('/proc/stat') or os.path.exists('/proc/driver/nvidia'):
        pytest.skip('Linux without an NVIDIA driver only')
    env = {k: v for k, v in os.environ.items() if k not in ('GOMP_SPINCOUNT', 'OMP_NUM_THREADS')}
    busy = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(os.cpu_count())]
    try:
        import time
        time.sleep(0.3)
        loaded = run_spin_choice(env)
        own_threads = run_spin_choice(dict(env, OMP_NUM_THREADS='2'))
    finally:
        for p in busy:
            p.kill()
    # every core taken: one thread, said in the line that says why
    assert 'SPIN 1000 THREADS 1' in loaded and 'OMP_NUM_THREADS=1' in loaded and 'GOMP_SPINCOUNT=1000' in loaded
    assert 'SPIN 1000 THREADS 2' in own_threads and 'OMP_NUM_THREADS=' not in own_threads.splitlines()[0]


FAULTS_PER_STEP = """
import resource, sys, torch
import cpu
from model import GPT, GPTConfig
if sys.argv[1] == 'keep':
    cpu.keep_freed_memory()
else:  # glibc as it starts: blocks past 128 KiB mapped afresh (it raises that bound as it goes, by chance of order)
    import ctypes
    ctypes.CDLL(None).mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=128, vocab_size=65))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
X = torch.randint(65, (12, 64))
for i in range(23):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    _, loss = model(X, X, chunked_loss=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if i >= 3:  # past the first steps, which fault in the model's and AdamW's memory
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_training_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
    """glibc maps each large block afresh (past 128 KiB as it starts, a bound it then moves by chance of the order
    of frees), so training steps of a small model page-fault their activations in again (hundreds of faults a step);
    cpu.speed_up(training=True) keeps freed memory for the next step, so most steps fault nothing (a thread's first
    use of a block still may: the median step is compared)."""
    def median_faults(mode):
        out = subprocess.run([sys.executable, '-c', FAULTS_PER_STEP, mode], cwd=ROOT, capture_output=True, text=True, check=True)
        return statistics.median(int(n) for n in out.stdout.split())
    mapped, kept = median_faults('mapped'), median_faults('keep')
    assert kept <= 2 and mapped >= 30, (kept, mapped)


@pytest.mark.parametrize('flash_attn', [True, False])
def test_training_with_the_cpu_path_keeps_the_plain_paths_losses(flash_attn):
    """A few AdamW steps as train.py takes them on a CPU (speed_up, the chunked loss: 2 chunks here) against the
    plain model and F.cross_entropy: the same losses and weights, to float rounding."""
    losses, weights = [], []
    for cpu_path in (False, True):
        model = tiny_model(flash_attn=flash_attn).train()
        if cpu_path:
            cpu.speed_up(model, training=True)
        optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
        torch.manual_seed(1)
        run = []
        for _ in range(4):
            idx = torch.randint(0, 50304, (20, 16))  # 320 rows: past one 166-row chunk of 50304 logits
            _, loss = model(idx, idx.roll(1, 1), chunked_loss=cpu_path)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.append(loss.item())
        losses.append(run)
        weights.append(model.lm_head.weight.detach())
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-4, atol=1e-5)
    assert losses[0][-1] < losses[0][0]  # it trained


def split_copy(model, parts):
    """A copy of model whose batches are split into parts, a thread each (cpu.split_batch)."""
    import copy
    model = copy.deepcopy(model)
    assert cpu.split_batch(model, 1, torch.float32, parts) == parts
    return model


@pytest.mark.parametrize('parts', [2, 3])
def test_split_batch_gives_the_whole_batchs_loss_and_gradients(parts, one_thread):
    """Each thread's part of the rows, its loss weighted by its share of the targets (some ignored, unevenly):
    the plain model's loss, gradients and (unchunked) logits, to float rounding, in training and evaluation."""
    plain = tiny_model(vocab_size=97).train()
    split = split_copy(plain, parts)
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 97, (7, 16)), torch.randint(0, 97, (7, 16))
    targets[0, :12] = -1  # the first part has fewer targets than the others
    for model in (plain, split):
        logits, loss = model(idx, targets)
        loss.backward()
        model.results = logits, loss.detach(), [p.grad for p in model.parameters()]
        with torch.no_grad():
            model.eval_loss = model.eval()(idx, targets, chunked_loss=True)[1]
    torch.testing.assert_close(split.results[0], plain.results[0])
    torch.testing.assert_close(split.results[1], plain.results[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(split.results[2], plain.results[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.eval_loss, plain.eval_loss, rtol=1e-6, atol=1e-6)
    assert torch.torch.get_num_threads() == 1  # the parts' threads are the only ones
    with torch.autocast('cpu', dtype=torch.bfloat16):  # each thread runs under the caller's autocast
        assert split.train()(idx, targets)[0].dtype == plain.train()(idx, targets)[0].dtype == torch.bfloat16


def test_split_batch_with_dropout_repeats_from_torchs_seed(one_thread):
    """Each part's dropout draws from its own generator, seeded in order from torch's: the same seed gives the
    same loss and gradients, bit for bit, whichever thread runs first (what exact resume needs)."""
    split = split_copy(tiny_model(dropout=0.2, flash_attn=False).train(), 2)
    idx = torch.randint(0, 50304, (8, 16))
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        _, loss = split(idx, idx)
        loss.backward()
        runs.append([loss.detach()] + [p.grad.clone() for p in split.parameters()])
        split.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0])  # dropout is on: another seed, another loss


def test_split_batch_is_chosen_where_a_batch_takes_many_milliseconds_of_products():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu.split_batch(tiny_model(), 4, torch.float32) == 1  # microseconds of products: torch's threads
        assert torch.get_num_threads() == 2
        model = tiny_model()  # 0.8M parameters x 1M tokens x 6: a few TFLOP, seconds on any CPU
        assert cpu.split_batch(model, 2 ** 20, torch.float32) == 2 and type(model) is cpu.SplitBatchGPT
        assert torch.get_num_threads() == 1
        torch.set_num_threads(1)
        assert cpu.split_batch(tiny_model(), 2 ** 20, torch.float32) == 1  # one thread (a busy CPU): nothing to split over
    finally:
        torch.set_num_threads(threads)
