"""
Curves from the log.jsonl that train.py writes in each out_dir, as a PNG, one colour per run: train loss
(every logged iteration, smoothed, and the evaluations' estimate), val loss and, when a run scored it
(--hellaswag_interval), HellaSwag acc_norm, against the step. Reference lines: OpenAI's GPT-2 (124M) on
HellaSwag (acc_norm 0.2955 by hellaswag.py's scoring) and on your val.bin once you have scored it there
(python train.py config/train_gpt2_fineweb.py --init_from=gpt2 --eval_only=True prints its val loss), and
lines you name yourself. Needs matplotlib (pip install matplotlib).
    python plot.py --out_dirs=out-shakespeare-char --out=assets/loss.png
    python plot.py --out_dirs=out-learned,out-alibi --out=assets/learned_vs_alibi.png
    python plot.py --out_dirs=out-gpt2-fineweb --out=assets/fineweb.png --gpt2_val_loss=3.29 "--reference=GPT-3 124M=0.337"
"""
import json
import math
import os

from configurator import fail, check

# -----------------------------------------------------------------------------
out_dirs = 'out'  # comma-separated out_dirs (or log.jsonl files), one curve each
out = 'assets/loss.png'
smooth = 0.9  # exponential moving average of the train loss, per iteration (0: raw)
title = ''
gpt2_hellaswag = 0.2955  # OpenAI's GPT-2 (124M), acc_norm by hellaswag.py (python hellaswag.py --init_from=gpt2); None: no line
gpt2_val_loss = None  # OpenAI's GPT-2 (124M) on your val.bin: train.py --init_from=gpt2 --eval_only=True prints it
reference = ''  # lines of your own on the HellaSwag panel, 'name=value' (comma-separated), e.g. 'GPT-3 124M=0.337'
loss_reference = ''  # the same on the loss panels, e.g. 'llm.c 10B=3.28'
exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())


def parse_lines(text):
    """'name=value,name=value' -> [(name, value)]; raises ValueError."""
    lines = []
    for item in filter(None, text.split(',')):
        name, eq, value = item.rpartition('=')
        if not (eq and name.strip() and math.isfinite(float(value))):
            raise ValueError(item)
        lines.append((name.strip(), float(value)))
    return lines


check('smooth', lambda v: 0 <= v < 1, 'in [0, 1) (0: no smoothing)')
check('out_dirs', lambda v: all(v.split(',')), "a comma-separated list of out_dirs, e.g. 'out-a,out-b'")
check('out', lambda v: v and not os.path.isdir(v), "a file name for the PNG, e.g. 'assets/loss.png'")
for k in ('gpt2_hellaswag', 'gpt2_val_loss'):
    check(k, lambda v: v is None or (not isinstance(v, bool) and v > 0), 'a number > 0, or None: no line')
check('reference', lambda v: parse_lines(v) is not None, "'name=value' (comma-separated for several), e.g. 'GPT-3 124M=0.337'")
check('loss_reference', lambda v: parse_lines(v) is not None, "'name=value' (comma-separated for several), e.g. 'llm.c 10B=3.28'")
# -----------------------------------------------------------------------------
try:
    import matplotlib
except ImportError:
    fail("needs matplotlib: pip install matplotlib")
matplotlib.use('Agg')  # write files, no display needed
import matplotlib.pyplot as plt

runs = []
for path in out_dirs.split(','):
    log_path = os.path.join(path, 'log.jsonl') if os.path.isdir(path) else path
    # a run is named by its out_dir, or by the log file's own name when that is not log.jsonl
    name = os.path.basename(log_path)
    label = os.path.basename(os.path.dirname(os.path.abspath(log_path))) if name == 'log.jsonl' else os.path.splitext(name)[0]
    if not os.path.isfile(log_path):
        fail(f"no {log_path}: train with train.py first (it writes log.jsonl in its out_dir)")
    iters, evals, hellaswag = {}, {}, {}  # by step: a resumed run repeats the steps after its last checkpoint, the later records win
    with open(log_path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # e.g. the half-written last line of a run still training
            if not isinstance(record, dict):
                continue
            if 'iter' in record:
                iters[record['iter']] = record['loss']
            elif 'val_loss' in record:
                evals[record['step']] = record
            elif 'hellaswag_acc_norm' in record:
                hellaswag[record['step']] = record['hellaswag_acc_norm']
    if not iters and not evals:
        fail(f"{log_path} has no iteration or evaluation records")
    runs.append((label, sorted(iters.items()), sorted(evals.items()), sorted(hellaswag.items())))

with_hellaswag = any(run[3] for run in runs)
fig, axes = plt.subplots(1, 3 if with_hellaswag else 2, figsize=(16 if with_hellaswag else 11, 4))
ax_train, ax_val = axes[:2]
ax_train.sharey(ax_val)
for i, (label, iters, evals, hellaswag) in enumerate(runs):
    color = f'C{i}'
    if iters:
        # log_interval > 1 logs every few iterations: each logged loss stands for the iterations since the last one,
        # so the average decays by smooth once per iteration, not once per line
        smoothed, ema, last = [], iters[0][1], iters[0][0]
        for it, loss in iters:
            decay = smooth ** (it - last)
            ema, last = decay * ema + (1 - decay) * loss, it
            smoothed.append(ema)
        ax_train.plot([s for s, _ in iters], smoothed, color=color, alpha=0.5, linewidth=1, label=f'{label} (iterations)')
    # the iterations trained: the last logged one's number + 1, or the last evaluation's step (it follows the last iteration)
    n_iters = max(iters[-1][0] + 1 if iters else 0, evals[-1][0] if evals else 0)
    summary = f"{label}: {n_iters} iterations ({len(iters)} logged)" if iters and len(iters) != n_iters else f"{label}: {n_iters} iterations"
    if evals:
        steps = [s for s, _ in evals]
        ax_train.plot(steps, [r['train_loss'] for _, r in evals], 'o-', color=color, markersize=3, label=f'{label} (evaluations)')
        ax_val.plot(steps, [r['val_loss'] for _, r in evals], 'o-', color=color, markersize=3, label=label)
        step, record = evals[-1]
        summary += f", {len(evals)} evaluations, last val loss {record['val_loss']:.4f} at step {step}"
    else:
        summary += ", no evaluations"
    if iters:
        summary += f", smoothed train loss {smoothed[-1]:.4f} at iter {iters[-1][0]}"
    if hellaswag:
        axes[2].plot([s for s, _ in hellaswag], [a for _, a in hellaswag], 'o-', color=color, markersize=3, label=label)
        summary += f", HellaSwag acc_norm {hellaswag[-1][1]:.4f} at step {hellaswag[-1][0]}"
    print(summary)

# horizontal reference lines, grey and dashed, named in the legend
loss_lines = ([('OpenAI GPT-2 124M', gpt2_val_loss)] if gpt2_val_loss else []) + parse_lines(loss_reference)
hellaswag_lines = ([('OpenAI GPT-2 124M', gpt2_hellaswag)] if gpt2_hellaswag else []) + parse_lines(reference)
styles = ['--', ':', '-.']
for j, (name, value) in enumerate(loss_lines):
    ax_val.axhline(value, color='0.4', linestyle=styles[j % 3], linewidth=1, label=f'{name}: {value:g}')
if with_hellaswag:
    for j, (name, value) in enumerate(hellaswag_lines):
        axes[2].axhline(value, color='0.4', linestyle=styles[j % 3], linewidth=1, label=f'{name}: {value:g}')
for ax, name, ylabel in zip(axes, ['train loss', 'val loss', 'HellaSwag acc_norm'], ['loss', 'loss', 'acc_norm']):
    ax.set_title(name)
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
if title:
    fig.suptitle(title)
fig.tight_layout()
os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
fig.savefig(out, dpi=120)
print(f"wrote {out}")
