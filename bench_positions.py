"""
The position study: trains one small character model per position scheme ('learned', 'alibi', 'rope', 'none')
and seed, everything else the same (data, steps, batch, learning rate), with train.py; evaluates each with
eval_length.py at the training length, 2x and 4x; prints one markdown table: median and spread (min-max) over
the seeds of the val loss at each length, ms per iteration, and mJ per token trained where the machine measures
energy (energy.py). The runs alternate (every scheme, then the next seed), so a change of load hits all alike.
    python data/shakespeare_char/prepare.py
    python bench_positions.py                                # all of it, on a CPU (the note gives its time)
    python bench_positions.py --seeds=1 && python bench_positions.py --seeds=2 && python bench_positions.py
Finished runs (out_dir/positions-<scheme>-<seed>/length.json) are kept and not run again: the study may be run
in pieces, and a last call with nothing left to run prints the table of everything.
"""
import json
import os
import statistics
import subprocess
import sys

from configurator import fail, check
from runtime import device_name

# -----------------------------------------------------------------------------
schemes = 'learned,alibi,rope,none'
seeds = '1,2,3'  # train.py's seed: initial weights, batches and dropout
out_dir = 'out-positions'  # one directory per run in it
device = 'cpu'
max_iters = 200
block_size = 128  # the training length; evaluated at 1x, 2x and 4x
eval_tokens = 16384  # val tokens each length is scored on (the same for all)
train_args = '--n_layer=2 --n_head=4 --n_embd=64 --batch_size=4 --dropout=0.0 --learning_rate=3e-3 --warmup_iters=30'
exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())
check('max_iters', lambda v: v >= 20, 'an integer >= 20 (the first 10 iterations are not timed)')
# -----------------------------------------------------------------------------
SCHEMES = schemes.split(',')
SEEDS = [int(s) for s in str(seeds).split(',')]
LENGTHS = [block_size, 2 * block_size, 4 * block_size]
for s in SCHEMES:
    if s not in ('learned', 'alibi', 'rope', 'none'):
        fail(f"unknown scheme '{s}' in --schemes={schemes}: choose from learned,alibi,rope,none")
if not os.path.exists(os.path.join('data', 'shakespeare_char', 'val.bin')):
    fail("no data/shakespeare_char/val.bin: run python data/shakespeare_char/prepare.py first")


def run(cmd):
    result = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"{' '.join(cmd[:2])} ... failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")


def study(scheme, seed):
    """Trains and evaluates one run unless done before; returns its losses, ms/iteration and mJ/token."""
    run_dir = os.path.join(out_dir, f'positions-{scheme}-{seed}')
    length_json = os.path.join(run_dir, 'length.json')
    if not os.path.exists(length_json):
        print(f"training {run_dir}", flush=True)
        run(['train.py', 'config/train_shakespeare_char.py', f'--out_dir={run_dir}', f'--device={device}',
             f'--position={scheme}', f'--seed={seed}', f'--block_size={block_size}', f'--max_iters={max_iters}',
             f'--lr_decay_iters={max_iters}', f'--eval_interval={max_iters}', '--eval_iters=20', '--log_interval=1',
             '--always_save_checkpoint=True', '--compile=False', *train_args.split()])
        run(['eval_length.py', f'--out_dir={run_dir}', f'--device={device}', f'--num_tokens={eval_tokens}',
             f"--lengths={','.join(map(str, LENGTHS))}", f'--json_out={length_json}'])
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    with open(length_json) as f:
        losses = {r['length']: r['loss'] for r in json.load(f)['results']}
    ms = statistics.median(r['time_ms'] for r in records if r.get('iter', 0) >= 10)  # past the warm-up
    return losses, ms, records[-1].get('energy_mj_per_token')


def cell(values, digits):
    """median (min-max) of the values, or what is missing."""
    if any(v is None for v in values):
        return None
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


results = {(scheme, seed): study(scheme, seed) for seed in SEEDS for scheme in SCHEMES}
print(f"\n{device_name(device)}; shakespeare_char, block_size={block_size}, {max_iters} iterations, {train_args}; "
      f"seeds {','.join(map(str, SEEDS))}: median (min-max)\n")
print(f"| position | val loss at {LENGTHS[0]} | at {LENGTHS[1]} (2x) | at {LENGTHS[2]} (4x) | ms/iter | mJ/token |")
print("|---|---|---|---|---|---|")
for scheme in SCHEMES:
    runs = [results[(scheme, seed)] for seed in SEEDS]
    losses = [cell([r[0][L] for r in runs], 4) or "not defined (no positions past block_size)" for L in LENGTHS]
    energy = cell([r[2] for r in runs], 3) or "not measured here"
    print(f"| {scheme} | {' | '.join(losses)} | {cell([r[1] for r in runs], 1)} | {energy} |")
