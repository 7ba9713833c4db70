"""
Time to a target loss: trains a shape until its val loss first reaches the target and reports the iterations,
tokens, wall seconds (from the process's start) and, where the machine measures them, joules it took, for the
original nanoGPT (a checkout, its own AdamW), ours with AdamW and ours with Muon (--optimizer=muon), the runs
alternating over the seeds. Every run evaluates every eval_interval iterations on the same val windows: ours
spreads them evenly over val.bin, and nanoGPT's copy here is patched to use the same ones (and to take the seed)
instead of drawing random batches. The shapes:
  quick  README's CPU quick start (4 layers, 4 heads, 128 wide, block 64, batch 12, its 2000-iteration schedule),
         to val 1.88 (nanoGPT's quoted quick-start loss)
  char   config/train_shakespeare_char.py as it is (6/6/384, block 256, batch 64, dropout 0.2), to val 1.50
Each run is appended to --results as it finishes and is not repeated by the next invocation; the table printed
at the end covers every run in the file. budget_s keeps one invocation short: run the same command again to go on.
    python data/shakespeare_char/prepare.py
    python bench_target.py --nanogpt_dir=../nanoGPT --results=target-quick.jsonl
    python bench_target.py --kinds=muon --seeds=7 --muon_flags='--muon_lr=0.04' --results=tune.jsonl  # tuning
"""
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from configurator import fail, check
from runtime import device_name

# -----------------------------------------------------------------------------
shape = 'quick'  # 'quick' or 'char' (see above)
target = 0.0  # the val loss to reach; 0.0: the shape's (1.88 quick, 1.50 char)
kinds = 'nanogpt,adamw,muon'  # which runs, comma-separated
seeds = '1,2,3'  # one run of each kind per seed
eval_interval = 50  # iterations between evaluations (the resolution of the figures)
muon_flags = ''  # extra flags for ours+Muon (a tuned recipe), e.g. '--muon_lr=0.04 --max_iters=1000 --lr_decay_iters=1000'
nanogpt_dir = ''  # a checkout of github.com/karpathy/nanoGPT (needed for kind nanogpt)
results = 'bench_target.jsonl'  # the runs, one JSON line each: appended, and read back for the table
budget_s = 540  # start no new run after this many seconds
device = 'cpu'  # where both train ('cuda' for the char shape: on this CPU its runs take hours)
exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())
check('shape', lambda v: v in ('quick', 'char'), "'quick' or 'char'")
check('kinds', lambda v: set(v.split(',')) <= {'nanogpt', 'adamw', 'muon'}, "a comma-separated choice of nanogpt, adamw, muon")
check('seeds', lambda v: all(s.isdigit() for s in v.split(',')), 'comma-separated integers, e.g. 1,2,3')
check('eval_interval', lambda v: v >= 1, 'an integer >= 1')
check('nanogpt_dir', lambda v: 'nanogpt' not in kinds.split(',') or (v and os.path.exists(os.path.join(v, 'train.py'))),
      'a checkout of the original nanoGPT (a folder with its train.py); or leave nanogpt out of --kinds')
# -----------------------------------------------------------------------------
SHAPES = {  # the train.py flags (both scripts take them) and the default target
    'quick': (['config/train_shakespeare_char.py', '--eval_iters=20', '--block_size=64', '--batch_size=12', '--n_layer=4',
               '--n_head=4', '--n_embd=128', '--max_iters=3000', '--lr_decay_iters=2000', '--dropout=0.0'], 1.88),
    'char': (['config/train_shakespeare_char.py', '--eval_iters=20'], 1.50),
}
flags, default_target = SHAPES[shape]
target = target or default_target
if not os.path.exists(os.path.join('data', 'shakespeare_char', 'train.bin')):
    fail("no data/shakespeare_char/train.bin: run python data/shakespeare_char/prepare.py first")
# nanoGPT's evaluation draws random batches and its seed is fixed: these lines of its train.py change in the copy
NANOGPT_PATCH = [
    ("torch.manual_seed(1337 + seed_offset)", "torch.manual_seed(int(os.environ['BENCH_SEED']) + seed_offset)"),
    ("def get_batch(split):", "def get_batch(split, k=None):"),
    ("    ix = torch.randint(len(data) - block_size, (batch_size,))",
     "    ix = torch.randint(len(data) - block_size, (batch_size,)) if k is None else \\\n"
     "        np.linspace(0, len(data) - block_size - 1, eval_iters * batch_size).astype(np.int64)[k * batch_size:(k + 1) * batch_size]"),
    ("            X, Y = get_batch(split)\n", "            X, Y = get_batch(split, k)\n"),
]
STEP = re.compile(r'^step (\d+): train loss [\d.]+, val loss ([\d.]+)')
JOULES = re.compile(r', ([\d.e+]+) J\b')


def time_to_target(kind, seed, tmp):
    """One run, stopped (SIGKILL) at the first evaluation at or under the target: its record."""
    cwd = os.path.join(tmp, 'nanogpt') if kind == 'nanogpt' else '.'
    out_dir = os.path.join(tmp, f'out-{kind}-{seed}')
    args = [*flags, f'--device={device}', '--compile=False', f'--eval_interval={eval_interval}', '--log_interval=100',
            f'--out_dir={out_dir}', '--always_save_checkpoint=False']
    args += [] if kind == 'nanogpt' else [f'--seed={seed}', f'--optimizer={kind}']
    args += muon_flags.split() if kind == 'muon' else []
    record = dict(shape=shape, target=target, kind=kind, seed=seed, flags=muon_flags if kind == 'muon' else '',
                  load_before=os.getloadavg()[0], reached=False)
    start = time.time()
    proc = subprocess.Popen([sys.executable, 'train.py', *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, BENCH_SEED=str(seed)), start_new_session=True)
    joules, tokens_per_iter = [], None
    for line in proc.stdout:
        joules += [float(j) for j in JOULES.findall(line)]
        if m := re.match(r'tokens per iteration will be: ([\d,]+)', line):
            tokens_per_iter = int(m[1].replace(',', ''))
        if m := STEP.match(line):
            record.update(iters=int(m[1]), val_loss=float(m[2]), wall_s=time.time() - start)
            if float(m[2]) <= target:
                record.update(reached=True, tokens=int(m[1]) * tokens_per_iter, joules=sum(joules) if joules else None)
                os.killpg(proc.pid, signal.SIGKILL)  # the target is reached: the rest of the run is not needed
                break
    proc.wait()
    if not record['reached'] and proc.returncode != 0:
        fail(f"the {kind} run (seed {seed}) failed: {(proc.stderr.read().strip().splitlines() or ['?'])[-1]}")
    shutil.rmtree(out_dir, ignore_errors=True)
    return {**record, 'load_after': os.getloadavg()[0]}


done = []
if os.path.exists(results):
    with open(results) as f:
        done = [json.loads(line) for line in f if line.strip()]
key = lambda r: (r['shape'], r['target'], r['kind'], r['seed'], r['flags'])
print(f"device: {device_name(device)}, {os.cpu_count()} logical CPUs; OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}")
started = time.time()
with tempfile.TemporaryDirectory() as tmp:
    if 'nanogpt' in kinds.split(','):  # a copy of its scripts, patched as above, that reads our token bins
        shutil.copytree(nanogpt_dir, os.path.join(tmp, 'nanogpt'), ignore=shutil.ignore_patterns('data', '.git', 'out*'))
        path = os.path.join(tmp, 'nanogpt', 'train.py')
        source = open(path).read()
        for old, new in NANOGPT_PATCH:
            if source.count(old) != 1:
                fail(f"{nanogpt_dir}/train.py is not the nanoGPT this script knows: no single line {old.strip()!r}")
            source = source.replace(old, new)
        open(path, 'w').write(source)
        os.makedirs(os.path.join(tmp, 'nanogpt', 'data'))
        os.symlink(os.path.abspath(os.path.join('data', 'shakespeare_char')), os.path.join(tmp, 'nanogpt', 'data', 'shakespeare_char'))
    todo = [(seed, kind) for seed in map(int, seeds.split(',')) for kind in kinds.split(',')
            if not any(key(r) == (shape, target, kind, seed, muon_flags if kind == 'muon' else '') for r in done)]
    for seed, kind in todo:
        if time.time() - started > budget_s:
            print(f"budget_s={budget_s} spent: run the same command again for the remaining runs")
            break
        r = time_to_target(kind, seed, tmp)
        done.append(r)
        with open(results, 'a') as f:
            f.write(json.dumps(r) + '\n')
        print(f"{kind:8s} seed {seed}: " + (f"val {r['val_loss']:.4f} at iter {r['iters']}, {r['wall_s']:.1f} s" if r['reached']
              else f"not reached: val {r.get('val_loss', float('nan')):.4f} at iter {r.get('iters')}") +
              f"  (load {r['load_before']:.1f} before, {r['load_after']:.1f} after)", flush=True)

# the table: every run of this shape and target in the results file
rows = {}
for r in done:
    if (r['shape'], r['target']) == (shape, target):
        rows.setdefault((r['kind'], r['flags']), []).append(r)
spread = lambda xs, fmt: f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})" if xs else '-'
nanogpt_wall = [r['wall_s'] for r in rows.get(('nanogpt', ''), []) if r['reached']]
loads = [x for rs in rows.values() for r in rs for x in (r['load_before'], r['load_after'])]
print(f"\n{shape} shape to val loss {target}, {device_name(device)}; load {min(loads, default=0):.1f}-{max(loads, default=0):.1f}; "
      f"median (min-max) over seeds")
print("| run | seeds reached | iterations | tokens | wall s | joules | wall time vs nanoGPT's |")
print("|---|---|---|---|---|---|---|")
for (kind, extra), rs in rows.items():
    ok = [r for r in rs if r['reached']]
    wall = [r['wall_s'] for r in ok]
    js = [r['joules'] for r in ok if r.get('joules')]
    ratio = (f"{statistics.median(wall) / statistics.median(nanogpt_wall):.2f} "
             f"({statistics.median(nanogpt_wall) / statistics.median(wall):.2f}x faster)") if wall and nanogpt_wall and kind != 'nanogpt' else '-'
    name = {'nanogpt': 'nanoGPT', 'adamw': 'ours, AdamW', 'muon': 'ours, Muon'}[kind] + (f" `{extra}`" if extra else '')
    print(f"| {name} | {len(ok)}/{len(rs)} ({','.join(str(r['seed']) for r in rs)}) | {spread([r['iters'] for r in ok], '{:.0f}')} | "
          f"{spread([r['tokens'] for r in ok], '{:,.0f}')} | {spread(wall, '{:.1f}')} | {spread(js, '{:.0f}') if js else 'not measured'} | {ratio} |")
