"""
Speed-ups for training and sampling on a CPU, applied from outside the model by the scripts that want
them. Nothing here is needed to understand the model (model.py) or training (train.py): each one keeps
the model's parameters, state_dict and results, and steps aside on other devices.
    cpu.set_openmp_wait()                  # before torch is imported: how many OpenMP threads, how they wait
    cpu.speed_up(model, training=True)     # in place: dropout masks from random bits; freed memory kept
    cpu.speed_up(model, training=False)    # in place: matrix-vector products of decoding as batched products
Which attention a CPU trains with under autocast is decided with the device (runtime.py).
bench.py and bench_train.py measure what these give.
"""
import math
import os
import time
import ctypes

import torch
import torch.nn as nn
from torch.nn import functional as F


def set_openmp_wait():
    """On a CPU that other processes keep busy, fewer OpenMP threads that wait more politely. Each parallel
    operation waits for its slowest thread, and a thread that shares its core with another process is slow: so
    torch gets one thread per core left free (at least one). And libgomp's idle threads spin a long while before
    they sleep, taking the cores that working threads need: they spin only briefly. On a quiet CPU both stay as
    they are (the long spin is faster there). Must run before torch loads OpenMP; OMP_NUM_THREADS or
    GOMP_SPINCOUNT of the user's own wins, and a machine with an NVIDIA driver (a GPU run) is left alone."""
    if os.path.exists('/proc/driver/nvidia') or {'GOMP_SPINCOUNT', 'OMP_NUM_THREADS'} <= set(os.environ):
        return
    busy, cpus = cpus_busy_elsewhere(), os.cpu_count() or 1
    if busy < 0.5:
        return
    chosen = []
    threads = max(1, int(cpus - busy))
    if 'OMP_NUM_THREADS' not in os.environ and threads < cpus:
        os.environ['OMP_NUM_THREADS'] = str(threads)
        chosen.append(f"torch uses {threads} of {cpus} threads (OMP_NUM_THREADS={threads}; set it to choose)")
    if 'GOMP_SPINCOUNT' not in os.environ:
        os.environ['GOMP_SPINCOUNT'] = '1000'
        chosen.append("idle OpenMP threads spin only briefly before they sleep (GOMP_SPINCOUNT=1000)")
    if chosen:
        print(f"other processes keep {busy:.1f} of {cpus} CPUs busy: {'; '.join(chosen)}")


def cpus_busy_elsewhere(seconds=0.1):
    """How many CPUs other processes keep busy, measured over `seconds` from Linux's /proc/stat (0 elsewhere)."""
    def busy_and_total():
        with open('/proc/stat') as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)
    try:
        (busy0, total0), _, (busy1, total1) = busy_and_total(), time.sleep(seconds), busy_and_total()
    except (OSError, ValueError):
        return 0.0
    return (busy1 - busy0) / max(1, total1 - total0) * os.cpu_count()


def keep_freed_memory():
    """glibc hands the memory of freed tensors back to the kernel (large blocks are mapped afresh for each tensor,
    the heap's top is trimmed), so every training step faults the same pages in again. This keeps freed memory
    for the next step's tensors instead: the process stays at its peak size. Does nothing where the C library
    has no mallopt (macOS, musl, Windows)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows, which cannot open the process itself
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB (glibc's largest) come from the reused heap
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: the heap's free top is given back only past 1 GiB
    mallopt(-2, 64 << 20)  # M_TOP_PAD: the heap grows 64 MiB at a time


class BitMaskDropout(nn.Dropout):
    """nn.Dropout whose masks, on a CPU, come from 64 random bits per four elements, one 16-bit lane each, cut
    at a threshold: far cheaper than the bernoulli_ of F.dropout. Drops each element with probability p rounded
    to 1/65536, and scales the kept ones so that the expectation is unchanged."""

    def forward(self, x):
        dropped = round(self.p * 65536)  # of the 65536 values of a 16-bit lane
        if not self.training or x.device.type != 'cpu' or not 0 < dropped < 65536:
            return super().forward(x)
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # all 64 bits random
        lanes = bits.view(torch.int16)[:x.numel()].view(x.shape)
        keep = lanes.clamp_(dropped - 32769, dropped - 32768).sub_(dropped - 32769)  # int16 1 (kept) or 0
        # the mask in x's dtype without a bool tensor in between: a CPU casts bools, or multiplies by them, slowly
        one_bits = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}.get(x.dtype)  # 1.0 as a 16-bit float's bits
        mask = keep.mul_(one_bits).view(x.dtype) if one_bits else keep.to(x.dtype)
        return torch.addcmul(x.new_zeros(()), x, mask, value=65536 / (65536 - dropped))


class DecodingLinear(nn.Linear):
    """nn.Linear, except for decoding on a CPU: a few rows without autograd are multiplied as a batch of weight
    slices. MKL's matrix-vector product streams a weight at a fraction of the memory's speed on some CPUs
    (AMD's); its batched product, given the rows in this layout, at full speed."""

    def forward(self, x):
        slices = math.gcd(self.out_features, 8)
        if x.device.type != 'cpu' or torch.is_grad_enabled() or x.numel() > 4 * x.size(-1) or slices == 1:
            return F.linear(x, self.weight, self.bias)
        w = self.weight.view(slices, -1, self.in_features)
        xt = x.reshape(-1, self.in_features).t().expand(slices, -1, -1)  # (in, rows), strides (1, in)
        y = torch.bmm(w, xt) if self.bias is None else torch.baddbmm(self.bias.view(slices, -1, 1), w, xt)
        return y.view(self.out_features, -1).t().reshape(*x.shape[:-1], self.out_features)


def speed_up(model, training):
    """Applies the CPU speed-ups to model in place, by swapping module classes (the parameters, their names and
    the state_dict stay the same): for training, BitMaskDropout and freed memory kept for the next step; for
    sampling, DecodingLinear. Both step aside on other devices."""
    swap = (nn.Dropout, BitMaskDropout) if training else (nn.Linear, DecodingLinear)
    for module in model.modules():
        if type(module) is swap[0]:
            module.__class__ = swap[1]
    if training:
        keep_freed_memory()
    return model
