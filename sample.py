"""
Sample from a trained model (out_dir/ckpt.pt), from OpenAI's GPT-2, or from a local GPT-2 in
Hugging Face format:
    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=5 --max_new_tokens=100
"""
import os

import torch

import cpu
import runtime
from configurator import fail, check
from data.token_bins import gpt2_encoding
from files import load_checkpoint, run_vocabulary
from model import GPT, GPT2_VOCAB_SIZE

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
exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())  # overrides from command line or config file
for k in ('num_samples', 'max_new_tokens'):
    check(k, lambda v: v >= 1, 'an integer >= 1')
check('temperature', lambda v: v >= 0, 'a number >= 0 (0: always the most likely token)')
check('top_k', lambda v: v is None or v >= 1, 'an integer >= 1 (or None: no limit)')
check('top_p', lambda v: v is None or 0 < v <= 1, 'in (0, 1] (or None: no nucleus)')
# -----------------------------------------------------------------------------


def vocabulary(meta, path):
    """The stoi and itos maps of a character-level vocabulary (meta.pkl's), or a one-line error."""
    stoi, itos = meta.get('stoi'), meta.get('itos')
    if not (isinstance(stoi, dict) and isinstance(itos, dict)
            and all(isinstance(s, str) and isinstance(i, int) for s, i in stoi.items())
            and all(isinstance(i, int) and isinstance(s, str) for i, s in itos.items())):
        fail(f"{path} has no 'stoi'/'itos' vocabulary of characters and ids: re-create it with the dataset's prepare.py")
    return stoi, itos


torch.manual_seed(seed)
try:
    plan = runtime.setup(device, dtype, decoding=True)
except ValueError as e:
    fail(e)
device, device_type, ctx = plan.device, plan.device_type, plan.ctx

# model
checkpoint = {}
if init_from == 'resume':
    try:
        model, checkpoint = load_checkpoint(out_dir, device)
    except ValueError as e:
        fail(e)
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
if device_type == 'cpu':
    cpu.speed_up(model, training=False)  # batched products for decoding (cpu.py)
if compile:
    model.compile(dynamic=True)  # in place, so generate's calls go through it; one graph for all lengths

# tokenizer: a character-level model's vocabulary (its dataset's meta.pkl, or the one its checkpoint records),
# else GPT-2's BPE
try:  # an exported character-level model has its meta.pkl beside the weights (export_hf.py)
    meta, meta_path, from_file = run_vocabulary(checkpoint, os.path.join(out_dir, 'ckpt.pt'),
                                                None if init_from == 'resume' else os.path.join(init_from, 'meta.pkl'))
except ValueError as e:
    fail(e)
if from_file:
    print(f"Loading meta from {meta_path}...")
elif meta:
    print(f"{meta_path or 'meta.pkl'} is missing: decoding with the vocabulary recorded in the checkpoint")
elif model.config.vocab_size < GPT2_VOCAB_SIZE:
    fail(f"the model has a vocabulary of {model.config.vocab_size} tokens, not GPT-2's BPE, and there is no "
         f"{meta_path or 'meta.pkl'} to decode it with: re-create it with the dataset's prepare.py")
stop_token = None
if meta:
    stoi, itos = vocabulary(meta, meta_path)

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
    enc = gpt2_encoding()  # a one-line error when its files are neither cached nor downloadable
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
    try:
        with open(prompt_path, 'r', encoding='utf-8') as f:
            start = f.read()
    except UnicodeDecodeError as e:
        fail(f"the prompt file {prompt_path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it, "
             f"e.g. iconv -f latin1 -t utf-8 {prompt_path}")
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
