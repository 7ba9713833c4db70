"""
Writes pretrained_embeddings.pt, the token embedding matrix that train.py --pretrained_embeddings=True starts from: a
float tensor [50257, D], one row per GPT-2 token id. Either the wte of a GPT-2 model through
transformers (--model gpt2, or a local Hugging Face directory), or vectors from a word-vector text
file in GloVe format, one 'word v1 ... vD' per line (--glove glove.840B.300d.txt). GloVe words are
matched to each GPT-2 token's string with its leading space stripped, exactly first, else case-folded;
tokens with no match get random rows of the same per-dimension mean and spread. train.py maps D to
n_embd and rescales to the model's init std (model.fit_pretrained_embeddings).
"""
import argparse
import itertools
import os
import sys

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [root, os.path.join(root, 'data')]
from configurator import fail  # noqa: E402
from token_bins import gpt2_encoding  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
source = parser.add_mutually_exclusive_group(required=True)
source.add_argument('--model', help="a GPT-2 model name (gpt2, gpt2-medium, ...) or a local Hugging Face directory")
source.add_argument('--glove', help="a word-vector text file: 'word v1 ... vD' per line")
parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pretrained_embeddings.pt'),
                    help="where to write; train.py reads data/<dataset>/pretrained_embeddings.pt")
parser.add_argument('--seed', type=int, default=1337, help="seed of the random rows for unknown tokens")
args = parser.parse_args()
if not args.out or os.path.isdir(args.out):
    fail(f"--out={args.out!r} is not a file name, e.g. data/openwebtext/pretrained_embeddings.pt")

import numpy as np  # after the arguments: --help stays quick
import torch

enc = gpt2_encoding()
vocab_size = enc.n_vocab  # 50257
if args.model:
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    except (OSError, ValueError) as e:  # ValueError: a folder that holds no causal language model
        where = "the local folder" if os.path.isdir(args.model) else "no local folder, nor the Hugging Face model"
        fail(f"cannot load {args.model}: {where} ({str(e).splitlines()[0]})")
    wte = model.get_input_embeddings().weight.detach()
    if wte.size(0) < vocab_size:
        fail(f"{args.model} has {wte.size(0):,} token embeddings, fewer than GPT-2's {vocab_size:,}: "
             f"not a GPT-2 vocabulary")
    emb = wte[:vocab_size].float()
    print(f"took all {vocab_size:,} rows of {args.model}'s token embeddings (width {emb.size(1)})")
else:
    if not os.path.isfile(args.glove):
        fail(f"no file {args.glove}")
    # GPT-2 token strings, e.g. ' The' -> 'The'; tokens that are partial UTF-8 characters have none
    exact_ids, folded_ids = {}, {}
    for i in range(vocab_size):
        try:
            word = enc.decode_single_token_bytes(i).decode('utf-8').lstrip(' ')
        except UnicodeDecodeError:
            continue
        if word:
            exact_ids.setdefault(word, []).append(i)
            folded_ids.setdefault(word.casefold(), []).append(i)
    match = np.zeros(vocab_size, dtype=np.int8)  # 0: no match, 1: case-folded, 2: exact
    with open(args.glove, encoding='utf-8', errors='replace') as f:
        first = f.readline().rstrip().split(' ')
        header = len(first) == 2 and all(x.isdigit() for x in first)  # word2vec's: word count and width
        dim = int(first[1]) if header else len(first) - 1
        lines = f if header else itertools.chain([' '.join(first)], f)
        if dim < 1:
            fail(f"{args.glove} does not look like word vectors: expected 'word v1 ... vD' per line")
        vectors = torch.zeros(vocab_size, dim)
        for line_no, line in enumerate(lines, 2 if header else 1):
            parts = line.rstrip().rsplit(' ', dim)  # the word itself may hold spaces (GloVe 840B has some)
            ids, ids_folded = exact_ids.get(parts[0], []), folded_ids.get(parts[0].casefold(), [])
            if not ids and not ids_folded:
                continue
            try:
                vector = torch.tensor([float(x) for x in parts[1:]])
            except ValueError:  # a word among the numbers
                vector = torch.zeros(0)
            if len(vector) != dim:
                fail(f"{args.glove}, line {line_no}: expected a word and {dim} numbers")
            for i in ids:
                if match[i] < 2:  # the first exact match wins
                    vectors[i], match[i] = vector, 2
            for i in ids_folded:
                if match[i] == 0:  # the first case-folded match, until an exact one comes
                    vectors[i], match[i] = vector, 1
    found = torch.from_numpy(match > 0)
    n_exact, n_folded = int((match == 2).sum()), int((match == 1).sum())
    if n_exact + n_folded == 0:
        fail(f"no GPT-2 token found in {args.glove}: is it a word-vector text file ('word v1 ... vD' per line)?")
    g = torch.Generator().manual_seed(args.seed)
    mean = vectors[found].mean(0)
    std = vectors[found].std(0) if found.sum() > 1 else torch.ones(dim)
    vectors[~found] = mean + std * torch.randn(int((~found).sum()), dim, generator=g)
    emb = vectors
    print(f"found {n_exact + n_folded:,} of {vocab_size:,} GPT-2 tokens in {args.glove}: {n_exact:,} exactly, "
          f"{n_folded:,} after case folding; the other {vocab_size - n_exact - n_folded:,} get random rows")

os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
torch.save(emb.contiguous(), args.out + '.tmp')
os.replace(args.out + '.tmp', args.out)
print(f"wrote {args.out}: {list(emb.shape)}")
