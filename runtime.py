"""
What every script needs from the machine, decided in one place: the device ('auto': a CUDA GPU, else
Apple's MPS, else the CPU), the precision and its autocast context, loss scaling for float16, TF32, for
training the attention kernel and the loss, synchronisation for timings, and the peak FLOP/s that MFU is
measured against.
    plan = runtime.setup(device, dtype)   # prints one line saying what runs where, in what precision
    with plan.ctx:
        logits, loss = model(X, Y)
device_plan() makes the decisions from what the machine has, passed in, so that CUDA, MPS and CPU
are all tested on any machine.
"""
import time
import platform
import subprocess
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache

import torch

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

# dense bfloat16/float16 tensor-core FLOP/s (no sparsity; fp32 accumulate), by a part of torch.cuda.get_device_name;
# the first match wins, so a name comes before the names it is part of ('A100' before 'A10')
GPU_PEAK_FLOPS = [
    ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12), ('H200', 989e12), ('B200', 2250e12),
    ('A100', 312e12), ('A10G', 70e12), ('A10', 125e12), ('A6000', 155e12), ('A40', 150e12),
    ('L40S', 362e12), ('L40', 181e12), ('L4', 121e12),
    ('RTX 4090', 165e12), ('RTX 3090 Ti', 80e12), ('RTX 3090', 71e12), ('V100', 125e12), ('T4', 65e12),
]


def cpu_has_bf16():
    """Whether the CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX-BF16), read from Linux's
    /proc/cpuinfo. False where there is no such file (macOS, Windows): those CPUs run float32."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split() for line in f if line.startswith('flags')), [])
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


@lru_cache
def cpu_bf16_fast(n=256):
    """Whether torch multiplies bfloat16 matrices faster than float32 ones on this CPU, as it runs now: measured
    once per process (tens of ms; a tenth of a second where capped), only where /proc/cpuinfo lists the
    instructions. The flags alone do not say it: with oneDNN capped below them (ONEDNN_MAX_CPU_ISA=AVX2)
    bfloat16 runs emulated, many times slower. Timed on one thread: on a busy CPU a product split across
    threads waits for the slowest."""
    if not cpu_has_bf16():
        return False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(n, n)
        float32 = fastest_product(a, 10)
        return fastest_product(a.bfloat16(), 10, give_up_after=3 * float32) * 1.3 < float32
    finally:
        torch.set_num_threads(threads)


def fastest_product(a, tries, give_up_after=float('inf')):
    """Seconds of the fastest of a few products a @ a (after one to warm up): the fastest is the one that no
    other process interrupted. Stops early once even the fastest is slower than give_up_after."""
    a @ a
    best = float('inf')
    for _ in range(tries):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
        if best > give_up_after:
            break
    return best


@dataclass
class Plan:
    """How a script runs: see device_plan."""
    device: str  # 'cpu', 'cuda', 'cuda:1', 'mps'
    device_type: str  # 'cpu', 'cuda' or 'mps'
    dtype: str  # the precision the math runs in: 'float32', 'bfloat16' or 'float16'
    autocast: torch.dtype = None  # the dtype forward passes autocast to; None: plain float32
    scaler: bool = False  # float16: the loss is scaled against underflowing gradients
    pin_memory: bool = False  # batches go to the GPU from pinned memory, without waiting
    flash_attn: bool = True  # training's attention through scaled_dot_product_attention, else explicit products
    chunked_loss: bool = False  # training's loss a few rows at a time (loss.py), never all logits at once
    why: str = ''  # a few words on the choices
    ctx: object = field(default_factory=nullcontext)  # the autocast context for forward passes


def device_plan(device, dtype, has_cuda, cuda_bf16, has_mps, mps_bf16, cpu_bf16, decoding=False, training=False,
                flash_attn=True, chunked_loss=None, dropout=0.0):
    """How a script runs (a Plan), from its device and dtype settings and what the machine has. Raises
    ValueError, one line naming the fix, for a device or dtype this machine cannot run. decoding: the script
    generates a token at a time (sample.py). training: the plan also settles the attention (flash_attn, given
    the model's dropout) and the loss (chunked_loss; None: chunked on a CPU, where it was measured faster, plain elsewhere)."""
    picked = device == 'auto'
    if picked:
        device = 'cuda' if has_cuda else 'mps' if has_mps else 'cpu'
    device_type, _, index = str(device).partition(':')
    if device_type not in ('cuda', 'mps', 'cpu') or (index and not (device_type == 'cuda' and index.isdigit())):
        raise ValueError(f"device='{device}' is not 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if device_type == 'cuda' and not has_cuda:
        raise ValueError(f"device='{device}' but this machine has no CUDA GPU: use --device=auto or --device=cpu")
    if device_type == 'mps' and not has_mps:
        raise ValueError(f"device='{device}' but MPS is not available here (it needs an Apple-silicon Mac and torch "
                         f"built with MPS): use --device=auto or --device=cpu")
    if dtype != 'auto' and dtype not in DTYPES:
        raise ValueError(f"dtype='{dtype}' is not one of 'auto', 'float32', 'bfloat16', 'float16'")
    why = ["picked by device='auto'"] if picked else []
    if device_type == 'cuda':
        if dtype == 'bfloat16' and not cuda_bf16:
            raise ValueError("dtype='bfloat16' but this GPU has no bfloat16 (it predates Ampere): use --dtype=float16")
        if dtype == 'auto':
            dtype = 'bfloat16' if cuda_bf16 else 'float16'  # float16 with loss scaling on GPUs before Ampere
    elif device_type == 'mps':
        if dtype == 'bfloat16' and not mps_bf16:
            raise ValueError("dtype='bfloat16' on MPS needs macOS 14 or newer: use --dtype=float16 or float32")
        if dtype == 'auto':
            dtype = 'float32'  # as nanoGPT runs on a Mac; autocast is opt-in, its gain varies from chip to chip
            why.append("--dtype=float16 or bfloat16 for autocast")
    else:  # a CPU autocasts to bfloat16 only where torch runs it fast (the instructions, not capped): twice the speed
        if dtype == 'auto' and cpu_bf16 and decoding:  # one token at a time: autocast would re-cast every weight per token
            dtype = 'float32'
            why.append("decoding runs faster in float32 on a CPU; --dtype=bfloat16 for autocast")
        elif dtype == 'auto':
            dtype = 'bfloat16' if cpu_bf16 else 'float32'
        elif dtype == 'bfloat16' and not cpu_bf16:
            dtype = 'float32'
            why.append("bfloat16 is slow on this CPU: no AVX512-BF16 or AMX, or torch's use of them capped")
        elif dtype == 'float16':
            dtype = 'float32'
            why.append("float16 on a CPU is emulated, slower than float32")
    autocast = None if dtype == 'float32' else DTYPES[dtype]
    if training and flash_attn and device_type == 'cpu' and autocast is not None:
        flash_attn = False  # sdpa's CPU kernels have a slow bfloat16 backward (bench_train.py)
        why.append("explicit attention: sdpa trains slower in bfloat16 on a CPU")
    elif training and flash_attn and device_type == 'cpu' and dropout > 0:
        flash_attn = False  # sdpa draws its dropout from torch's one generator: cpu.split_batch's threads need their own
        why.append("explicit attention: sdpa's dropout is slower on a CPU and draws from one generator")
    if chunked_loss is None:
        chunked_loss = training and device_type == 'cpu'  # measured faster there; elsewhere nanoGPT's loss
    return Plan(device=device, device_type=device_type, dtype=dtype, autocast=autocast, scaler=autocast is torch.float16,
                pin_memory=device_type == 'cuda', flash_attn=flash_attn, chunked_loss=chunked_loss and training,
                why='; '.join(why))


def setup(device, dtype, verbose=True, decoding=False, training=False, flash_attn=True, chunked_loss=None, dropout=0.0):
    """device_plan for this machine, with its autocast context (plan.ctx). Turns on TF32 matmuls on CUDA.
    Prints the plan in one line when verbose. Raises ValueError as device_plan does."""
    has_cuda, has_mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    on_cpu = device == 'cpu' or (device == 'auto' and not has_cuda and not has_mps)  # else no time spent measuring it
    plan = device_plan(device, dtype, has_cuda, has_cuda and torch.cuda.is_bf16_supported(),
                       has_mps, has_mps and torch.backends.mps.is_macos_or_newer(14, 0), on_cpu and cpu_bf16_fast(),
                       decoding, training, flash_attn, chunked_loss, dropout)
    if plan.device_type == 'cuda':
        torch.set_float32_matmul_precision('high')  # TF32 for float32 matmuls: Ampere's tensor cores, ~1e-3 error
    if plan.autocast:
        plan.ctx = torch.autocast(plan.device_type, dtype=plan.autocast)
    if verbose:
        name = f" ({torch.cuda.get_device_name(plan.device)})" if plan.device_type == 'cuda' else ''
        precision = f"{plan.dtype} autocast" if plan.autocast else 'float32'
        trained = (f", {'sdpa' if plan.flash_attn else 'explicit'} attention, "
                   f"{'chunked' if plan.chunked_loss else 'full-logits'} loss") if training else ''
        print(f"device {plan.device}{name}, {precision}{trained}" + (f" ({plan.why})" if plan.why else ''))
    return plan


def grad_scaler(plan):
    """The loss scaler for float16 training (its gradients underflow without); a no-op otherwise."""
    return torch.amp.GradScaler(plan.device_type, enabled=plan.scaler)


def synchronize(device_type):
    """Waits for the device to finish its queued work, so that a timing covers it."""
    if device_type == 'cuda':
        torch.cuda.synchronize()
    elif device_type == 'mps':
        torch.mps.synchronize()


def peak_flops(plan):
    """(FLOP/s, what it is) that MFU is measured against: a GPU's dense bf16/fp16 tensor peak from
    GPU_PEAK_FLOPS; on a CPU or MPS, measured now. (None, why) for a GPU not in the table."""
    if plan.device_type == 'cuda':
        name = torch.cuda.get_device_name(plan.device)
        peak = gpu_peak_flops(name)
        return (peak, f"{name}'s bf16/fp16 peak") if peak else (None, f"no known peak for {name}")
    dtype = plan.autocast or torch.float32
    return measured_peak_flops(plan.device, dtype), (f"measured just now: the fastest of 0.3 s of 1024x1024 "
                                                     f"{str(dtype)[6:]} matmuls; MFU stops at 100%: a busy machine reads low")


def device_name(device):
    """The GPU's name, or the CPU's model name as lscpu gives it: speed figures compare on the same one only."""
    if torch.device(device).type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        lscpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        return next(line.split(':', 1)[1].strip() for line in lscpu.splitlines() if line.startswith('Model name'))
    except (OSError, StopIteration):  # no lscpu: not Linux
        return platform.processor() or platform.machine()


def gpu_peak_flops(name):
    """The dense bf16/fp16 FLOP/s of the GPU named name (as torch.cuda.get_device_name gives it), or None."""
    return next((flops for part, flops in GPU_PEAK_FLOPS if part in name), None)


@lru_cache
def measured_peak_flops(device, dtype, n=1024, seconds=0.3):
    """FLOP/s of the fastest of a few n x n matrix products on the device, in dtype (about 0.3 s)."""
    device_type = torch.device(device).type
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    best, start = float('inf'), time.perf_counter()
    while time.perf_counter() - start < seconds:
        synchronize(device_type)
        t0 = time.perf_counter()
        a @ b
        synchronize(device_type)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best
