"""
Exports a checkpoint of train.py (out_dir/ckpt.pt) as a Hugging Face GPT-2 directory, for transformers,
the Hub, or the lm-evaluation-harness:
    python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-shakespeare
It holds config.json, model.safetensors (float32) and, for GPT-2 BPE models, GPT-2's tokenizer (vocab.json,
merges.txt, tokenizer.json), rebuilt offline from tiktoken's 'gpt2' encoding. A character-level model's
vocabulary is its dataset's meta.pkl, copied beside the weights. bias=False models get zero biases.
The files are written to a temporary directory beside hf_dir and renamed to hf_dir when complete.
"""
import glob
import json
import os
import pickle
import shutil
import tempfile

import torch

from configurator import fail, check
from files import load_checkpoint, os_error_text, run_vocabulary
from model import CONV1D_WEIGHTS, GPT2_VOCAB_SIZE

# -----------------------------------------------------------------------------
out_dir = 'out'  # the training run: its ckpt.pt is exported
hf_dir = 'hf'  # the Hugging Face directory to write
overwrite = False  # replace an existing hf_dir
exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())  # overrides from the command line or a config file
check('out_dir', lambda v: v != '', "a training run's directory, e.g. 'out-shakespeare'")
check('hf_dir', lambda v: v != '' and os.path.abspath(v) not in (os.getcwd(), os.path.abspath(out_dir)),
      "a new directory, other than out_dir and '.', e.g. 'hf-shakespeare'")
# -----------------------------------------------------------------------------
# what an export holds: a directory with other files is not replaced (they would be lost)
EXPORT_FILES = {'config.json', 'generation_config.json', 'model.safetensors', 'meta.pkl', 'vocab.json', 'merges.txt',
                'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json'}


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def bytes_to_unicode():
    """GPT-2's map of the 256 byte values to printable characters, in which its vocab.json and merges.txt
    spell tokens: printable Latin-1 bytes stand for themselves, the others for chr(256), chr(257), ..."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def write_gpt2_tokenizer(directory, model_max_length):
    """vocab.json and merges.txt rebuilt from tiktoken's 'gpt2' encoding (no download: it is the encoding the
    prepare scripts use), then saved through transformers' GPT2TokenizerFast, which adds tokenizer.json and
    the special tokens. Token i's merge is the last step of BPE on its own bytes with the tokens below i."""
    from transformers import GPT2TokenizerFast
    from data.token_bins import gpt2_encoding
    enc = gpt2_encoding()
    byte_char = bytes_to_unicode()
    tokens = [enc.decode_single_token_bytes(i) for i in range(enc.eot_token)]
    rank = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, token in enumerate(tokens):
        if len(token) == 1:
            continue
        parts = [token[j:j + 1] for j in range(len(token))]
        while len(parts) > 2:  # merge the adjacent pair of lowest rank below i, as BPE does, until two are left
            j = min(range(len(parts) - 1), key=lambda j: rank.get(parts[j] + parts[j + 1], len(tokens)))
            if rank.get(parts[j] + parts[j + 1], len(tokens)) >= i:
                fail(f"cannot rebuild GPT-2's merges from tiktoken: token {i} is no merge of lower tokens")
            parts[j:j + 2] = [parts[j] + parts[j + 1]]
        merges.append(' '.join(''.join(byte_char[b] for b in part) for part in parts))
    vocab = {''.join(byte_char[b] for b in t): i for i, t in enumerate(tokens)}
    vocab['<|endoftext|>'] = enc.eot_token
    with open(os.path.join(directory, 'vocab.json'), 'w', encoding='utf-8') as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, 'merges.txt'), 'w', encoding='utf-8') as f:
        f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
    tokenizer = GPT2TokenizerFast.from_pretrained(directory, model_max_length=model_max_length)  # reads the two files
    tokenizer.save_pretrained(directory)


ckpt_path = os.path.join(out_dir, 'ckpt.pt')
parent = os.path.dirname(os.path.abspath(hf_dir))
# a killed export's leftovers go first: an -old folder put back is then the hf_dir that --overwrite decides about
prefix = os.path.join(parent, os.path.basename(os.path.abspath(hf_dir)) + '.tmp-')
for leftover in sorted(glob.glob(glob.escape(prefix) + '*')):
    if leftover.endswith('-old') and not os.path.exists(hf_dir):  # stopped between its two renames: the old one back
        os.rename(leftover, hf_dir)
        print(f"put {leftover} back as {hf_dir} (an export was stopped while replacing it)")
        continue
    shutil.rmtree(leftover, ignore_errors=True)
    print(f"removed {leftover} (left by an export that was stopped)")
if os.path.exists(hf_dir) and not overwrite:
    fail(f"{hf_dir} already exists: pass --overwrite=True to replace it, or another --hf_dir")
if os.path.exists(hf_dir) and not os.path.isfile(os.path.join(hf_dir, 'config.json')):
    fail(f"{hf_dir} exists and holds no config.json: not an exported model, so it is not replaced; pass another --hf_dir")
if os.path.isdir(hf_dir) and (others := sorted(set(os.listdir(hf_dir)) - EXPORT_FILES)):
    fail(f"{hf_dir} holds files an export does not write ({', '.join(others[:5])}): move them out first, "
         f"or pass another --hf_dir; --overwrite=True replaces only an export's own files")
try:
    ancestor = parent
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):  # makedirs would say 'file exists'
        raise NotADirectoryError(20, 'not a directory')
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(13, 'not writable')
except OSError as e:
    fail(f"cannot write {hf_dir}: {os_error_text(e)} ({ancestor if isinstance(e, NotADirectoryError) else parent}); "
         f"pass another --hf_dir")
try:
    model, checkpoint = load_checkpoint(out_dir)
except ValueError as e:
    fail(e)
c = model.config
if c.position != 'learned':
    fail(f"{ckpt_path} is a position='{c.position}' model, and GPT-2 (Hugging Face's GPT2LMHeadModel) has only learned "
         f"positions: it cannot be exported as GPT-2 (only position='learned' models can)")
try:
    meta, meta_path, from_file = run_vocabulary(checkpoint, ckpt_path)
except ValueError as e:
    fail(e)
vocab_source = meta_path if from_file else f"the vocabulary recorded in {ckpt_path}"
char_level = meta is not None
if not char_level and c.vocab_size < GPT2_VOCAB_SIZE:
    fail(f"vocab_size={c.vocab_size} is smaller than GPT-2's {GPT2_VOCAB_SIZE} but there is no {meta_path or 'meta.pkl'} "
         f"for its vocabulary: run from the repository the model was trained in")

from transformers import GPT2Config, GPT2LMHeadModel

hf_config = GPT2Config(
    vocab_size=c.vocab_size, n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
    n_head=c.n_head, activation_function='gelu_new' if c.gelu == 'tanh' else 'gelu', layer_norm_epsilon=1e-5,
    resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=True,
    bos_token_id=None if char_level else GPT2_VOCAB_SIZE - 1, eos_token_id=None if char_level else GPT2_VOCAB_SIZE - 1,
    architectures=['GPT2LMHeadModel'])
hf_model = GPT2LMHeadModel(hf_config)
ours = model.state_dict()
hf_state = {}
for k, v in hf_model.state_dict().items():
    if k.endswith(('.attn.bias', '.attn.masked_bias')):  # causal-mask buffers of older transformers
        continue
    if k in ours:
        hf_state[k] = ours[k].t() if k.endswith(CONV1D_WEIGHTS) else ours[k]
    elif k.endswith('.bias') and not c.bias:
        hf_state[k] = torch.zeros_like(v)  # GPT-2 has the biases that a bias=False model lacks: zero adds nothing
    else:
        fail(f"{ckpt_path} has no {k}, which GPT-2 needs")
hf_model.load_state_dict(hf_state, strict=False)

# everything into a temporary directory beside hf_dir, renamed when complete
tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(prefix), dir=parent)
os.chmod(tmp_dir, 0o777 & ~current_umask())  # mkdtemp makes it 0700: the export gets the user's usual permissions
try:
    hf_model.save_pretrained(tmp_dir, safe_serialization=True)
    if char_level:
        with open(os.path.join(tmp_dir, 'meta.pkl'), 'wb') as f:
            pickle.dump(meta, f)
    else:
        write_gpt2_tokenizer(tmp_dir, c.block_size)
    for name in os.listdir(tmp_dir):  # save_pretrained may write some files 0600: as the umask says instead
        os.chmod(os.path.join(tmp_dir, name), 0o666 & ~current_umask())
    if os.path.exists(hf_dir):  # overwrite=True: the old one goes aside, the new one in, then the old is removed
        old_dir = tmp_dir + '-old'
        os.rename(hf_dir, old_dir)
        os.rename(tmp_dir, hf_dir)
        shutil.rmtree(old_dir)
    else:
        os.rename(tmp_dir, hf_dir)
except OSError as e:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    fail(f"cannot write {hf_dir}: {os_error_text(e)}; nothing was changed there")
except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
print(f"wrote {hf_dir}: GPT-2 of {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, block_size {c.block_size}, "
      f"vocab_size {c.vocab_size}{'' if c.bias else ' (bias=False: zero biases)'}")
if char_level:
    print(f"the vocabulary is {vocab_source} (copied to {hf_dir}/meta.pkl), characters, not a Hugging Face tokenizer")
else:
    print(f"tokenizer: GPT-2's BPE ({GPT2_VOCAB_SIZE} tokens{'; the model has padded rows past them' if c.vocab_size > GPT2_VOCAB_SIZE else ''})")
