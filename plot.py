"""
Loss curves from the log.jsonl that train.py writes in each out_dir, as a PNG: train loss (every
logged iteration, lightly smoothed, and the evaluations' estimate) and val loss against the step,
one colour per run. Needs matplotlib (pip install matplotlib).
    python plot.py --out_dirs=out-shakespeare-char --out=assets/loss.png
    python plot.py --out_dirs=out-learned,out-alibi --out=assets/learned_vs_alibi.png
"""
import json
import os
import sys

# -----------------------------------------------------------------------------
out_dirs = 'out'  # comma-separated out_dirs (or log.jsonl files), one curve each
out = 'assets/loss.png'
smooth = 0.9  # exponential moving average of the per-iteration train loss (0: raw)
title = ''
exec(open('configurator.py').read())
check('smooth', lambda v: 0 <= v < 1, 'in [0, 1) (0: no smoothing)')
check('out_dirs', lambda v: all(v.split(',')), "a comma-separated list of out_dirs, e.g. 'out-a,out-b'")
check('out', lambda v: v and not os.path.isdir(v), "a file name for the PNG, e.g. 'assets/loss.png'")
# -----------------------------------------------------------------------------
prog = 'plot.py'
try:
    import matplotlib
except ImportError:
    sys.exit(f"{prog}: needs matplotlib: pip install matplotlib")
matplotlib.use('Agg')  # write files, no display needed
import matplotlib.pyplot as plt

runs = []
for path in out_dirs.split(','):
    log_path = os.path.join(path, 'log.jsonl') if os.path.isdir(path) else path
    # a run is named by its out_dir, or by the log file's own name when that is not log.jsonl
    name = os.path.basename(log_path)
    label = os.path.basename(os.path.dirname(os.path.abspath(log_path))) if name == 'log.jsonl' else os.path.splitext(name)[0]
    if not os.path.isfile(log_path):
        sys.exit(f"{prog}: no {log_path}: train with train.py first (it writes log.jsonl in its out_dir)")
    iters, evals = {}, {}  # by step: a resumed run repeats the steps after its last checkpoint, the later records win
    with open(log_path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # e.g. the half-written last line of a run still training
            if isinstance(record, dict) and 'iter' in record:
                iters[record['iter']] = record['loss']
            elif isinstance(record, dict) and 'val_loss' in record:  # not the HellaSwag records, which also have a step
                evals[record['step']] = record
    if not iters and not evals:
        sys.exit(f"{prog}: {log_path} has no iteration or evaluation records")
    runs.append((label, sorted(iters.items()), sorted(evals.items())))

fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for i, (label, iters, evals) in enumerate(runs):
    color = f'C{i}'
    if iters:
        smoothed, ema = [], iters[0][1]
        for _, loss in iters:
            ema = smooth * ema + (1 - smooth) * loss
            smoothed.append(ema)
        ax_train.plot([s for s, _ in iters], smoothed, color=color, alpha=0.5, linewidth=1, label=f'{label} (iterations)')
    if evals:
        steps = [s for s, _ in evals]
        ax_train.plot(steps, [r['train_loss'] for _, r in evals], 'o-', color=color, markersize=3, label=f'{label} (evaluations)')
        ax_val.plot(steps, [r['val_loss'] for _, r in evals], 'o-', color=color, markersize=3, label=label)
        step, record = evals[-1]
        print(f"{label}: {len(iters)} iterations, {len(evals)} evaluations, last val loss {record['val_loss']:.4f} at step {step}")
    else:
        print(f"{label}: {len(iters)} iterations, no evaluations")
for ax, name in [(ax_train, 'train loss'), (ax_val, 'val loss')]:
    ax.set_title(name)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
ax_train.set_ylabel('loss')
if title:
    fig.suptitle(title)
fig.tight_layout()
os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
fig.savefig(out, dpi=120)
print(f"wrote {out}")
