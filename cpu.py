"""
Speed-ups for training and sampling on a CPU, applied from outside the model by the scripts that want
them. Nothing here is needed to understand the model (model.py) or training (train.py): each one keeps
the model's parameters, state_dict and results, and steps aside on other devices.
    cpu.set_openmp_wait()                  # before torch is imported: how many OpenMP threads, how they wait
    cpu.speed_up(model, training=True)     # in place: dropout masks from random bits; freed memory kept
    cpu.speed_up(model, training=False)    # in place: matrix-vector products of decoding as batched products
    cpu.split_batch(model, tokens, dtype)  # in place: each core its share of a batch's rows, where that is faster
Which attention a CPU trains with (under autocast, with dropout) is decided with the device (runtime.py).
bench.py and bench_train.py measure what these give.
"""
import math
import os
import time
import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
from torch.nn import functional as F

import runtime
from model import GPT


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
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64)
        bits.random_(-2 ** 63, None, generator=getattr(part_of_batch, 'generator', None))  # all 64 bits random
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


part_of_batch = threading.local()  # in a thread of split_batch: the random generator of its share of the batch


class GradientsAtHand(torch.autograd.Function):
    """The loss whose gradients for params were already computed: backward hands them on, scaled by its input."""

    @staticmethod
    def forward(ctx, loss, grads, *params):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None  # used once, as every backward's buffers
        return None, None, *(None if g is None else g.mul_(grad_loss) for g in grads)


class SplitBatchGPT(GPT):
    """GPT whose loss over a batch is computed by several threads, one per core, each on its share of the batch's
    rows with one torch thread: the matrices of a small model are too small to split across cores well, so the
    batch is split instead (data parallelism inside one process). With gradients, each thread also runs its part's
    backward in the forward pass; loss.backward() then hands on the sum. The loss and the gradients are the whole
    batch's, to float rounding (each part's mean is weighted by its share of the targets); each part's dropout
    draws from its own generator, seeded from torch's in order, so a run is as repeatable as on one thread."""

    def forward(self, idx, targets=None, **kwargs):
        if targets is None or kwargs.get('kv_cache') is not None or self.parts < 2 or idx.size(0) < 2:
            return super().forward(idx, targets, **kwargs)
        rows, row_targets = idx.tensor_split(self.parts), targets.tensor_split(self.parts)
        counts = [int((t != -1).sum()) for t in row_targets]
        total = sum(counts)
        if total == 0:  # every target ignored: the plain loss (nan) says so
            return super().forward(idx, targets, **kwargs)
        with_grads = torch.is_grad_enabled()
        params = [p for p in self.parameters() if p.requires_grad] if with_grads else []
        seeds = torch.randint(2 ** 62, (len(rows),)).tolist() if self.training else [None] * len(rows)
        autocast = torch.is_autocast_enabled('cpu'), torch.get_autocast_dtype('cpu')

        def part(i):  # grad mode and autocast are each thread's own: the caller's, in every thread
            part_of_batch.generator = None if seeds[i] is None else torch.Generator().manual_seed(seeds[i])
            try:
                with torch.set_grad_enabled(with_grads), torch.autocast('cpu', dtype=autocast[1], enabled=autocast[0]):
                    logits, loss = GPT.forward(self, rows[i], row_targets[i], **kwargs)
                    loss = loss * (counts[i] / total)
                    grads = torch.autograd.grad(loss, params, allow_unused=True) if with_grads else ()
                return logits, loss.detach(), grads
            finally:
                part_of_batch.generator = None

        others = [self.pool.submit(part, i) for i in range(1, len(rows))]
        results = [part(0)] + [f.result() for f in others]
        logits = None if results[0][0] is None else torch.cat([r[0] for r in results])
        loss = sum(r[1] for r in results)
        if not with_grads:
            return logits, loss
        grads = [None if gs[0] is None else sum(gs[1:], gs[0]) for gs in zip(*(r[2] for r in results))]
        return logits, GradientsAtHand.apply(loss, grads, *params)


def split_batch(model, tokens, dtype, parts=None):
    """Makes the GPT model (in place, by its class: parameters and state_dict stay) compute each batch's loss and
    gradients in parts of its rows, one thread per core, where that is faster than torch's own threads: when one
    batch (tokens rows x positions) takes at least 10 ms of matrix products at this CPU's measured speed in dtype
    (below that, two threads' work per operation outweighs). parts: None decides; 1 leaves the model as it is; N
    splits into N. Steps aside where attention's dropout is sdpa's. Sets torch to one thread, and says so in one line.
    Returns the number of parts."""
    threads = torch.get_num_threads()
    if any(getattr(m, 'flash_attn', False) and m.dropout > 0 for m in model.modules()):
        return 1  # sdpa's dropout draws from torch's one generator, which threads would take turns at
    if parts is None:
        flops = 6 * sum(p.numel() for p in model.parameters()) * tokens  # forward and backward, per token
        parts = threads if flops / runtime.measured_peak_flops('cpu', dtype) >= 0.01 else 1
    if parts > 1:
        speed_up(model, training=True)  # dropout that draws from each part's own generator
        model.__class__ = SplitBatchGPT
        model.parts = parts
        model.pool = ThreadPoolExecutor(parts - 1, initializer=torch.set_num_threads, initargs=(1,))
        torch.set_num_threads(1)  # a second torch thread would only take a core from a part
        print(f"each batch split over {parts} threads, one per core, each on {1 / parts:.3g} of its rows "
              f"(split_batch=1: torch's own threads instead)")
    return parts
