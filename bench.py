"""
Benchmarks of one model shape, with the same settings mechanism, device plan and CPU speed-ups as train.py
and sample.py:
mode='train': the training step (forward, backward, optimizer) on real or random data: ms/iter,
tokens/s and MFU, or with profile=True a torch.profiler trace.
mode='sample': generation tokens/s of GPT.generate with the KV cache, without it (nanoGPT's loop),
and of Hugging Face's GPT2LMHeadModel.generate on a model of the same shape, in the same run:
    python bench.py --mode=sample --device=cpu --dtype=float32 --compile=False --batch_size=1 --n_layer=6 --n_head=6 --n_embd=384 --bias=True --vocab_size=65
"""
import os
import statistics
import time

import cpu
cpu.set_openmp_wait()  # as train.py: before torch loads OpenMP
import numpy as np
import torch
from tqdm import tqdm

import runtime
from files import check_token_ids, dataset_dir, load_meta, open_bin
from configurator import fail, check
from model import GPTConfig, GPT

# -----------------------------------------------------------------------------
mode = 'train'  # 'train' or 'sample'
batch_size = 12
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = None  # None: as train.py, data/<dataset>/meta.pkl's vocabulary where there is one, else GPT-2's 50304
bias = False
flash_attn = True
position = 'learned'  # 'learned', 'alibi', 'rope' or 'none' (model.py)
alibi = False  # the older switch for position='alibi'
gelu = 'erf'  # or 'tanh', GPT-2's (model.py); sample mode gives Hugging Face's model the same one
real_data = True  # train on data/<dataset>/train.bin; False: random tokens
dataset = 'openwebtext'
seed = 1337
device = 'auto'  # a CUDA GPU, else Apple's MPS, else the CPU; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # bfloat16 where the device has it, float16 on older GPUs, else float32; or one of those
compile = True  # use PyTorch 2.0 to compile the model to be faster
profile = False  # use pytorch profiler, or just simple benchmarking?
max_new_tokens = 500  # sample mode: tokens generated after a one-token prompt
top_k = 200  # sample mode
sample_rounds = 5  # sample mode: cached and Hugging Face runs, alternating (the uncached loop runs once)
energy_toggles = False  # instead: joules per token of this mode's step, flash_attn on and off, for each position (energy.py)
energy_rounds = 5  # rounds of the toggles, alternating
energy_seconds = 2.0  # each run's least duration per round, so that the counter moves
measure_energy = False  # train mode: also the step's mJ/token where energy is measured (energy_rounds of energy_seconds)
exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())  # overrides from command line or config file
meta_path = os.path.join(dataset_dir(dataset), 'meta.pkl')
if vocab_size is None and os.path.exists(meta_path):  # the model train.py would train on this dataset
    try:
        vocab_size = load_meta(meta_path)['vocab_size']
    except ValueError as e:
        fail(e)
    print(f"found vocab_size = {vocab_size} (inside {meta_path})")
vocab_size = 50304 if vocab_size is None else vocab_size  # GPT-2's 50257, padded up to a multiple of 64
for k in ('batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'vocab_size', 'max_new_tokens', 'sample_rounds'):
    check(k, lambda v: v >= 1, 'an integer >= 1')
check('n_embd', lambda v: v % n_head == 0, f'a multiple of n_head={n_head}')
check('top_k', lambda v: v is None or v >= 1, 'an integer >= 1 (or None: no limit)')
check('gelu', lambda v: v in ('erf', 'tanh'), "'erf' or 'tanh'")
check('mode', lambda v: v in ('train', 'sample'), "'train' or 'sample'")
# -----------------------------------------------------------------------------

if mode == 'sample' and 1 + max_new_tokens > block_size:
    fail(f"1 + max_new_tokens = {1 + max_new_tokens} is past block_size {block_size}, where Hugging Face's GPT-2 "
         f"cannot go: raise block_size or lower max_new_tokens")
torch.manual_seed(seed)
try:
    plan = runtime.setup(device, dtype, decoding=mode == 'sample', training=mode == 'train', flash_attn=flash_attn)
except ValueError as e:
    fail(e)
device, device_type, ctx = plan.device, plan.device_type, plan.ctx
sync = lambda: runtime.synchronize(device_type)
try:  # a position it does not know, or one that disagrees with alibi=True: one line
    gptconf = GPTConfig(block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                        dropout=0.0, bias=bias, flash_attn=plan.flash_attn, position=position, alibi=alibi, gelu=gelu)
except ValueError as e:
    fail(e)
model = GPT(gptconf)
model.to(device)
if device_type == 'cpu':
    cpu.speed_up(model, training=mode == 'train')
    if mode == 'train' and not compile:  # as train.py trains
        cpu.split_batch(model, batch_size * block_size, plan.autocast or torch.float32)


def median_and_spread(xs):
    return f"{statistics.median(xs):.4g} ({min(xs):.4g}-{max(xs):.4g})"


def time_sampling():
    """Tokens/s of our generate (KV cache, then nanoGPT's uncached loop) and of Hugging Face's, alternating."""
    import transformers
    model.eval()
    if compile:
        model.compile(dynamic=True)  # in place, so generate's calls go through it; one graph for all lengths
    hf_config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
                                        n_head=n_head, bos_token_id=None, eos_token_id=None,
                                        activation_function='gelu' if gelu == 'erf' else 'gelu_new')
    hf = transformers.GPT2LMHeadModel(hf_config).to(device).eval()  # random weights: speed only
    prompt = torch.zeros((batch_size, 1), dtype=torch.long, device=device)

    def tokens_per_s(generate, n=max_new_tokens):
        sync()
        t0 = time.perf_counter()
        out = generate(n)
        sync()
        assert out.shape == (batch_size, 1 + n), out.shape  # really produced every token
        return batch_size * n / (time.perf_counter() - t0)

    ours = lambda n: model.generate(prompt, n, top_k=top_k)
    theirs = lambda n: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=True, top_k=top_k, pad_token_id=0)

    def uncached_loop(n):  # nanoGPT's loop reruns the whole context for every token: one token per call is the same work
        idx = prompt
        for _ in tqdm(range(n), desc='no cache', unit='token', leave=False):  # minutes on a CPU: show progress
            idx = model.generate(idx, 1, top_k=top_k, use_cache=False)
        return idx

    print(f"{n_layer} layers, {n_head} heads, {n_embd} wide, block_size {block_size}, vocab {vocab_size}, "
          f"batch {batch_size}, 1-token prompt, {max_new_tokens} new tokens, top_k {top_k}, {device} "
          f"({runtime.device_name(device)}), {torch.get_num_threads()} threads, {plan.dtype}")
    with torch.inference_mode(), ctx:  # both generate loops run without autograd bookkeeping
        tokens_per_s(ours, 20)  # warm up
        tokens_per_s(theirs, 20)
        cached, hugging_face = [], []
        for r in range(sample_rounds):
            for run in ((ours, theirs) if r % 2 == 0 else (theirs, ours)):  # alternating which goes first
                (cached if run is ours else hugging_face).append(tokens_per_s(run))
            print(f"round {r}: KV cache {cached[-1]:.1f} tokens/s, Hugging Face {hugging_face[-1]:.1f} tokens/s, "
                  f"ratio {cached[-1] / hugging_face[-1]:.2f}x")
        uncached = tokens_per_s(uncached_loop)
    ratios = [c / h for c, h in zip(cached, hugging_face)]
    print(f"tokens/s, median (min-max) of {sample_rounds}: KV cache {median_and_spread(cached)}, no cache (nanoGPT's loop) "
          f"{uncached:.1f}, Hugging Face generate {median_and_spread(hugging_face)}; "
          f"KV cache vs Hugging Face {median_and_spread(ratios)}x, vs no cache {sorted(cached)[len(cached) // 2] / uncached:.1f}x")


def batches():
    """A function giving the next (x, y): windows of data/<dataset>/train.bin, or one fixed random batch."""
    if not real_data:
        x = torch.randint(vocab_size, (batch_size, block_size), device=device)
        y = torch.randint(vocab_size, (batch_size, block_size), device=device)
        return lambda: (x, y)
    path = os.path.join(dataset_dir(dataset), 'train.bin')
    try:
        train_data = open_bin(path, block_size + 1)
    except ValueError as e:
        fail(f"{e}, or pass --real_data=False")

    def get_batch():
        ix = torch.randint(len(train_data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(train_data[i:i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train_data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
        try:
            check_token_ids(max(x.max(), y.max()).item(), vocab_size, path)
        except ValueError as e:
            fail(f"{e}; or pass the dataset's --vocab_size")
        if plan.pin_memory:
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)
    return get_batch


def training_step(model):
    """A function of (X, Y) that runs one training step of model (forward, backward, AdamW) and returns the loss."""
    optimizer = model.configure_optimizers(weight_decay=1e-2, learning_rate=1e-4, betas=(0.9, 0.95), device_type=device_type)
    scaler = runtime.grad_scaler(plan)
    step_model = torch.compile(model) if compile else model

    def train_step(X, Y):
        with ctx:
            _, loss = step_model(X, Y, chunked_loss=plan.chunked_loss)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item()
    return train_step


def time_training():
    """ms per training step, tokens/s and MFU; or, with profile, a torch.profiler trace of a few steps."""
    get_batch = batches()
    if compile:
        print("Compiling model...")
    train_step = training_step(model)

    if profile:
        # torch.profiler over a few steps: wait, warm up, record; the trace opens in chrome://tracing or Perfetto
        trace_path = 'trace_bench.json'
        wait, warmup, active = 2, 2, 3
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device_type == 'cuda' else [])
        with torch.profiler.profile(activities=activities, schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active),
                                    on_trace_ready=lambda prof: prof.export_chrome_trace(trace_path),
                                    record_shapes=False, profile_memory=False, with_stack=False) as prof:
            X, Y = get_batch()
            for k in range(wait + warmup + active):
                lossf = train_step(X, Y)
                X, Y = get_batch()
                print(f"{k}/{wait + warmup + active} loss: {lossf:.4f}")
                prof.step()
        print(f"wrote profiler trace to {trace_path}")
        print(prof.key_averages().table(sort_by='self_cuda_time_total' if device_type == 'cuda' else 'self_cpu_time_total', row_limit=15))
        return
    peak, peak_note = runtime.peak_flops(plan)  # as train.py measures MFU
    print(f"MFU against {peak / 1e12:.3g} TFLOP/s ({peak_note})" if peak else f"MFU not shown: {peak_note}")
    X, Y = get_batch()
    for stage, num_steps in enumerate([10, 20]):  # warm up (and compile), then time
        sync()
        t0 = time.perf_counter()
        for k in range(num_steps):
            lossf = train_step(X, Y)
            X, Y = get_batch()
            print(f"{k}/{num_steps} loss: {lossf:.4f}")
        sync()
        dt = time.perf_counter() - t0
    mfu = f", MFU {model.estimate_mfu(batch_size * num_steps, dt, peak) * 100:.2f}%" if peak else ""
    print(f"time per iteration: {dt / num_steps * 1000:.2f} ms, {batch_size * block_size * num_steps / dt:,.0f} tokens/s{mfu}")
    if device_type == 'cuda':
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB (torch.cuda.max_memory_allocated)")
    if measure_energy:
        step_energy(lambda: train_step(X, Y), batch_size * block_size)


def step_energy(step, tokens):
    """Millijoules per token of step(), which does tokens' worth of work: compare_energy of this one run."""
    import energy
    meter = energy.start(device, verbose=False)
    if not meter.measured:
        print(f"energy not measured here: {meter.what}")
        return
    out = compare_energy(meter, {'step': (step, tokens)})['step']
    print(f"energy: {median_and_spread(out['mj_per_token'])} mJ/token, {median_and_spread(out['watts'])} W, "
          f"median (min-max) of {energy_rounds} runs of {energy_seconds:g} s or more ({meter.what})")


def compare_energy(meter, runs):
    """Millijoules per token of each of runs, a dict name -> (step, tokens): step() does tokens tokens' worth of work.
    Each of energy_rounds rounds runs every one for at least energy_seconds and until the counter has moved, in
    alternating order (forwards, then backwards). Prints a line a round and, for each, median (min-max) of mJ/token
    and watts; returns {name: {'mj_per_token': [...], 'watts': [...]}}."""
    names = list(runs)
    out = {name: {'mj_per_token': [], 'watts': []} for name in names}
    for r in range(energy_rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            step, tokens = runs[name]
            sync()
            while meter.span('train') is None:  # start just after the counter moved
                time.sleep(0.001)
            t0, calls, span = time.perf_counter(), 0, None
            while span is None:
                step()
                calls += 1
                if time.perf_counter() - t0 >= energy_seconds:
                    sync()
                    span = meter.span('train', tokens=calls * tokens)
            out[name]['mj_per_token'].append(span.mj_per_token)
            out[name]['watts'].append(span.joules / (time.perf_counter() - t0))
        print(f"round {r}: " + ', '.join(f"{name} {out[name]['mj_per_token'][-1]:.4g} mJ/tok" for name in names))
    for name in names:
        print(f"{name}: {median_and_spread(out[name]['mj_per_token'])} mJ/token, "
              f"{median_and_spread(out[name]['watts'])} W, median (min-max) of {energy_rounds}")
    return out


def compare_toggles_energy():
    """The table the fork was built for: millijoules per token of this mode's step (a training step, or generating
    max_new_tokens) with flash_attn on and off for each position scheme, the eight runs alternating, median and spread."""
    import energy
    meter = energy.start(device, verbose=False)
    if not meter.measured:
        fail(f"energy_toggles=True, but energy is not measured here: {meter.what}")
    print(f"energy: {meter.what}")
    runs = {}
    for scheme, flash in [(scheme, flash) for scheme in ('learned', 'alibi', 'rope', 'none') for flash in (True, False)]:
        torch.manual_seed(seed)
        m = GPT(GPTConfig(**{**gptconf.__dict__, 'flash_attn': flash, 'position': scheme, 'alibi': False})).to(device)
        x = torch.randint(vocab_size, (batch_size, block_size if mode == 'train' else 1), device=device)
        if mode == 'train':
            step = lambda train_step=training_step(m), x=x: train_step(x, x)
            tokens = batch_size * block_size
        else:
            m.eval()

            def step(m=m, x=x):
                with torch.inference_mode(), ctx:
                    m.generate(x, max_new_tokens, top_k=top_k)
            tokens = batch_size * max_new_tokens
        step()  # warm up (and compile)
        runs[f"position={scheme} flash_attn={flash}"] = (step, tokens)
    print(f"{mode}: {n_layer} layers, {n_head} heads, {n_embd} wide, block_size {block_size}, batch {batch_size}, "
          f"{device} ({runtime.device_name(device)}), {plan.dtype}; mJ per token, median (min-max) of {energy_rounds}")
    compare_energy(meter, runs)


if energy_toggles:
    compare_toggles_energy()
elif mode == 'sample':
    time_sampling()
else:
    time_training()
