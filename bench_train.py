"""
Times train.py's whole loop on a CPU at three shapes, the runs alternating: as it runs by default, in float32
(--dtype=float32, where the default is bfloat16 autocast; --float32=False leaves it out), and, given a checkout of
the original nanoGPT, its train.py with the same flags (float32: nanoGPT never autocasts on a CPU). Each row names
the dtype it ran in. Prints each run's median ms/iteration and final val loss, then per shape the median and
spread (min-max) over the repeats and the ratios. The shapes:
  quick   README's CPU quick start: 4 layers, 4 heads, 128 wide, block 64, batch 12 (65 characters)
  char    config/train_shakespeare_char.py as it is: 6/6/384, block 256, batch 64, dropout 0.2
  gpt2    GPT-2's vocabulary (50304): 4/4/128, block 128, batch 8, on data/text (prepared from any English text)
    python data/shakespeare_char/prepare.py
    python data/text/prepare.py $(python -c "import pydoc_data.topics as t; print(t.__file__)")  # for gpt2
    python bench_train.py --nanogpt_dir=../nanoGPT --repeats=3   # ../nanoGPT: a clone of github.com/karpathy/nanoGPT
    python bench_train.py --shapes=quick --quick_iters=200   # quicker: one shape, fewer iterations
"""
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

from tqdm import tqdm

from configurator import fail, check
from runtime import device_name, setup

# -----------------------------------------------------------------------------
shapes = 'quick,char,gpt2'  # which shapes to time, comma-separated
quick_iters = 2000  # iterations of each run, per shape: the quick start runs whole, the others a sample
char_iters = 20
gpt2_iters = 50
repeats = 3  # runs of each kind, alternating; the median and spread over them are reported
nanogpt_dir = ''  # a checkout of github.com/karpathy/nanoGPT, to time its train.py too
float32 = True  # time ours in float32 too (--dtype=float32: what bfloat16 autocast gains); False: quicker
exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())
for name in ('quick_iters', 'char_iters', 'gpt2_iters'):
    check(name, lambda v: v >= 6, 'an integer >= 6 (the first 5 iterations are not timed)')
check('repeats', lambda v: v >= 1, 'an integer >= 1')
# -----------------------------------------------------------------------------
SHAPES = {
    'quick': ('shakespeare_char', quick_iters, ['config/train_shakespeare_char.py', '--eval_iters=20',
                                                f'--eval_interval={min(250, quick_iters)}', '--block_size=64',
                                                '--batch_size=12', '--n_layer=4', '--n_head=4', '--n_embd=128', '--dropout=0.0']),
    'char': ('shakespeare_char', char_iters, ['config/train_shakespeare_char.py', '--eval_iters=10', f'--eval_interval={char_iters}']),
    'gpt2': ('text', gpt2_iters, ['--dataset=text', '--eval_iters=10', f'--eval_interval={gpt2_iters}', '--block_size=128',
                                  '--batch_size=8', '--n_layer=4', '--n_head=4', '--n_embd=128', '--dropout=0.0',
                                  '--gradient_accumulation_steps=1', '--learning_rate=1e-3', '--warmup_iters=10']),
}
chosen = shapes.split(',')
for shape in chosen:
    if shape not in SHAPES:
        fail(f"unknown shape '{shape}' in --shapes={shapes}: choose from {','.join(SHAPES)}")
    path = os.path.join('data', SHAPES[shape][0], 'train.bin')
    if not os.path.exists(path):
        fail(f"no {path} for the {shape} shape: run python data/{SHAPES[shape][0]}/prepare.py first (see --help)")
if nanogpt_dir and not os.path.exists(os.path.join(nanogpt_dir, 'train.py')):
    fail(f"no train.py in nanogpt_dir={nanogpt_dir}: point it at a checkout of the original nanoGPT")

auto_dtype = setup('cpu', 'auto', verbose=False, training=True).dtype  # what ours runs in by default, here
kinds = {f'ours ({auto_dtype})': []}  # kind: its extra flags
if float32 and auto_dtype != 'float32':
    kinds['ours (float32)'] = ['--dtype=float32']
elif float32:
    print("ours runs in float32 by default on this CPU: no separate float32 row")
if nanogpt_dir:
    kinds['nanoGPT (float32)'] = []


def time_run(kind, shape, tmp):
    """Runs one train.py; returns the median ms/iteration (past the first 5) and the final val loss, read
    from the iter and step lines that ours and nanoGPT print alike, and what ours said it chose on a busy CPU."""
    dataset, iters, flags = SHAPES[shape]
    cwd = os.path.join(tmp, 'nanogpt') if kind.startswith('nanoGPT') else '.'
    args = [*flags, '--device=cpu', '--compile=False', '--log_interval=1', f'--max_iters={iters}',
            f'--lr_decay_iters={iters}', f'--out_dir={os.path.join(tmp, "out")}', *kinds[kind]]
    with tempfile.TemporaryFile('w+') as stderr, tqdm(total=iters + 1, desc=f"{shape} {kind}", unit='iter', leave=False) as bar:
        run = subprocess.Popen([sys.executable, 'train.py', *args], cwd=cwd, stdout=subprocess.PIPE, stderr=stderr, text=True)
        stdout = []
        for line in run.stdout:  # the bar moves at each iteration line
            stdout.append(line)
            bar.update(line.startswith('iter '))
        stderr.seek(0)
        result = subprocess.CompletedProcess(run.args, run.wait(), ''.join(stdout), stderr.read())
    if result.returncode != 0:
        fail(f"the {kind} run of {shape} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    eval_interval = int(next(f for f in flags if f.startswith('--eval_interval=')).split('=')[1])
    # past the first 5; nanoGPT's time of an iteration that starts with an evaluation includes it, and it runs one
    # iteration past max_iters
    iter_ms = [float(ms) for it, ms in re.findall(r'^iter (\d+): .*time ([\d.]+)ms', result.stdout, re.M)
               if 5 <= int(it) < iters and int(it) % eval_interval != 0]
    val_loss = float(re.findall(r'^step \d+: .*val loss ([\d.]+)', result.stdout, re.M)[-1])
    plan = re.search(r'^device cpu, (\w+)', result.stdout, re.M)
    if plan and f'({plan[1]})' not in kind:
        fail(f"the {kind} run of {shape} ran in {plan[1]}: the dtype probe (runtime.py) decided otherwise in it")
    busy = re.search(r'^other processes keep ([\d.]+) of', result.stdout, re.M)  # ours at its start (cpu.py)
    threads = re.search(r'OMP_NUM_THREADS=(\d+)', result.stdout)
    busy_text = f", busy CPU ({busy[1]} taken) at its start: {threads[1] + ' thread' if threads else 'short OpenMP spin'}" if busy else ''
    return statistics.median(iter_ms), val_loss, busy_text


print(f"CPU: {device_name('cpu')}, {os.cpu_count()} logical CPUs; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
results = {(shape, kind): [] for shape in chosen for kind in kinds}
with tempfile.TemporaryDirectory() as tmp:
    if nanogpt_dir:  # a copy of its scripts that reads our token bins
        shutil.copytree(nanogpt_dir, os.path.join(tmp, 'nanogpt'), ignore=shutil.ignore_patterns('data', '.git', 'out*'))
        for dataset in {SHAPES[shape][0] for shape in chosen}:
            os.makedirs(os.path.join(tmp, 'nanogpt', 'data'), exist_ok=True)
            os.symlink(os.path.abspath(os.path.join('data', dataset)), os.path.join(tmp, 'nanogpt', 'data', dataset))
    for repeat in range(repeats):
        for shape in chosen:
            for kind in kinds:
                load = os.getloadavg()[0]
                ms, val_loss, busy_text = time_run(kind, shape, tmp)
                results[(shape, kind)].append((ms, val_loss))
                print(f"{shape:5s} {kind:19s} {ms:8.1f} ms/iter  val loss {val_loss:.4f} after {SHAPES[shape][1]} iters  "
                      f"(load {load:.1f} before, {os.getloadavg()[0]:.1f} after{busy_text})", flush=True)

print(f"medians over {repeats} alternating runs (spread min-max), CPU {device_name('cpu')}:")
for shape in chosen:
    medians = {kind: statistics.median(ms for ms, _ in results[(shape, kind)]) for kind in kinds}
    for kind in kinds:
        times, losses = zip(*results[(shape, kind)])
        ours = next(iter(kinds))  # ours as it runs by default, against each other kind
        ratios = ', '.join(f"{medians[other] / medians[kind]:.2f}x {other}" for other in kinds if other != kind and kind == ours)
        print(f"{shape:5s} {kind:19s} {medians[kind]:8.1f} ms/iter ({min(times):.1f}-{max(times):.1f})  "
              f"val loss {statistics.median(losses):.4f}" + (f"  speed: {ratios}" if ratios else ''))
