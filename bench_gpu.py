"""
The GPU check (issue 33): every CUDA-only path tested and the fork's figures measured, in one run that keeps to its
time budget (what does not fit is skipped, and said). bench_gpu.sh runs it on a fresh machine after README's
install lines, in under 8 minutes on one H100-class GPU. What it runs, each in its own process:
  tests/test_cuda.py    compile, bfloat16 and float16 training, the sdpa kernels, NCCL DDP, FSDP, NVML, MFU...
  bench.py              GPT-2 124M (block 1024, batch 12, compiled) training steps: learned positions vs ALiBi x
                        sdpa vs explicit attention: ms/iter, tokens/s, MFU, peak memory, mJ/token (NVML); and one
                        eager step, whose peak memory memory.py predicts
  bench.py --mode=sample  GPT.generate's tokens/s against Hugging Face's generate, at batch 1 and 8 (eager, both)
  train.py config/train_shakespeare_char.py  for a fixed 500 iterations: its val loss. The data: Tiny Shakespeare
                        when data/shakespeare_char has it (train.bin, or its input.txt), else Python's own
                        documentation as characters (a GPU machine may have no internet); the table says which.
First the tests, the shakespeare run and a warm-up of the four compiled steps run side by side (their kernels land
in inductor's on-disk cache); then each timed run runs alone. Prints one markdown table. Its CPU twin, in CI:
    python bench_gpu.py --device=cpu --shape=tiny --compile=False
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from configurator import check

# -----------------------------------------------------------------------------
device = 'auto'  # passed to every run: 'auto' takes the GPU
dtype = 'auto'  # bfloat16 on Ampere and newer GPUs
shape = 'gpt2'  # GPT-2 124M; 'tiny': every run at a tiny shape, seconds on a CPU (CI's twin of the GPU run)
compile = True  # torch.compile the training steps and the shakespeare run
budget_s = 420.0  # seconds this script may take; bench_gpu.sh gives it what is left of 8 minutes after the install
shakespeare_iters = 500  # the fixed short run of config/train_shakespeare_char.py
variants = 'learned sdpa, learned explicit, ALiBi sdpa, ALiBi explicit'  # the training steps timed: positions attention
sample_batches = '1, 8'  # bench.py --mode=sample at these batch sizes
table = ''  # also write the table to this file
log_dir = ''  # keep every run's output there (bench_gpu.sh: $OUT on a GPU machine); '' : a temporary folder
exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())
check('shape', lambda v: v in ('gpt2', 'tiny'), "'gpt2' or 'tiny'")
check('budget_s', lambda v: v > 0, 'a number of seconds > 0')
check('shakespeare_iters', lambda v: v >= 1, 'an integer >= 1')
check('variants', lambda v: all(x.split() in ([p, a] for p in ('learned', 'ALiBi') for a in ('sdpa', 'explicit'))
                                for x in v.split(',')), "a comma-separated list of 'learned' or 'ALiBi', then 'sdpa' or 'explicit'")
check('sample_batches', lambda v: all(int(b) >= 1 for b in v.split(',')), 'a comma-separated list of batch sizes')
# -----------------------------------------------------------------------------
start = time.monotonic()
left = lambda: budget_s - (time.monotonic() - start)
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12, vocab_size=50304)
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=2, vocab_size=65)
model_shape = GPT2 if shape == 'gpt2' else TINY
shape_args = [f'--{k}={v}' for k, v in model_shape.items()]
common = [f'--device={device}', f'--dtype={dtype}']
if shape == 'gpt2':  # what each kind of run was expected to take on an H100 (seconds), to skip what cannot fit
    cost = dict(tests=150, warm_up=90, shakespeare=90, step=35, eager=20, sample=30)
    energy_args, sample_args = ['--energy_rounds=3', '--energy_seconds=1.5'], ['--max_new_tokens=200', '--sample_rounds=3']
    shakespeare_args = []
else:
    cost = dict(tests=60, warm_up=60, shakespeare=60, step=30, eager=30, sample=30)
    energy_args, sample_args = ['--energy_rounds=1', '--energy_seconds=0.1'], ['--max_new_tokens=8', '--sample_rounds=1']
    shakespeare_args = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_iters=2',
                        '--dropout=0.0', '--warmup_iters=2']
VARIANTS = {', '.join(v.split()): [f"--alibi={v.split()[0] == 'ALiBi'}", f"--flash_attn={v.split()[1] == 'sdpa'}"]
            for v in variants.split(',')}  # 'learned, sdpa': its bench.py flags
batches = [int(b) for b in sample_batches.split(',')]
skipped = []  # what the budget left out, said under the table
scratch = tempfile.mkdtemp(prefix='bench_gpu-')  # the shakespeare run's out_dir and text: removed at the end
logs = log_dir or scratch
os.makedirs(logs, exist_ok=True)
import torch  # noqa: E402
on_cuda = device.startswith('cuda') or (device == 'auto' and torch.cuda.is_available())


class Job:
    """One command in the background, its output (stdout and stderr) in a file; stopped at its time limit."""

    def __init__(self, name, cmd, limit):
        self.name, self.cmd, self.limit, self.t0 = name, cmd, limit, time.monotonic()
        self.path = os.path.join(logs, re.sub(r'\W+', '_', name) + '.txt')
        with open(self.path, 'w') as f:  # its own process group: a time limit stops its children too
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def finish(self):
        """(exit status, or None when stopped at its limit; its output)."""
        try:
            rc = self.proc.wait(timeout=max(1.0, self.limit - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            rc = None
        with open(self.path, errors='replace') as f:
            out = f.read()
        seconds = time.monotonic() - self.t0
        status = f"stopped at its limit of {self.limit:.0f} s" if rc is None else f"exit status {rc}"
        print(f"== {self.name}: {status} after {seconds:.0f} s: {' '.join(self.cmd[1:])}", flush=True)
        if rc != 0:
            print(''.join(out.splitlines(keepends=True)[-15:]), flush=True)
        return rc, out


def start_job(name, cmd, estimate, limit=None):
    """A Job, unless the budget has less than estimate seconds left for it (then None, and it is said)."""
    if left() < estimate:
        skipped.append(f"{name}: needs about {estimate:.0f} s, {max(0.0, left()):.0f} s of the budget left")
        return None
    return Job(name, cmd, min(limit or left(), left()))


def run_job(name, cmd, estimate):
    job = start_job(name, cmd, estimate)
    return job.finish() if job else (None, None)


def find(pattern, text, group=1, last=False):
    found = re.findall(pattern, text or '', re.M)
    if not found:
        return None
    match = found[-1] if last else found[0]
    return match[group - 1] if isinstance(match, tuple) else match


def failure(rc, out):
    """The table's note for a run that did not give its figures."""
    if out is None:
        return 'skipped: not enough of the budget left'
    if rc is None:
        return 'stopped at its time limit'
    return f"failed (exit status {rc}): {(out.strip().splitlines() or ['?'])[-1][:150]}"


def shakespeare_data():
    """(dataset, what it is, the prepare command or None): Tiny Shakespeare when data/shakespeare_char has its bins or
    its input.txt (or ../shared has one, copied in), else Python's own documentation, which every Python has."""
    here = os.path.join('data', 'shakespeare_char')
    shared = os.path.join('..', 'shared', 'data', 'tinyshakespeare', 'input.txt')
    if not os.path.exists(os.path.join(here, 'input.txt')) and os.path.exists(shared):
        shutil.copy(shared, here)
    if os.path.exists(os.path.join(here, 'input.txt')):
        return 'shakespeare_char', 'Tiny Shakespeare', [sys.executable, os.path.join(here, 'prepare.py')]
    if all(os.path.exists(os.path.join(here, n)) for n in ('train.bin', 'val.bin', 'meta.pkl')):
        return 'shakespeare_char', 'Tiny Shakespeare (bins found prepared)', None
    import pydoc_data.topics
    text = os.path.join(scratch, 'python_docs.txt')
    with open(text, 'w', encoding='utf-8') as f:
        f.write('\n\n'.join(pydoc_data.topics.topics.values()))
    return ('bench_gpu_text', "Python's documentation as characters: no Tiny Shakespeare here",
            [sys.executable, os.path.join('data', 'text', 'prepare.py'), text, '--char', '--out_dir=data/bench_gpu_text'])


def memory_prediction():
    """memory.py's GiB for one GPU training GPT-2 (this shape, learned positions) at this batch, or None."""
    import memory
    from model import GPTConfig
    args = {k: v for k, v in model_shape.items() if k != 'batch_size'}
    return memory.predicted_bytes(GPTConfig(**args, bias=False), model_shape['batch_size'])[5] / 2 ** 30


# -----------------------------------------------------------------------------
# side by side: the tests, the shakespeare run, and the compiled steps' warm-up (their timings are not used)
bench = [sys.executable, 'bench.py', *common, *shape_args, '--real_data=False', f'--compile={compile}']
phase2 = len(VARIANTS) * cost['step'] + cost['eager'] + len(batches) * cost['sample']  # what the timed runs after this phase need
tests = start_job('tests/test_cuda.py', [sys.executable, '-m', 'pytest', '-q', '-rfEs', 'tests/test_cuda.py'],
                  cost['tests'], limit=max(cost['tests'], left() - phase2))
dataset, data_what, prepare = shakespeare_data() if left() >= cost['shakespeare'] else (None, None, None)
if prepare:
    subprocess.run(prepare, check=True, stdout=subprocess.DEVNULL)
shakespeare = start_job(f'shakespeare_char, {shakespeare_iters} iters',
                        [sys.executable, 'train.py', 'config/train_shakespeare_char.py', *common, *shakespeare_args,
                         f'--dataset={dataset}', f'--compile={compile}', f'--max_iters={shakespeare_iters}',
                         f'--lr_decay_iters={shakespeare_iters}', f'--eval_interval={shakespeare_iters}',
                         f'--log_interval={max(1, shakespeare_iters // 10)}', f'--out_dir={os.path.join(scratch, "out-shakespeare-char")}'],
                        cost['shakespeare'], limit=max(cost['shakespeare'], left() - phase2))
warm_ups = [start_job(f'warm-up {name}', [*bench, *flags], cost['warm_up'], limit=max(cost['warm_up'], left() - phase2))
            for name, flags in VARIANTS.items()] if compile else []
predicted_gib = memory_prediction()
tests_result = tests.finish() if tests else (None, None)
shakespeare_result = shakespeare.finish() if shakespeare else (None, None)
for job in warm_ups:
    if job:
        job.finish()

# one at a time: the timed runs
steps = {name: run_job(f'train step, {name}', [*bench, *flags, '--measure_energy=True', *energy_args], cost['step'])
         for name, flags in VARIANTS.items()}
eager = (run_job('train step, learned, sdpa, eager', [*bench[:-1], '--compile=False', '--alibi=False', '--flash_attn=True'],
                 cost['eager']) if on_cuda else (None, None))  # for its peak memory, which memory.py predicts
sample = {b: run_job(f'sample, batch {b}', [sys.executable, 'bench.py', '--mode=sample', *common, *shape_args[:4],
                                           f'--vocab_size={model_shape["vocab_size"]}', '--bias=True', '--compile=False',
                                           f'--batch_size={b}', *sample_args], cost['sample'])
          for b in batches}

# -----------------------------------------------------------------------------
# the table
first = next((out for _, out in steps.values() if out), '') or ''
device_line = find(r'^device (.*)$', first) or '?'
rows = []


def row(run, ms='', tokens='', mfu='', peak='', mj='', note=''):
    rows.append(f"| {run} | {ms} | {tokens} | {mfu} | {peak} | {mj} | {note} |")


def step_row(run, rc, out, note=''):
    figures = re.search(r'^time per iteration: ([\d.]+) ms, ([\d,]+) tokens/s(?:, MFU ([\d.]+)%)?', out or '', re.M)
    if rc != 0 or not figures:
        return row(run, note=failure(rc, out))
    peak = find(r'^peak memory: ([\d.]+) GiB', out)
    mj = find(r'^energy: ([\d.e+-]+ \([^)]*\)) mJ/token', out)
    attention = find(r'^device .*, (sdpa|explicit) attention', out)
    notes = [f"{attention} attention"] + ([note] if note else [])
    row(run, figures[1], figures[2], f"{figures[3]}%" if figures[3] else 'n/a', f"{peak} GiB" if peak else 'n/a (CUDA only)',
        mj or 'n/a', '; '.join(notes))


predicted = f"memory.py predicts {predicted_gib:.3g} GiB" if predicted_gib else ''
for name, (rc, out) in steps.items():
    step_row(f"train step, {name}", rc, out, predicted if name == 'learned, sdpa' else '')
if not on_cuda:
    row('train step, learned, sdpa, eager', note=f"peak memory is measured on CUDA only; {predicted}")
else:
    peak = find(r'^peak memory: ([\d.]+) GiB', eager[1])
    ratio = f" (measured / predicted {float(peak) / predicted_gib:.2f})" if peak and predicted_gib else ''
    step_row('train step, learned, sdpa, eager', *eager, predicted + ratio)
for b, (rc, out) in sample.items():
    figures = re.search(r"KV cache ([\d.]+) \(([^)]*)\), no cache \(nanoGPT's loop\) ([\d.]+), Hugging Face generate "
                        r"([\d.]+) \(([^)]*)\); KV cache vs Hugging Face ([\d.]+)", out or '')
    if rc != 0 or not figures:
        row(f"sample, batch {b}", note=failure(rc, out))
    else:
        row(f"sample, batch {b}, KV cache", tokens=f"{figures[1]} ({figures[2]})",
            note=f"Hugging Face generate {figures[4]} ({figures[5]}) tokens/s: ours {figures[6]}x; no cache {figures[3]}; eager")
rc, out = shakespeare_result
val = find(r'^step \d+: train loss [\d.]+, val loss ([\d.]+)', out, last=True)
if rc != 0 or not val:
    row(f"train.py config/train_shakespeare_char.py, {shakespeare_iters} iters", note=failure(rc, out))
else:
    it = re.findall(r'^iter \d+: loss [\d.]+, time ([\d.]+)ms(?:, mfu ([\d.]+)%)?, (\d+) tok/s', out, re.M)[-1]
    mj = find(r'energy of the run: .*, ([\d.e+-]+) mJ per token trained', out)
    row(f"train.py config/train_shakespeare_char.py, {shakespeare_iters} iters", it[0], f"{int(it[2]):,}",
        f"{it[1]}%" if it[1] else 'n/a', 'n/a', mj or 'n/a',
        f"**val loss {val}** on {data_what}; its time ran beside the tests")
rc, out = tests_result
summary = find(r'^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$', out, last=True)
reason = find(r'^SKIPPED \[\d+\] [^:]+:\d+: (.*)$', out) if rc == 5 else None  # 5: nothing ran, the file was skipped
progress = find(r'^([.FEsx]+)(?:\s+\[\s*\d+%\])?$', out, last=True)
row('tests/test_cuda.py', note=(f"{summary}" + (f": {reason}" if reason else '')) if rc in (0, 1, 5) and summary else
    failure(rc, out) + (f"; so far {progress}" if rc is None and progress else ''))

print(f"\nGPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {device_line}; torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}); shape {shape}: {', '.join(shape_args)}; {time.monotonic() - start:.0f} s of "
      f"a {budget_s:.0f} s budget" + (f"; MFU against {find(r'^MFU against (.*)$', first)}" if find(r'^MFU against (.*)$', first) else ''))
lines = ["| run | ms/iter | tokens/s | MFU | peak memory | mJ/token | notes |", "|---|---|---|---|---|---|---|", *rows]
print('\n'.join(lines))
why_no_energy = find(r'^energy not measured here: (.*)$', first)
if why_no_energy:
    print(f"mJ/token n/a: energy not measured here: {why_no_energy}")
print("skipped (time budget): " + ('; '.join(skipped) if skipped else 'nothing'))
if table:
    with open(table, 'w') as f:
        f.write('\n'.join(lines) + '\n')
shutil.rmtree(scratch, ignore_errors=True)
