"""
Times train.py's whole loop on the CPU quick-start shape twice, one run after the other: as it runs by
default, and with its CPU speed-ups turned off (float32 instead of bfloat16 autocast, and OpenMP
threads that spin ~3 ms while they wait, libgomp's default, instead of ~10 us). Prints ms/iteration,
tokens/s and the final val loss of each run, and how much faster the default is.
    python data/shakespeare_char/prepare.py && python bench_train.py
    python bench_train.py --max_iters=200 --repeats=3   # quicker; the runs alternate, medians reported
    python bench_train.py --compile=True                # also a compiled run, and its compile time
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# -----------------------------------------------------------------------------
max_iters = 2000
repeats = 1  # runs of each kind, alternating; on a shared machine more repeats give steadier medians
compile = False  # also time the default run with --compile=True
exec(open('configurator.py').read())
check('max_iters', lambda v: v >= 6, 'an integer >= 6 (the first 5 iterations are not timed)')
check('repeats', lambda v: v >= 1, 'an integer >= 1')
# -----------------------------------------------------------------------------
prog = 'bench_train.py'
if not os.path.exists(os.path.join('data', 'shakespeare_char', 'train.bin')):
    sys.exit(f"{prog}: no data/shakespeare_char/train.bin: run python data/shakespeare_char/prepare.py first")

quick_start = ['config/train_shakespeare_char.py', '--device=cpu', '--compile=False', '--eval_iters=20',
               '--log_interval=1', '--block_size=64', '--batch_size=12', '--n_layer=4', '--n_head=4',
               '--n_embd=128', '--dropout=0.0', f'--max_iters={max_iters}', f'--lr_decay_iters={max_iters}']
# name: (environment, extra settings); GOMP_SPINCOUNT=300000 is libgomp's own default
runs = {'default': ({}, []),
        'speed-ups off': ({'GOMP_SPINCOUNT': '300000'}, ['--dtype=float32'])}
if compile:
    runs['default, compiled'] = ({}, ['--compile=True'])


def time_run(name, env, args, out_dir):
    """Runs train.py; returns its median ms/iteration (past the first 5), final val loss, wall seconds and
    the seconds beyond the iterations at that median pace."""
    t0 = time.time()
    result = subprocess.run([sys.executable, 'train.py', *quick_start, *args, f'--out_dir={out_dir}'],
                            env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.time() - t0
    if result.returncode != 0:
        sys.exit(f"{prog}: the '{name}' run failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    iter_ms = [r['time_ms'] for r in records if 'iter' in r]
    val_loss = [r['val_loss'] for r in records if 'step' in r][-1]
    ms = statistics.median(iter_ms[5:])
    return ms, val_loss, wall, wall - ms * len(iter_ms) / 1000  # the last: startup, evals and compiling


tokens_per_iter = 12 * 64
results = {name: [] for name in runs}
with tempfile.TemporaryDirectory() as tmp:
    for repeat in range(repeats):
        for i, (name, (env, args)) in enumerate(runs.items()):
            ms, val_loss, wall, other = time_run(name, env, args, os.path.join(tmp, f'run{i}-{repeat}'))
            results[name].append(ms)
            print(f"{name:18s} {ms:7.1f} ms/iter  {tokens_per_iter / ms * 1000:6.0f} tok/s  val loss {val_loss:.4f} "
                  f"at {max_iters}  wall {wall:5.0f}s, of which startup, evals, compiling {other:4.0f}s", flush=True)

print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
medians = {name: statistics.median(ms) for name, ms in results.items()}
for name, ms in medians.items():
    print(f"{name:18s} median {ms:7.1f} ms/iter, {medians['speed-ups off'] / ms:.2f}x the speed-ups-off loop")
