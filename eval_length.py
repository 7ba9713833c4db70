"""
Validation loss of a checkpoint at several context lengths: does it still work past the block_size
it was trained at? Every length scores the same tokens, the start of val.bin cut into windows of that
length (non-overlapping, as in the ALiBi paper's evaluation), so the figures differ only in how much
context the model sees. A model with learned positions has none past its block_size: 'n/a' there;
ALiBi, RoPE and no positions at all ('position' in model.py) go on. bench_positions.py compares the four.
    python eval_length.py --out_dir=out-shakespeare-char
    python eval_length.py --out_dir=out-alibi --lengths=64,128,256,512 --json_out=assets/length_alibi.json
"""
import json
import math
import os

import numpy as np
import torch

import runtime
from configurator import fail, check
from files import check_token_ids, dataset_dir, load_checkpoint, open_bin, os_error_text, write_atomically

# -----------------------------------------------------------------------------
out_dir = 'out'
lengths = ''  # comma-separated context lengths, e.g. '64,128,256'; default 0.5x, 1x, 2x and 4x the model's block_size
num_tokens = 32768  # val tokens scored at every length (rounded down to a multiple of all the lengths)
batch_tokens = 8192  # tokens per forward pass: batch_tokens // length windows
dataset = ''  # default: the dataset the checkpoint was trained on
device = 'auto'  # a CUDA GPU, else Apple's MPS, else the CPU; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # bfloat16 where the device has it, float16 on older GPUs, else float32 (which --dtype=float32 forces)
json_out = ''  # also write the results to this JSON file
exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())
for k in ('num_tokens', 'batch_tokens'):
    check(k, lambda v: v >= 1, 'an integer >= 1')
check('lengths', lambda v: not v or all(s.strip().isdigit() and int(s) > 0 for s in v.split(',')),
      "a list of positive integers like '64,128,256' (or '': 0.5x, 1x, 2x, 4x block_size)")
# -----------------------------------------------------------------------------
try:
    plan = runtime.setup(device, dtype)
except ValueError as e:
    fail(e)
device, ctx = plan.device, plan.ctx
if json_out:  # checked before the work, not after it
    try:
        ancestor = os.path.dirname(os.path.abspath(json_out))
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):  # under a regular file: makedirs would say only 'file exists'
            raise NotADirectoryError(20, f'not a directory ({ancestor} is a file)')
        os.makedirs(os.path.dirname(json_out) or '.', exist_ok=True)
        if os.path.isdir(json_out) or not os.access(os.path.dirname(json_out) or '.', os.W_OK):
            raise PermissionError(13, 'a folder' if os.path.isdir(json_out) else 'not writable')
    except OSError as e:
        fail(f"cannot write json_out={json_out}: {os_error_text(e)}; pass a writable file path")

try:
    model, checkpoint = load_checkpoint(out_dir)
except ValueError as e:
    fail(e)
model.eval().to(device)
block_size, position = model.config.block_size, model.config.position

dataset = dataset or checkpoint.get('config', {}).get('dataset', '')
if not dataset:
    fail(f"{out_dir}/ckpt.pt does not say which dataset it was trained on: pass --dataset=")
val_path = os.path.join(dataset_dir(dataset), 'val.bin')
try:
    data = open_bin(val_path, min_tokens=0)
except ValueError as e:
    fail(e)

if lengths:
    context_lengths = [int(s) for s in lengths.split(',')]
else:
    context_lengths = [block_size // 2, block_size, 2 * block_size, 4 * block_size]
fits = [L for L in context_lengths if L < len(data)]  # a window of L tokens needs L + 1 (its targets are shifted by one)
if not fits:
    fail(f"{val_path} has only {len(data)} tokens, too few for any of the lengths {context_lengths}")
# the same tokens for every length (and for every model evaluated on this dataset with these lengths)
n = min(num_tokens, len(data) - 1) // math.lcm(*fits) * math.lcm(*fits)
if n == 0:
    fail(f"num_tokens={num_tokens} is less than {math.lcm(*fits)}, the least multiple of the lengths {fits}")
x_all = torch.from_numpy(data[:n].astype(np.int64))
y_all = torch.from_numpy(data[1:n + 1].astype(np.int64))
try:
    check_token_ids(max(x_all.max(), y_all.max()).item(), model.config.vocab_size, val_path)
except ValueError as e:
    fail(e)

results = []
for L in context_lengths:
    if L not in fits:
        results.append(dict(length=L, loss=None, note=f"{val_path} has only {len(data)} tokens"))
        continue
    if position == 'learned' and L > block_size:
        results.append(dict(length=L, loss=None, note=f"learned positions stop at block_size={block_size}"))
        continue
    x, y = x_all.view(-1, L), y_all.view(-1, L)
    per_batch = max(1, batch_tokens // L)
    loss_sum = 0.0
    with torch.no_grad():
        for i in range(0, len(x), per_batch):
            with ctx:
                _, loss = model(x[i:i + per_batch].to(device), y[i:i + per_batch].to(device))
            loss_sum += loss.item() * len(x[i:i + per_batch])  # the batch mean, weighted by its windows
    results.append(dict(length=L, loss=loss_sum / len(x)))

print(f"{out_dir} (position={position}, block_size {block_size}): "
      f"val loss over the first {n} tokens of {val_path}")
print(f"{'context':>8} {'x block':>8}  val loss")
for r in results:
    print(f"{r['length']:>8} {r['length'] / block_size:>7g}x  " + (f"{r['loss']:.4f}" if r['loss'] is not None else f"n/a ({r['note']})"))
if json_out:
    summary = dict(out_dir=out_dir, dataset=dataset, position=position, alibi=position == 'alibi', block_size=block_size, tokens=n, results=results)
    try:
        write_atomically(json_out, lambda f: f.write(json.dumps(summary, indent=1).encode()))
    except OSError as e:
        fail(f"cannot write json_out={json_out}: {os_error_text(e)}")
    print(f"wrote {json_out}")
