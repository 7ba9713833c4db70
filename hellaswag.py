"""
HellaSwag validation accuracy, completion style, as the GPT-2 reproductions score it: the context
followed by each of the 4 endings goes through the model, the loss is taken over the ending's
tokens only, and the ending with the lowest loss is the answer. acc compares the summed losses,
acc_norm the loss per token (the figure usually quoted: GPT-2 124M gets acc_norm 0.2955).
    python hellaswag.py --init_from=gpt2
    python hellaswag.py --out_dir=out-gpt2 --limit=1000
train.py imports examples_for_training and evaluate_hellaswag to score its model during training.
"""
import json
import os
import sys
from contextlib import nullcontext

import torch
from torch.nn import functional as F
from tqdm import tqdm

import runtime
from configurator import fail, check
from files import load_checkpoint
from model import GPT, GPT2_VOCAB_SIZE


def download_hellaswag(path, url='https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'):
    """Fetch the validation set (10042 items) to path. Raises OSError when it cannot."""
    import urllib.request
    print(f"downloading {url} to {path}")
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    urllib.request.urlretrieve(url, path + '.tmp')
    os.replace(path + '.tmp', path)  # never a half-downloaded file under the real name


def load_hellaswag(path, limit=None):
    """The items of a HellaSwag jsonl file (keys ctx, endings, label), GPT-2 BPE encoded: dicts of
    ctx (tokens), endings (4 token lists, each the encoding of ' ' + ending) and label."""
    from data.token_bins import gpt2_encoding
    enc = gpt2_encoding()  # a one-line error when its files are neither cached nor downloadable
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a HellaSwag jsonl file (hellaswag_val.jsonl)")
    examples = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ctx, endings, label = item['ctx'], item['endings'], item['label']
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path} line {lineno} is not a HellaSwag item (JSON with ctx, endings, label)") from None
            if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
                raise ValueError(f"{path} line {lineno}: endings must be a list of 4 strings")
            if not isinstance(ctx, str) or type(label) not in (int, str) or str(label) not in ('0', '1', '2', '3'):
                raise ValueError(f"{path} line {lineno}: ctx must be a string and label 0, 1, 2 or 3 (got {label!r})")
            examples.append(dict(ctx=enc.encode(ctx), label=int(label), endings=[enc.encode(' ' + e) for e in endings]))
    return examples


def examples_for_training(path, master_process=True, ddp=False):
    """The items train.py scores every hellaswag_interval steps: the first process downloads the file when it
    is absent while the others wait, then every process reads it. Raises OSError or ValueError, saying the fix."""
    if master_process and not os.path.exists(path):
        try:
            download_hellaswag(path)
        except OSError as e:
            raise OSError(f"cannot download {path} ({e}): fetch hellaswag_val.jsonl from github.com/rowanz/hellaswag "
                          f"and pass --hellaswag_file=path/to/it, or set hellaswag_interval=0") from None
    if ddp:
        torch.distributed.barrier()  # the others wait for the download
    try:
        examples = load_hellaswag(path)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: point --hellaswag_file at hellaswag_val.jsonl") from None
    except (OSError, ValueError) as e:  # OSError: e.g. a machine that does not share the first process's disk
        raise ValueError(f"cannot read HellaSwag items ({e}): put {path} on every machine, or set hellaswag_interval=0") from None
    if not examples:
        raise ValueError(f"{path} holds no HellaSwag items: point --hellaswag_file at hellaswag_val.jsonl")
    return examples


@torch.no_grad()  # scoring only: no graph, whether called from train.py's loop or from here
def score_examples(model, examples, device, ctx=nullcontext(), max_len=None):
    """Summed loss over each ending's tokens, and their number: two (len(examples), 4) tensors.
    All candidates of the examples run as one batch, right-padded (padding is never a target).
    max_len: the longest sequence the model takes; default block_size with learned positions, else none."""
    if max_len is None and model.config.position == 'learned':
        max_len = model.config.block_size
    rows = []  # (tokens, is_ending) per candidate
    for ex in examples:
        for ending in ex['endings']:
            tokens, is_ending = ex['ctx'] + ending, [False] * len(ex['ctx']) + [True] * len(ending)
            if max_len is not None:  # too long for the model: crop the context from the left, keeping the ending
                tokens, is_ending = tokens[-max_len:], is_ending[-max_len:]
            rows.append((tokens, is_ending))
    T = max(len(tokens) for tokens, _ in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (tokens, is_ending) in enumerate(rows):
        idx[i, :len(tokens)] = torch.tensor(tokens)
        # position t predicts token t + 1; only ending tokens are scored
        targets[i, :len(tokens) - 1] = torch.tensor([t if e else -1 for t, e in zip(tokens[1:], is_ending[1:])])
    idx, targets = idx.to(device), targets.to(device)
    with ctx:
        logits, _ = model(idx, targets)  # with targets the model returns logits at every position
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction='none')
    sums = losses.view(len(rows), T).sum(1).view(-1, 4)
    counts = (targets != -1).sum(1).view(-1, 4)
    return sums.cpu(), counts.cpu()


@torch.no_grad()
def evaluate_hellaswag(model, examples, device, batch_size=4, ctx=nullcontext(), rank=0, world_size=1,
                       max_len=None, progress=False, all_processes=False):
    """(num_correct, num_correct_norm, num_total) over this rank's share of examples (every
    world_size-th one from rank): sum them over ranks for the whole set. batch_size: items per forward
    pass. model: the plain GPT (sharded in place by fsdp.py or not), not a DDP or compiled wrapper
    (every batch has a new length). all_processes: the sum over torchrun's processes instead of this rank's share."""
    mine = examples[rank::world_size]
    was_training = model.training
    model.eval()
    num_correct = num_correct_norm = 0
    bar = tqdm(total=len(mine), desc='hellaswag', unit='item', disable=not progress)
    # every rank runs the batches of the largest share (a shorter one scores a spare item that it does not
    # count): under FSDP every forward gathers parameters from all ranks
    for i in range(0, -(-len(examples) // world_size), batch_size):
        batch = mine[i:i + batch_size]
        sums, counts = score_examples(model, batch or examples[:1], device, ctx, max_len)
        if not batch:
            continue
        labels = torch.tensor([ex['label'] for ex in batch])
        num_correct += (sums.argmin(1) == labels).sum().item()
        num_correct_norm += ((sums / counts).argmin(1) == labels).sum().item()
        bar.set_postfix(acc_norm=f"{num_correct_norm / (i + len(batch)):.4f}", refresh=False)
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    if all_processes:  # under torchrun: the counts of every process's share, summed
        counts = torch.tensor([num_correct, num_correct_norm, len(mine)], device=device)
        torch.distributed.all_reduce(counts)
        return tuple(counts.tolist())
    return num_correct, num_correct_norm, len(mine)


def describe_hellaswag(scores):
    """'hellaswag acc 0.2500 (1/4), acc_norm 0.5000 (2/4)' for (num_correct, num_correct_norm, num_total)."""
    num_correct, num_correct_norm, num_total = scores
    return (f"hellaswag acc {num_correct / num_total:.4f} ({num_correct}/{num_total}), "
            f"acc_norm {num_correct_norm / num_total:.4f} ({num_correct_norm}/{num_total})")


if __name__ == '__main__':  # (train.py imports the functions above)
    # -----------------------------------------------------------------------------
    init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), a GPT-2 name ('gpt2', 'gpt2-medium', ...) or a local Hugging Face directory
    out_dir = 'out'
    hellaswag_file = os.path.join('data', 'hellaswag', 'hellaswag_val.jsonl')  # downloaded when absent
    limit = None  # score only the first limit items
    batch_size = 4  # items per forward pass, 4 candidates each
    device = 'auto'  # a CUDA GPU, else Apple's MPS, else the CPU; or 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype = 'auto'  # bfloat16 where the device has it, float16 on older GPUs, else float32 (which --dtype=float32 forces)
    if any(arg.startswith('--file=') for arg in sys.argv[1:]):  # the setting's name before it became train.py's
        fail("--file is now --hellaswag_file (as in train.py): pass --hellaswag_file=path/to/hellaswag_val.jsonl")
    exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())
    check('batch_size', lambda v: v >= 1, 'an integer >= 1')
    check('limit', lambda v: v is None or v >= 1, 'an integer >= 1 (or None: all items)')
    # -----------------------------------------------------------------------------
    try:
        plan = runtime.setup(device, dtype)
    except ValueError as e:
        fail(e)
    if init_from == 'resume':
        try:
            model, checkpoint = load_checkpoint(out_dir)
        except ValueError as e:
            fail(e)
        name = out_dir
    else:
        try:
            model = GPT.from_pretrained(init_from)
        except (OSError, ValueError) as e:
            fail(f"cannot load {init_from!r}: {str(e).strip().splitlines()[0]}")
        name = init_from
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        fail(f"{name} has a vocabulary of {model.config.vocab_size} tokens; HellaSwag needs a model of GPT-2's BPE "
             f"tokens (vocab_size >= {GPT2_VOCAB_SIZE}), not a character-level one")
    model.to(plan.device)

    if not os.path.exists(hellaswag_file):
        try:
            download_hellaswag(hellaswag_file)
        except OSError as e:
            fail(f"cannot download {hellaswag_file} ({e}); fetch hellaswag_val.jsonl from github.com/rowanz/hellaswag "
                 f"by hand and pass --hellaswag_file=path/to/it")
    try:
        examples = load_hellaswag(hellaswag_file, limit)
    except UnicodeDecodeError:
        fail(f"{hellaswag_file} is not UTF-8 text: point --hellaswag_file at hellaswag_val.jsonl")
    except (OSError, ValueError) as e:
        fail(e)
    if not examples:
        fail(f"no items to score in {hellaswag_file} (limit={limit})")

    num_correct, num_correct_norm, num_total = evaluate_hellaswag(model, examples, plan.device, batch_size, plan.ctx,
                                                                  progress=True)
    print(f"hellaswag {name}: {num_total} items, acc {num_correct / num_total:.4f} ({num_correct}/{num_total}), "
          f"acc_norm {num_correct_norm / num_total:.4f} ({num_correct_norm}/{num_total})")
