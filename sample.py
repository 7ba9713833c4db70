"""
Sample from a trained model (out_dir/ckpt.pt), from OpenAI's GPT-2, or from a local GPT-2 in
Hugging Face format:
    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=5 --max_new_tokens=100
"""
import os
import sys

import tiktoken
import torch

import runtime
from model import GPT, load_checkpoint, load_meta

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (from out_dir), a GPT-2 variant ('gpt2', ..., 'gpt2-xl'), or a local Hugging Face GPT-2 directory
out_dir = 'out'  # ignored if init_from is not 'resume'
start = "\n"  # or "<|endoftext|>" or etc. Or "FILE:prompt.txt" to read the prompt from a file
num_samples = 10  # samples drawn together, in one batch
max_new_tokens = 500  # tokens generated in each sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random, 0 = greedy (always the most likely token)
top_k = 200  # keep only the top_k most likely tokens (None: all)
top_p = None  # nucleus sampling: keep the fewest tokens whose probability reaches top_p (None: all)
seed = 1337
device = 'auto'  # a CUDA GPU, else Apple's MPS, else the CPU; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # bfloat16 where the device has it, float16 on older GPUs, else float32; or one of those
compile = False  # use PyTorch 2.0 to compile the model to be faster
exec(open('configurator.py').read())  # overrides from command line or config file
for k in ('num_samples', 'max_new_tokens'):
    check(k, lambda v: v >= 1, 'an integer >= 1')
check('temperature', lambda v: v >= 0, 'a number >= 0 (0: always the most likely token)')
check('top_k', lambda v: v is None or v >= 1, 'an integer >= 1 (or None: no limit)')
check('top_p', lambda v: v is None or 0 < v <= 1, 'in (0, 1] (or None: no nucleus)')
check('dtype', lambda v: v in ('auto', 'float32', 'bfloat16', 'float16'), "one of 'auto', 'float32', 'bfloat16', 'float16'")
check('device', lambda v: v == 'auto' or torch.device(v).type in ('cpu', 'cuda', 'mps'), "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
# -----------------------------------------------------------------------------


def fail(msg):
    sys.exit(f"sample.py: {msg}")


def load_vocabulary(path, dataset):
    try:
        meta = load_meta(path)
    except ValueError as e:
        fail(str(e))
    stoi, itos = meta.get('stoi'), meta.get('itos')
    if not (isinstance(stoi, dict) and isinstance(itos, dict)
            and all(isinstance(s, str) and isinstance(i, int) for s, i in stoi.items())
            and all(isinstance(i, int) and isinstance(s, str) for i, s in itos.items())):
        fail(f"{path} has no 'stoi'/'itos' vocabulary of characters and ids: "
             f"re-create it with python data/{dataset}/prepare.py")
    return stoi, itos


torch.manual_seed(seed)
try:
    plan = runtime.setup(device, dtype, decoding=True)
except ValueError as e:
    fail(str(e))
device, device_type, ctx = plan['device'], plan['device_type'], plan['ctx']

# model
dataset = None  # the training data of a resumed checkpoint, for its vocabulary
if init_from == 'resume':
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        fail(f"no checkpoint {ckpt_path}: train a model first (python train.py ...), or pass --out_dir=<its directory>")
    try:
        model, checkpoint = load_checkpoint(ckpt_path, device)
    except ValueError as e:
        fail(str(e))
    dataset = (checkpoint.get('config') or {}).get('dataset')
elif init_from.startswith('gpt2') or os.path.isdir(init_from):
    try:
        model = GPT.from_pretrained(init_from, dict(dropout=0.0))
    except (OSError, ValueError) as e:
        fail(f"cannot load '{init_from}' ({str(e).splitlines()[0]})")
else:
    fail(f"init_from must be 'resume', a GPT-2 variant (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a "
         f"Hugging Face GPT-2 directory; '{init_from}' is none of these")
model.eval()
model.to(device)
if compile:
    model.compile(dynamic=True)  # in place, so generate's calls go through it; one graph for all lengths

# tokenizer: the dataset's characters when it has a meta.pkl, else GPT-2's BPE
meta_path = os.path.join('data', dataset, 'meta.pkl') if dataset else None
if init_from != 'resume' and os.path.isfile(os.path.join(init_from, 'meta.pkl')):
    meta_path = os.path.join(init_from, 'meta.pkl')  # a character-level model exported by export_hf.py
stop_token = None
if meta_path and os.path.exists(meta_path):
    print(f"Loading meta from {meta_path}...")
    stoi, itos = load_vocabulary(meta_path, dataset)

    def encode(s):
        missing = sorted(set(s) - set(stoi))
        if missing:
            fail(f"the prompt has characters outside the model's vocabulary ({meta_path}): "
                 f"{', '.join(repr(c) for c in missing)}")
        return [stoi[c] for c in s]

    def decode(ids):
        return ''.join(itos.get(i, '') for i in ids)
else:
    print("No meta.pkl found, assuming GPT-2 encodings...")
    enc = tiktoken.get_encoding("gpt2")
    stop_token = enc.eot_token  # <|endoftext|>: a sample ends there

    def encode(s):
        return enc.encode(s, allowed_special={"<|endoftext|>"})

    def decode(ids):
        return enc.decode([i for i in ids if i < enc.n_vocab])  # a padded vocabulary's extra ids are not text

# prompt
if start.startswith('FILE:'):
    prompt_path = start[5:]
    if not os.path.isfile(prompt_path):
        fail(f"no prompt file {prompt_path}")
    with open(prompt_path, 'r', encoding='utf-8') as f:
        start = f.read()
    if not start:
        fail(f"the prompt file {prompt_path} is empty: write a prompt in it")
if not start:
    fail("the prompt is empty: pass --start=<text> or --start=FILE:<path>")
start_ids = encode(start)
if max(start_ids) >= model.config.vocab_size:
    fail(f"the prompt has token ids up to {max(start_ids)} but the model's vocabulary has {model.config.vocab_size}")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...].repeat(num_samples, 1)

# run generation: all samples in one batch
with torch.inference_mode():
    with ctx:
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop_token=stop_token)
for row in y.tolist():
    new = row[len(start_ids):]
    if stop_token in new:
        new = new[:new.index(stop_token)]
    print(decode(row[:len(start_ids)] + new))
    print('---------------')
