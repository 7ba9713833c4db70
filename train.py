"""
Trains a GPT on the token bins of data/<dataset>, in one process or, under torchrun, in many with
DistributedDataParallel (DDP). One process, on a CPU or one GPU:
$ python train.py config/train_shakespeare_char.py --device=cpu --compile=False
All 8 GPUs of one machine:
$ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
Several machines, FSDP (--fsdp=True, fsdp.py): README's Training section.
SIGTERM, SIGINT (Ctrl-C) or SIGHUP finish the current iteration, save ckpt.pt and stop; --init_from=resume goes on.
"""

import os
import sys
import signal
signal.signal(signal.SIGINT, lambda *_: (print("train.py: stopped by Ctrl-C before any training; nothing was written",
              file=sys.stderr), os._exit(1)))  # until runs.StopRequest: a KeyboardInterrupt inside an import can be swallowed
import math
import time
from contextlib import nullcontext
from datetime import timedelta

import cpu
cpu.set_openmp_wait()  # how idle OpenMP threads wait: before torch loads OpenMP
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed import init_process_group, destroy_process_group

import energy
import optim
import runtime
import runs
from configurator import fail, check
from model import GPTConfig, GPT, GPT2_VOCAB_SIZE
from files import (dataset_dir, load_checkpoint, load_meta, load_pretrained_embeddings, open_bin, check_one_prepare,
                   check_token_ids)

if int(os.environ.get('RANK', 0)) > 0:
    sys.stdout = open(os.devnull, 'w')  # under torchrun only the first process prints; errors still reach stderr

# -----------------------------------------------------------------------------
# settings; the defaults train GPT-2 small (124M) on OpenWebText
# output and evaluation
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # evaluate once, then stop
always_save_checkpoint = True  # save at every evaluation; False: only when val loss is the best so far
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt), 'gpt2*' or a Hugging Face GPT-2 directory
hellaswag_interval = 0  # score HellaSwag (hellaswag.py) every this many steps and at the end; 0: never. GPT-2 BPE models only
hellaswag_file = os.path.join('data', 'hellaswag', 'hellaswag_val.jsonl')  # downloaded by the first process when absent
# Weights & Biases
wandb_log = False
wandb_project = 'owt'
wandb_run_name = 'gpt2'
# data
dataset = 'openwebtext'
gradient_accumulation_steps = 5 * 8  # micro-steps per iteration, in all; shared out among DDP processes
batch_size = 12  # sequences per micro-step
block_size = 1024
eval_block_size = None  # context length of evaluations; None: the same as block_size
seed = 1337  # decides the initial weights, the training batches and dropout
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # pretraining does well without; finetuning may want 0.1 or more
bias = False  # biases in Linears and LayerNorms (GPT-2 has them; without is a bit faster)
flash_attn = True  # attention through scaled_dot_product_attention, else the explicit softmax
position = 'learned'  # 'learned' (nanoGPT's position embeddings), 'alibi', 'rope' or 'none': model.py
rope_base = 10000.0  # RoPE's base: the slowest-turning channel pair turns about 1/rope_base radians per position
alibi = False  # the older switch for position='alibi'
gelu = 'erf'  # the exact GELU, as nanoGPT; 'tanh': GPT-2's approximation (init_from='gpt2*' takes the weights' own)
pretrained_embeddings = False  # start the token embeddings from data/<dataset>/pretrained_embeddings.pt
# AdamW
learning_rate = 6e-4  # the peak, reached after warmup
max_iters = 600000  # optimizer steps in all
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # largest gradient norm; 0.0: no clipping
optimizer = 'adamw'  # nanoGPT's AdamW; 'muon': Muon for the Blocks' matrices, AdamW for the rest (optim.py)
muon_lr = 0.02  # Muon's peak, on learning_rate's schedule; KellerJordan/Muon's default, PyTorch docs' example
muon_momentum = 0.95  # torch.optim.Muon's default and KellerJordan/Muon's
muon_weight_decay = 0.0  # KellerJordan/Muon's default (torch.optim.Muon's is 0.1, applied as muon_lr * decay)
# learning rate schedule
decay_lr = True  # False: learning_rate throughout
warmup_iters = 2000
lr_decay_iters = 600000  # end of the cosine; Chinchilla suggests about max_iters
min_lr = 6e-5  # where it ends; Chinchilla suggests about learning_rate / 10
# DDP
backend = 'nccl'  # between GPUs; processes on CPUs always talk through 'gloo'
ddp_timeout = 600  # seconds a process waits for the others (a stalled or dead one) before the run stops
fsdp = False  # under torchrun: shard parameters, gradients and AdamW state across the processes (fsdp.py) instead of DDP's copies
gradient_checkpointing = False  # recompute each Block's activations in backward: far less memory for ~1/3 more compute
# hardware
device = 'auto'  # a CUDA GPU, else Apple's MPS, else the CPU; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # bfloat16 where the device has it, float16 on older GPUs, else float32; or one of those (see runtime.py)
compile = True  # torch.compile the model: slower start, faster steps
chunked_loss = None  # the loss a few rows at a time, never all logits (loss.py); None: on a CPU, where it is faster
split_batch = None  # on a CPU: N threads, one per core, each on 1/N of a batch's rows (cpu.py); None: where faster; 1: off
measure_energy = True  # joules per log line, evaluation and run where the machine can tell (NVML, RAPL): energy.py
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if k.islower() and not k.startswith('_') and (v is None or isinstance(v, (bool, int, float, str)))]
exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())  # overrides from the command line or a config file
position = 'alibi' if alibi and position == 'learned' else position  # what alibi=True means (GPTConfig checks the rest)
config = {k: globals()[k] for k in config_keys}  # saved in checkpoints and given to wandb
# the values, before any work: a mistyped one stops here with a one-line error (configurator's check)
for k in ('batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'gradient_accumulation_steps', 'eval_iters',
          'eval_interval', 'log_interval', 'ddp_timeout'):
    check(k, lambda v: v >= 1, 'an integer >= 1')
for k in ('max_iters', 'warmup_iters', 'lr_decay_iters', 'hellaswag_interval', 'seed', 'learning_rate', 'weight_decay',
          'grad_clip', 'muon_lr', 'muon_weight_decay'):
    check(k, lambda v: v >= 0, 'a number >= 0')
check('n_embd', lambda v: v % n_head == 0, f'a multiple of n_head={n_head}')
check('min_lr', lambda v: not decay_lr or 0 <= v <= learning_rate, f'in [0, learning_rate={learning_rate}] (or decay_lr=False)')
for k in ('dropout', 'beta1', 'beta2', 'muon_momentum'):
    check(k, lambda v: 0 <= v < 1, 'in [0, 1)')
check('optimizer', lambda v: v in ('adamw', 'muon'), "'adamw' (nanoGPT's) or 'muon' (Muon for the Blocks' matrices)")
check('gelu', lambda v: v in ('erf', 'tanh'), "'erf' (the exact GELU, as nanoGPT) or 'tanh' (GPT-2's)")
check('position', lambda v: v == 'learned' or init_from in ('scratch', 'resume'), f"'learned', as GPT-2's weights (init_from={init_from})")
check('out_dir', lambda v: v, 'a directory name')
check('eval_block_size', lambda v: v is None or (type(v) is int and v >= 1), 'an integer >= 1, or None')
check('chunked_loss', lambda v: v in (None, True, False), 'True, False or None (None: on a CPU only)')
check('split_batch', lambda v: v is None or (type(v) is int and v >= 1), 'None (where it is faster), 1 (off) or an integer >= 2')
runs.name_failures(config)  # Ctrl-C while starting, out of memory, a lost DDP peer: one line, not a traceback
# -----------------------------------------------------------------------------

ddp = int(os.environ.get('RANK', -1)) != -1  # started by torchrun?
ddp_rank = int(os.environ.get('RANK', 0))
ddp_world_size = int(os.environ.get('WORLD_SIZE', 1))
master_process = ddp_rank == 0  # logs, evaluates into wandb and writes checkpoints
try:
    plan = runtime.setup(device, dtype, verbose=master_process, training=True, flash_attn=flash_attn,
                         chunked_loss=chunked_loss, dropout=dropout)
except ValueError as e:
    fail(e)
device, device_type, ctx = plan.device, plan.device_type, plan.ctx
if fsdp and not ddp:
    fail("fsdp=True shards the model across torchrun's processes: start it with torchrun --standalone "
         "--nproc_per_node=N train.py ... (N=1 works too), or set fsdp=False")
if gradient_accumulation_steps % ddp_world_size:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps} cannot be divided among {ddp_world_size} "
         f"processes: use a multiple of {ddp_world_size}")

run_files = runs.RunFiles(out_dir, writes=master_process)  # log.jsonl, ckpt.pt and what a stop leaves there
ckpt_path = run_files.ckpt_path

# the data: token ids as uint16 in train.bin and val.bin, and meta.pkl for a character-level vocabulary
data_dir = dataset_dir(dataset)  # data/<dataset> here, else the repository's (files.py)
meta_path = os.path.join(data_dir, 'meta.pkl')
meta = None
if os.path.exists(meta_path):
    try:
        meta = load_meta(meta_path)
    except ValueError as e:
        fail(e)
    print(f"found vocab_size = {meta['vocab_size']} (inside {meta_path})")
data_record = runs.data_record(dataset, meta)  # saved in checkpoints: which data the model learns

# the model: from scratch, from a checkpoint (resume) or from GPT-2's weights
iter_num = 0  # optimizer steps done
best_val_loss = 1e9
checkpoint = None
if init_from == 'resume':  # as in nanoGPT, the checkpoint defines the model: its shape wins over the settings
    try:
        model, checkpoint = load_checkpoint(out_dir, override_args=dict(dropout=dropout, flash_attn=plan.flash_attn))
        runs.check_resumable(checkpoint, ckpt_path, data_record, config)
        optim.check_resumable(checkpoint, optimizer, ckpt_path)
    except ValueError as e:
        fail(e)
    shape = {k: getattr(model.config, k) for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'position', 'rope_base', 'gelu')}
    if overridden := {k: v for k, v in shape.items() if v != config[k]}:
        print(f"resuming with the checkpoint's {', '.join(f'{k}={v}' for k, v in overridden.items())} "
              f"(the settings said {', '.join(str(config[k]) for k in overridden)})")
    n_layer, n_head, n_embd, block_size, bias, position, rope_base, gelu = shape.values()
    config.update(shape)
    iter_num = checkpoint['iter_num']
    best_val_loss = float(checkpoint['best_val_loss'])  # a tensor in nanoGPT's checkpoints
    print(f"resuming training from {ckpt_path} at iter {iter_num}")
elif init_from == 'scratch':
    print("initializing a new model from scratch")
    torch.manual_seed(seed)  # the same initial weights in every process
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                      vocab_size=meta['vocab_size'] if meta else GPTConfig.vocab_size, dropout=dropout,
                      flash_attn=plan.flash_attn, position=position, rope_base=rope_base, alibi=alibi, gelu=gelu)
    try:  # a bad position, pretrained embeddings missing or of the wrong shape: named in one line
        embeddings = load_pretrained_embeddings(data_dir, n_embd) if pretrained_embeddings else None
        model = GPT(GPTConfig(**model_args), pretrained_embeddings=embeddings)
    except ValueError as e:
        fail(e)
elif init_from.startswith('gpt2') or os.path.isdir(init_from):
    print(f"initializing from {'the GPT-2 weights in' if os.path.isdir(init_from) else 'OpenAI GPT-2 weights:'} {init_from}")
    try:
        model = GPT.from_pretrained(init_from, dict(dropout=dropout, flash_attn=plan.flash_attn))
    except (OSError, ValueError) as e:
        fail(f"cannot load {init_from}: {str(e).splitlines()[0]}")
    if block_size > model.config.block_size:
        fail(f"block_size={block_size} is larger than {init_from}'s {model.config.block_size}: "
             f"use --block_size={model.config.block_size} or less")
    model.crop_block_size(block_size)
else:
    fail(f"init_from='{init_from}' is not 'scratch', 'resume', a 'gpt2*' model name or a Hugging Face GPT-2 directory")
model_args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}  # saved in checkpoints
model_args['flash_attn'] = flash_attn  # the setting is saved; the kernel this device trains with is the plan's
eval_block_size = eval_block_size or block_size
if eval_block_size > block_size and position == 'learned':
    fail(f"eval_block_size={eval_block_size} is larger than block_size={block_size}, the end of learned positions: try position='rope'")
try:  # tokens in each split, checked again at every batch: a bin replaced under the run is caught
    split_tokens = {s: len(open_bin(os.path.join(data_dir, f'{s}.bin'), max(block_size, eval_block_size) + 1)) for s in ('train', 'val')}
    check_one_prepare(data_dir, split_tokens)  # not a train.bin and a val.bin of two different prepares
except ValueError as e:
    fail(e)
if hellaswag_interval > 0 and model_args['vocab_size'] < GPT2_VOCAB_SIZE:
    fail(f"hellaswag_interval={hellaswag_interval} needs a model of GPT-2's BPE tokens (vocab_size >= {GPT2_VOCAB_SIZE}), but this "
         f"one has {model_args['vocab_size']} (a character-level dataset?): set hellaswag_interval=0")
if init_from == 'resume' and iter_num >= max_iters and not eval_only:
    print(f"nothing to train: {ckpt_path} is at iter {iter_num}, and max_iters={max_iters}; raise --max_iters to go on")
    sys.exit(0)

if ddp:  # the processes find each other, each with its own GPU
    ddp_local_rank = int(os.environ['LOCAL_RANK'])
    if device_type == 'cuda':
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    init_process_group(backend=backend if device_type == 'cuda' else 'gloo', timeout=timedelta(seconds=ddp_timeout))
    gradient_accumulation_steps //= ddp_world_size  # each process does its share of the micro-steps
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
print(f"tokens per iteration will be: {tokens_per_iter:,}")

model.to(device)
model.gradient_checkpointing = gradient_checkpointing
if device_type == 'cpu':
    cpu.speed_up(model, training=True)  # bit-mask dropout, freed memory kept (cpu.py)
    if not (ddp or compile or gradient_checkpointing):  # each brings processes, graphs or reruns of its own
        cpu.split_batch(model, batch_size * block_size, plan.autocast or torch.float32, split_batch)  # says so if it does
if fsdp:  # sharded in place: still the GPT, with hooks that gather each Block's parameters for its passes
    from fsdp import shard_model, full_state_dicts
    shard_model(model, param_dtype=plan.autocast)  # None: float32, nothing cast
raw_model = model  # the plain GPT: its state_dict has clean names, for checkpoints
run_files.checkpoint_iter = iter_num if checkpoint is not None else None  # the iteration the checkpoint on disk holds

scaler = runtime.grad_scaler(plan)  # float16 needs loss scaling against underflowing gradients; a no-op otherwise
optimizer = optim.configure_optimizer(model, config, device_type)  # the setting optimizer names which
optim.load_state(model, optimizer, scaler, checkpoint, fsdp)  # on resume: the optimizer's and the scaler's states
run_files.wandb_run_id = (checkpoint or {}).get('wandb_run_id')  # a resumed run logs on to its wandb run
checkpoint = None  # free its memory

hellaswag_examples = None
if hellaswag_interval > 0:
    from hellaswag import describe_hellaswag, examples_for_training, evaluate_hellaswag
    try:
        hellaswag_examples = examples_for_training(hellaswag_file, master_process, ddp)
    except (OSError, ValueError) as e:  # said by each process that fails: it may be the only one without the file
        fail(e, every_process=True)

if compile:
    print("compiling the model (the first iterations take a while)")
    model = torch.compile(model)
if ddp and not fsdp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)


def get_batch(split, starts, T):
    """The windows of T + 1 tokens at the given starts, as inputs x and targets y (shifted by one)."""
    path = os.path.join(data_dir, f'{split}.bin')
    try:  # a new memmap for every batch: one kept open grows the process's memory as it is read
        data = open_bin(path)
        if len(data) != split_tokens[split]:
            raise ValueError(f"{path} changed during training ({split_tokens[split]} tokens, now {len(data)}): "
                             f"put the run's data back (or re-prepare it) and resume with --init_from=resume")
        x = torch.from_numpy(np.stack([data[i:i + T] for i in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + T] for i in starts]).astype(np.int64))
        check_token_ids(max(x.max(), y.max()).item(), model_args['vocab_size'], path)  # microseconds a batch
    except ValueError as e:
        fail(e, every_process=True)
    if plan.pin_memory:
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def micro_batch_key(it, micro_step):
    """Names a training micro-batch by its place in the whole run: the seed, the iteration and its index
    in the global batch. Its data and its dropout depend on this key alone, so a resumed run sees what
    the uninterrupted one saw and N processes see what one process does, while every process differs."""
    return [seed, it, ddp_rank * gradient_accumulation_steps + micro_step]


def get_train_batch(it, micro_step):
    rng = np.random.default_rng(micro_batch_key(it, micro_step))
    return get_batch('train', rng.integers(split_tokens['train'] - block_size, size=batch_size), block_size)


def seed_dropout(it, micro_step):
    """Dropout's random state for a micro-batch, from its key alone (micro_batch_key)."""
    torch.manual_seed(int(np.random.SeedSequence(micro_batch_key(it, micro_step)).generate_state(1)[0]))


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches of each split, at eval_block_size. The windows are spread evenly
    over the split, the same at every evaluation, so that evaluations compare and draw no randomness.
    Under DDP each process scores every ddp_world_size-th batch and the sums are added up: one process's figures."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        starts = np.linspace(0, split_tokens[split] - eval_block_size - 1, eval_iters * batch_size).astype(np.int64)
        loss_sum = torch.zeros((), dtype=torch.float64)  # on the CPU: MPS has no float64
        # every process the same number of forwards (FSDP gathers weights in each); one past eval_iters is not counted
        for k in range(ddp_rank, -(-eval_iters // ddp_world_size) * ddp_world_size, ddp_world_size):
            X, Y = get_batch(split, starts[k % eval_iters * batch_size:(k % eval_iters + 1) * batch_size], eval_block_size)
            with ctx:
                _, loss = model(X, Y, chunked_loss=plan.chunked_loss)
            loss_sum += loss.item() if k < eval_iters else 0.0
        if ddp:
            loss_sum = loss_sum.to(device)  # NCCL reduces GPU tensors only
            torch.distributed.all_reduce(loss_sum)
        out[split] = loss_sum.item() / eval_iters
    model.train()
    return out


def get_lr(it):
    """Linear warmup (non-zero at iteration 0), then cosine decay to min_lr at lr_decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # from 1 down to 0
    return min_lr + coeff * (learning_rate - min_lr)


def save_checkpoint(stopped=False):
    # under FSDP every process sends its shards, and the first one writes; stopped: a stop signal's save
    model_state, optimizer_state = full_state_dicts(raw_model, optimizer) if fsdp else (raw_model.state_dict(), optimizer.state_dict())
    run_files.save(dict(model=model_state, optimizer=optimizer_state, scaler=scaler.state_dict(), model_args=model_args,
                        iter_num=iter_num, best_val_loss=best_val_loss, config=config, data=data_record, stopped=stopped),
                   iter_num, stopped)


# training loop
if master_process:  # MFU: achieved FLOP/s over this device's peak (left out where the peak is unknown)
    peak_flops, peak_note = runtime.peak_flops(plan)
    print(f"MFU against {peak_flops / 1e12:.3g} TFLOP/s ({peak_note})" if peak_flops else f"MFU not shown: {peak_note}")
X, Y = get_train_batch(iter_num, 0)  # the first batch: data that does not fit the model stops here, before any write
get_batch('val', [0], eval_block_size)
# the run's directory: one run at a time; a resumed run's log holds each iteration once; a new run sets the old aside
lock = runs.take_out_dir(out_dir, run_files.log_path, resumed=init_from == 'resume', writes=not eval_only,
                         iter_num=iter_num) if master_process else None
if wandb_log and master_process:
    run_files.wandb_run = runs.start_wandb(wandb_project, wandb_run_name, config, run_files.wandb_run_id)
stop = runs.StopRequest(ddp, run_files.kept, ddp_timeout, training=not eval_only)  # SIGTERM, SIGINT, SIGHUP, torchrun gone
meter = energy.start(device, enabled=measure_energy, ddp=ddp, verbose=master_process, tokens_per_step=tokens_per_iter,
                     step=iter_num)
t0 = time.time()
local_iter_num = 0  # iterations in this process's lifetime
running_mfu = None  # shown once measured, past the first iterations
while True:

    lr = get_lr(iter_num) if decay_lr else learning_rate
    optim.set_lr(optimizer, lr)

    # evaluate, and save a checkpoint, every eval_interval iterations and at the end
    if iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only:
        with meter.during('eval'):
            losses = estimate_loss()
        eval_energy = meter.span('eval', tokens=2 * eval_iters * batch_size * eval_block_size)  # summed over processes
        if master_process:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{energy.text(eval_energy)}")
            run_files.log({'step': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val'], 'lr': lr,
                 **energy.fields(eval_energy)})
        run_files.stop_on_nonfinite('val loss', losses['val'], iter_num)
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses['val'])
            if iter_num > 0 and iter_num != run_files.checkpoint_iter and not eval_only:
                with meter.during('other'):
                    save_checkpoint()
        t0 = time.time()  # the iteration's time excludes the evaluation
    if hellaswag_examples and (iter_num % hellaswag_interval == 0 or iter_num >= max_iters or eval_only):
        # every process scores its share of the items (rows per forward as in training), then the counts are summed
        with meter.during('other'):
            scores = evaluate_hellaswag(raw_model, hellaswag_examples, device, max(1, batch_size // 4), ctx,
                                        ddp_rank, ddp_world_size, all_processes=ddp)
        print(f"step {iter_num}: {describe_hellaswag(scores)}")
        if master_process:
            run_files.log({'step': iter_num, 'hellaswag_acc': scores[0] / scores[2], 'hellaswag_acc_norm': scores[1] / scores[2]})
        t0 = time.time()
    if iter_num >= max_iters or eval_only:
        break

    # forward and backward over the micro-batches, then one optimizer step
    for micro_step in range(gradient_accumulation_steps):
        seed_dropout(iter_num, micro_step)
        # under DDP, gradients are averaged across processes only at the last micro-step
        last = micro_step == gradient_accumulation_steps - 1
        if fsdp:
            raw_model.set_requires_gradient_sync(last)
        with (model.no_sync() if ddp and not fsdp and not last else nullcontext()):
            with ctx:
                _, loss = model(X, Y, chunked_loss=plan.chunked_loss)
                loss = loss / gradient_accumulation_steps  # the accumulated gradient is the batch mean
            # fetch the next micro-batch while the GPU works on this one
            X, Y = get_train_batch(iter_num + 1, 0) if last else get_train_batch(iter_num, micro_step + 1)
            scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # skipped by the scaler when float16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    dt = time.time() - t0
    t0 += dt
    train_energy = meter.span('train', step=iter_num + 1) if iter_num % log_interval == 0 else None  # every process
    if iter_num % log_interval == 0 and master_process:
        # the loss of the last micro-batch; .item() waits for the GPU, so only every log_interval
        lossf = loss.item() * gradient_accumulation_steps
        run_files.stop_on_nonfinite('loss', lossf, iter_num)
        if local_iter_num >= 5 and peak_flops:  # let the first iterations (compilation, warm-up) pass
            mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps, dt, peak_flops)
            running_mfu = mfu if running_mfu is None else 0.9 * running_mfu + 0.1 * mfu
        tokens_per_sec = tokens_per_iter / dt
        mfu_text = f", mfu {running_mfu * 100:.2f}%" if running_mfu is not None else ''
        print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms{mfu_text}, {tokens_per_sec:.0f} tok/s"
              f"{energy.text(train_energy)}")
        run_files.log({'iter': iter_num, 'loss': lossf, 'time_ms': dt * 1000, 'mfu': running_mfu,
             'tokens_per_sec': tokens_per_sec, 'lr': lr, **energy.fields(train_energy)})
    iter_num += 1
    local_iter_num += 1

    if why := stop.requested():  # every process stops at this same iteration, with its work saved
        if iter_num != run_files.checkpoint_iter:
            save_checkpoint(stopped=True)
        if ddp:
            torch.distributed.barrier()
        fail(f"stopped by {why} at iter {iter_num}: saved {ckpt_path}; resume with --init_from=resume")

if master_process and run_files.checkpoint_iter is None and not eval_only:
    runs.put_back_previous_run(out_dir)  # a run that saved nothing (max_iters=0) leaves the run it found, as nanoGPT
run_energy = meter.finish(step=iter_num)  # every process: the run's totals, in the last record
if master_process and run_energy:
    print(energy.summary(run_energy))
    run_files.log({'step': iter_num, **run_energy})
if ddp:
    stop.close()  # its last reduction, done and let go before the process group
    torch.distributed.barrier()  # the others wait while the first one writes: leaving early can abort gloo's threads
    destroy_process_group()
