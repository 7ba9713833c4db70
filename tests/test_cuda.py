"""The CUDA-only paths, on a real GPU: torch.compile, bfloat16 autocast with fused AdamW, float16 with the GradScaler,
sdpa's flash and memory-efficient kernels with and without ALiBi's mask, the KV cache, the chunked loss, kill -9 and
resume, NCCL DDP and FSDP under torchrun, memory.py's prediction, NVML energy and MFU against the GPU's peak. Skipped,
the whole file, where there is no CUDA GPU; bench_gpu.sh runs it on a GPU machine. Tolerances are bfloat16's where the
math runs in it; runs compared across processes are close, not bit-equal (CUDA's attention and embedding backward
kernels add in no fixed order)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU here: these tests run where torch.cuda.is_available() (bash bench_gpu.sh on a GPU machine)",
                allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import energy  # noqa: E402
import memory  # noqa: E402
import runtime  # noqa: E402
from conftest import phrase_repo, run_script, tiny_model  # noqa: E402
from loss import chunked_cross_entropy  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

DEVICE = 'cuda'
VOCAB = 32
TINY = [f'--device={DEVICE}', '--dataset=tiny', '--n_layer=2', '--n_head=2', '--n_embd=64', '--block_size=32',
        '--batch_size=8', '--bias=False', '--gradient_accumulation_steps=2', '--eval_iters=2', '--log_interval=1',
        '--learning_rate=1e-2', '--warmup_iters=2', '--lr_decay_iters=40', '--dropout=0.0']


@pytest.fixture(autouse=True)
def full_float32():
    """float32 references without TF32 (runtime.setup turns it on for the whole process)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def repo(tmp_path):
    return phrase_repo(tmp_path, VOCAB)


def side_by_side(repo, *runs):
    """train.py once per (args, nproc) in runs, all at once (the GPU has room for them): their CompletedProcesses.
    NCCL says its version when it starts: the proof that DDP and FSDP went through it."""
    env = {'NCCL_DEBUG': 'VERSION'}
    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(lambda run: run_script(repo, 'train.py', *run[0], nproc=run[1], env=env, check=True, timeout=600), runs))


def records(repo, out_dir):
    with open(repo / out_dir / 'log.jsonl') as f:
        return [json.loads(line) for line in f]


def iter_losses(repo, out_dir):
    return {r['iter']: r['loss'] for r in records(repo, out_dir) if 'iter' in r}


def val_losses(repo, out_dir):
    return {r['step']: r['val_loss'] for r in records(repo, out_dir) if 'val_loss' in r}


def find_float(pattern, text):
    found = re.search(pattern, text, re.M)
    return float(found[1]) if found else None


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


# ----------------------------------------------------------------------------- train.py on the GPU

@pytest.fixture(scope='module')
def bfloat16_runs(tmp_path_factory):
    """train.py in bfloat16, eager and compiled, the same 30 iterations: (repo, {'eager': stdout, 'compiled': stdout})."""
    repo = phrase_repo(tmp_path_factory.mktemp('bf16'), VOCAB)
    args = [*TINY, '--dtype=bfloat16', '--max_iters=30', '--eval_interval=15']
    eager, compiled = side_by_side(repo, ([*args, '--compile=False', '--out_dir=eager'], 0),
                                   ([*args, '--compile=True', '--out_dir=compiled'], 0))
    return repo, {'eager': eager.stdout, 'compiled': compiled.stdout}


def test_the_device_plan_on_this_gpu():
    plan = runtime.setup('auto', 'auto', verbose=False, training=True)
    assert plan.device == 'cuda' and plan.pin_memory and plan.flash_attn and not plan.chunked_loss
    assert plan.dtype == ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') and plan.scaler == (plan.dtype == 'float16')


def test_bfloat16_training_compiled_and_eager_lower_the_loss_alike(bfloat16_runs):
    repo, out = bfloat16_runs
    for kind in ('eager', 'compiled'):
        assert re.search(r'^device cuda \(.+\), bfloat16 autocast, sdpa attention, full-logits loss$', out[kind], re.M), out[kind][:2000]
        assert 'using fused AdamW: True' in out[kind]
        val = val_losses(repo, kind)
        assert sorted(val) == [0, 15, 30] and val[30] < val[0] - 1.0, val
    assert 'compiling the model' in out['compiled'] and 'compiling the model' not in out['eager']
    eager, compiled = iter_losses(repo, 'eager'), iter_losses(repo, 'compiled')
    assert sorted(eager) == sorted(compiled) == list(range(30))
    assert compiled[0] == pytest.approx(eager[0], rel=1e-2)  # the same weights and batch: bfloat16 rounding apart
    assert val_losses(repo, 'compiled')[30] == pytest.approx(val_losses(repo, 'eager')[30], abs=0.15)


def test_mfu_against_the_gpus_own_peak(bfloat16_runs):
    _, out = bfloat16_runs
    name = torch.cuda.get_device_name()
    peak = runtime.gpu_peak_flops(name)
    assert peak, f"{name} is not in runtime.GPU_PEAK_FLOPS: add its dense bf16 peak there"
    assert f"MFU against {peak / 1e12:.3g} TFLOP/s ({name}'s bf16/fp16 peak)" in out['eager']
    for kind in ('eager', 'compiled'):
        mfus = [float(m) for m in re.findall(r'^iter (?:[5-9]|\d\d+): .*, mfu ([\d.]+)%', out[kind], re.M)]
        assert len(mfus) == 25 and all(0 <= m < 100 for m in mfus), out[kind][-2000:]  # a tiny model: near 0%
        assert not re.search(r'^iter [0-4]: .*mfu', out[kind], re.M)  # compilation and warm-up are left out


def test_nvml_energy_in_the_iteration_lines_and_the_log(bfloat16_runs):
    repo, out = bfloat16_runs
    for kind in ('eager', 'compiled'):
        assert re.search(r"^energy: cuda:\d+ \(.+\) through NVML's (total-energy counter|power readings)", out[kind], re.M), \
            [line for line in out[kind].splitlines() if 'energy' in line]
        joules = [r['energy_j'] for r in records(repo, kind) if 'energy_j' in r]
        assert all(j > 0 for j in joules) and (joules or kind == 'eager')  # eager's 30 tiny steps may all fall in one update period
        run_joules = find_float(r'^energy of the run: ([\d.e+-]+) J', out[kind])
        assert run_joules and run_joules > 0, out[kind][-2000:]
    # the compiled run's first iteration takes seconds (compilation): the counter has moved by its line
    assert re.search(r'^iter 0: .*, [\d.e+]+ J, [\d.e+-]+ mJ/tok$', out['compiled'], re.M), out['compiled'][-3000:]


def test_nvml_meter_spans_are_positive_joules():
    meter = energy.start(DEVICE, verbose=False)
    assert meter.measured, meter.what
    a = torch.randn(4096, 4096, device=DEVICE)
    t0, span = time.monotonic(), None
    while span is None and time.monotonic() - t0 < 10:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
        if time.monotonic() - t0 > 1:
            span = meter.span('train', tokens=1000)
    assert span is not None, "NVML's counter did not move in 10 s of matrix products"
    watts = span.joules / (time.monotonic() - t0)
    assert 10 < watts < 3000 and energy.text(span).endswith(' mJ/tok'), (span, watts)
    assert meter.finish()['energy_total_j'] >= span.joules


def test_energy_py_probes_the_gpu():
    result = run_script(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'energy.py', 'cuda', check=True)
    assert re.search(r"^energy: cuda:0 \(.+\) through NVML's", result.stdout, re.M), result.stdout
    assert 'a span costs' in result.stdout


def test_float16_trains_with_the_grad_scaler_and_its_state_resumes(repo):
    args = [*TINY, '--dtype=float16', '--eval_interval=6', '--compile=False']
    straight, _ = side_by_side(repo, ([*args, '--max_iters=12', '--out_dir=straight'], 0),
                               ([*args, '--max_iters=6', '--out_dir=stopped'], 0))
    assert re.search(r'^device cuda \(.+\), float16 autocast', straight.stdout, re.M)
    stopped = load(repo / 'stopped' / 'ckpt.pt')
    assert stopped['iter_num'] == 6 and stopped['scaler']['scale'] > 0
    run_script(repo, 'train.py', *args, '--max_iters=12', '--out_dir=stopped', '--init_from=resume', check=True)
    losses = iter_losses(repo, 'straight')
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()) and sorted(losses) == list(range(12))
    val = val_losses(repo, 'straight')
    assert val[12] < val[0] - 0.5, val
    assert iter_losses(repo, 'stopped') == pytest.approx(losses, rel=1e-3)
    # the scale and the count of steps since it last changed went on from the checkpoint, not from a new scaler
    a, b = load(repo / 'straight' / 'ckpt.pt')['scaler'], load(repo / 'stopped' / 'ckpt.pt')['scaler']
    assert a == b and a['_growth_tracker'] != stopped['scaler']['_growth_tracker'], (a, stopped['scaler'])


def test_kill_9_then_resume_equals_the_uninterrupted_run(repo):
    """As the CPU test does with signals: killed outright after a checkpoint, the resumed run ends as the one that was
    never stopped (dropout on: its CUDA random state resumes too)."""
    args = [*TINY, '--dtype=float32', '--compile=False', '--dropout=0.1', '--eval_interval=4',
            '--gradient_accumulation_steps=8']  # 8 micro-steps: an iteration takes long enough to kill it mid-run
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    killed = subprocess.Popen([sys.executable, 'train.py', *args, '--max_iters=100000', '--out_dir=killed'], cwd=repo,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    with ThreadPoolExecutor(1) as pool:
        straight = pool.submit(run_script, repo, 'train.py', *args, '--max_iters=16', '--out_dir=straight', check=True)
        for line in killed.stdout:
            if line.startswith('iter 5:'):  # the checkpoint of step 4 is written
                killed.send_signal(signal.SIGKILL)
                break
        assert killed.wait(timeout=60) == -signal.SIGKILL
        killed.stdout.close()
        straight.result()
    at = load(repo / 'killed' / 'ckpt.pt')['iter_num']
    assert 4 <= at < 16, at
    run_script(repo, 'train.py', *args, '--max_iters=16', '--out_dir=killed', '--init_from=resume', check=True)
    assert [r['iter'] for r in records(repo, 'killed') if 'iter' in r] == list(range(16))  # each once
    assert iter_losses(repo, 'killed') == pytest.approx(iter_losses(repo, 'straight'), rel=1e-4)
    assert val_losses(repo, 'killed')[16] == pytest.approx(val_losses(repo, 'straight')[16], rel=1e-4)
    a, b = load(repo / 'killed' / 'ckpt.pt')['model'], load(repo / 'straight' / 'ckpt.pt')['model']
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_nccl_ddp_and_fsdp_under_torchrun_equal_one_process(repo):
    """One process per GPU here (1 is enough): DDP over NCCL and FSDP in float32 give one process's evaluations;
    FSDP in bfloat16 (its mixed precision: weights gathered in bfloat16) gives bfloat16's, within its rounding."""
    n = torch.cuda.device_count()
    args = [*TINY, f'--gradient_accumulation_steps={2 * n}', '--max_iters=6', '--eval_interval=3', '--compile=False']
    fp32, bf16 = [*args, '--dtype=float32'], [*args, '--dtype=bfloat16']
    results = side_by_side(repo, ([*fp32, '--out_dir=single'], 0), ([*fp32, '--out_dir=ddp'], n),
                           ([*fp32, '--out_dir=fsdp', '--fsdp=True'], n), ([*bf16, '--out_dir=single_bf16'], 0),
                           ([*bf16, '--out_dir=fsdp_bf16', '--fsdp=True'], n))
    single = val_losses(repo, 'single')
    assert sorted(single) == [0, 3, 6] and single[6] < single[0]
    for out_dir in ('ddp', 'fsdp'):
        assert val_losses(repo, out_dir) == pytest.approx(single, rel=1e-4), out_dir
    assert val_losses(repo, 'fsdp_bf16') == pytest.approx(val_losses(repo, 'single_bf16'), abs=0.05)
    assert sorted(iter_losses(repo, 'ddp')) == list(range(6))  # one writer
    fsdp, plain = load(repo / 'fsdp' / 'ckpt.pt'), load(repo / 'single' / 'ckpt.pt')
    assert set(fsdp['model']) == set(plain['model']) and fsdp['iter_num'] == 6  # gathered whole, in the plain layout
    for result in (results[1], results[2], results[4]):
        assert 'device cuda' in result.stdout and 'NCCL version' in result.stdout + result.stderr, result.stdout[-2000:]


# ----------------------------------------------------------------------------- the model's CUDA kernels

def attention_outputs(model, idx, backend=None):
    """(each layer's attention output, the logits, the loss, the gradients) of a training step on idx (no dropout)
    under bfloat16 autocast; backend: the only sdpa kernel allowed, so that one must run."""
    outputs = []
    hooks = [block.attn.register_forward_hook(lambda m, args, out: outputs.append(out.float())) for block in model.transformer.h]
    model.zero_grad()
    with sdpa_kernel(backend) if backend else nullcontext(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    for hook in hooks:
        hook.remove()
    return outputs, logits.float(), loss.float(), [p.grad.float() for p in model.parameters()]


@pytest.mark.parametrize('alibi, T', [(False, 48), (False, 64), (True, 48), (True, 64), (True, 128)],
                         ids=['learned, T < block', 'learned, T = block', 'ALiBi, T < block', 'ALiBi, T = block', 'ALiBi, T > block'])
def test_sdpa_kernels_and_explicit_attention_agree_in_bfloat16(alibi, T):
    """Learned positions train through the flash kernel (no mask: is_causal), ALiBi through the memory-efficient one
    (its bias as the mask); each is forced, so it must run. Both agree with the explicit softmax, and each stays as
    close to float32 as bfloat16 allows, for the attention outputs, logits, loss and gradients."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=96, n_layer=2, n_head=4, n_embd=128, dropout=0.0, bias=False, alibi=alibi)
    fused = GPT(config).to(DEVICE).train()
    with torch.no_grad():
        for block in fused.transformer.h:
            block.attn.c_attn.weight.mul_(5.0)  # peaked attention, so that a wrong mask shows
    explicit = GPT(GPTConfig(**{**config.__dict__, 'flash_attn': False})).to(DEVICE).train()
    explicit.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 96, (4, T), device=DEVICE)
    kernel = SDPBackend.EFFICIENT_ATTENTION if alibi else SDPBackend.FLASH_ATTENTION
    got = {'fused': attention_outputs(fused, idx, kernel), 'explicit': attention_outputs(explicit, idx)}
    # the reference: float32, explicit products, no TF32
    outputs = []
    hooks = [block.attn.register_forward_hook(lambda m, args, out: outputs.append(out)) for block in explicit.transformer.h]
    explicit.zero_grad()
    logits, loss = explicit(idx, idx)
    loss.backward()
    for hook in hooks:
        hook.remove()
    reference = (outputs, logits, loss, [p.grad for p in explicit.parameters()])

    def error(a, b):  # relative to the reference's largest entry
        return ((a - b).abs().max() / b.abs().max()).item()
    for kind, (outs, lg, ls, grads) in got.items():
        for a, b in zip(outs, reference[0]):
            assert error(a, b) < 0.03, (kind, 'attention output', error(a, b))
        assert error(lg, reference[1]) < 0.03, (kind, 'logits', error(lg, reference[1]))
        assert abs(ls.item() - reference[2].item()) < 0.02, (kind, 'loss')
        for (name, _), a, b in zip(explicit.named_parameters(), grads, reference[3]):
            assert error(a, b) < 0.06, (kind, name, error(a, b))
    for a, b in zip(got['fused'][0], got['explicit'][0]):
        assert error(a, b) < 0.05


@pytest.mark.parametrize('alibi', [False, True])
@pytest.mark.parametrize('flash', [False, True])
def test_kv_cache_decoding_equals_the_full_forward(flash, alibi):
    model = tiny_model(block_size=16, vocab_size=50, n_head=4, n_embd=32, flash_attn=flash, alibi=alibi).to(DEVICE)
    idx = torch.randint(0, 50, (2, 16), device=DEVICE)
    with torch.no_grad():
        full, _ = model(idx, idx)
        kv_cache = [[] for _ in model.transformer.h]
        model(idx[:, :8], kv_cache=kv_cache)
        model(idx[:, 8:13], kv_cache=kv_cache, pos=8)  # several positions at once: the mask is offset
        for t in range(13, 16):  # then one at a time, as generate decodes
            last, _ = model(idx[:, t:t + 1], kv_cache=kv_cache, pos=t)
            torch.testing.assert_close(last[:, -1], full[:, t], rtol=1e-4, atol=1e-4)
    prompt = idx[:, :3]  # greedy: the cache gives the tokens of nanoGPT's loop, past block_size too
    assert torch.equal(model.generate(prompt, 30, top_k=1), model.generate(prompt, 30, top_k=1, use_cache=False))


def test_chunked_loss_equals_f_cross_entropy():
    torch.manual_seed(0)
    x = torch.randn(50, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(300, 16, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 300, (50,), device=DEVICE)
    targets[::7] = -1
    expected = F.cross_entropy(x @ weight.t(), targets, ignore_index=-1)
    grads = torch.autograd.grad(expected, (x, weight))
    loss = chunked_cross_entropy(x, weight, targets, chunk_rows=7)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(loss, (x, weight)), grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # GPT-2's vocabulary at its default chunk (2048 rows: two chunks on CUDA), under bfloat16 autocast
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=1024, vocab_size=50304, bias=False)).to(DEVICE)
    idx = torch.randint(0, 50304, (2, 1024), device=DEVICE)

    def loss_and_grads(chunked, bf16=True):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(idx, idx, chunked_loss=chunked)
        return loss.float(), torch.autograd.grad(loss, list(model.parameters()))
    (chunked, chunked_grads), (plain, plain_grads) = loss_and_grads(True), loss_and_grads(False)
    exact, exact_grads = loss_and_grads(False, bf16=False)
    assert abs(chunked - exact) <= 2 * abs(plain - exact) + 1e-3
    for a, b, ref in zip(chunked_grads, plain_grads, exact_grads):
        assert (a - ref).abs().max() <= 2 * (b - ref).abs().max() + 1e-3 * ref.abs().max()


def test_memory_py_predicts_the_peak_of_a_training_step():
    """memory.py's one-GPU total (weights, gradients, AdamW, autocast's copies, activations) against the peak that the
    caching allocator saw in the steps after the first (AdamW's state exists by then), within 25%: memory.py counts
    every gradient beside every activation, though backward frees activations as it makes gradients, and leaves out
    backward's transient tensors and cuBLAS's workspace. A small vocabulary: the logits are a small part here."""
    config = GPTConfig(n_layer=6, n_head=8, n_embd=512, block_size=1024, vocab_size=512, bias=False, dropout=0.0)
    batch_size = 8
    predicted = memory.predicted_bytes(config, batch_size)[5]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model = GPT(config).to(DEVICE)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), DEVICE)
    x = torch.randint(0, config.vocab_size, (batch_size, config.block_size), device=DEVICE)
    for step in range(3):
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    print(f"memory.py predicts {predicted / 2 ** 30:.3f} GiB, the allocator's peak was {measured / 2 ** 30:.3f} GiB")
    assert 0.75 * predicted <= measured <= 1.25 * predicted, (predicted / 2 ** 30, measured / 2 ** 30)
