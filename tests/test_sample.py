import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(seed=0, **kw):
    args = dict(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
    args.update(kw)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**args)).eval()


def nanogpt_greedy(model, idx, steps):
    """nanoGPT's loop: re-run the (cropped) context for every new token."""
    for _ in range(steps):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


# ----------------------------------------------------------------------------- KV-cache generation

@pytest.mark.parametrize('alibi', [False, True])
@pytest.mark.parametrize('flash', [False, True])
@pytest.mark.parametrize('prompt_len,steps', [(3, 10), (3, 40), (20, 5)])  # inside, past, and a prompt past block_size
def test_cached_greedy_is_nanogpts_loop(alibi, flash, prompt_len, steps):
    model = tiny_model(alibi=alibi, flash_attn=flash)
    idx = torch.randint(0, 50, (2, prompt_len))
    cached = model.generate(idx, steps, top_k=1)
    assert cached.shape == (2, prompt_len + steps)
    assert torch.equal(cached, model.generate(idx, steps, top_k=1, use_cache=False))
    assert torch.equal(cached, nanogpt_greedy(model, idx, steps))


@pytest.mark.parametrize('alibi', [False, True])
def test_cached_sampling_draws_the_same_tokens(alibi):
    model = tiny_model(alibi=alibi)
    idx = torch.randint(0, 50, (3, 2))
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        outs.append(model.generate(idx, 30, temperature=1.5, top_k=20, top_p=0.9, use_cache=use_cache))
    assert torch.equal(*outs)
    assert len(set(outs[0][0, 2:].tolist())) > 3  # really sampled, not a constant


def test_matvec_layout_changes_storage_not_results():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 5))
    before = model.generate(idx, 8, top_k=1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.use_matvec_layout()
    assert not model.transformer.h[0].mlp.c_fc.weight.is_contiguous()  # (128, 32): stored transposed
    assert model.transformer.h[0].mlp.c_proj.weight.is_contiguous()  # (32, 128): kept
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.generate(idx, 8, top_k=1), before)


@pytest.mark.parametrize('flash', [False, True])
def test_kv_cache_is_preallocated_once(flash):
    model = tiny_model(flash_attn=flash)
    kv_cache = [[] for _ in model.transformer.h]
    idx = torch.randint(0, 50, (1, 16))
    model(idx[:, :4], kv_cache=kv_cache)
    k0 = kv_cache[0][0]
    assert k0.shape == (1, 4, 16, 8)  # room for the whole context from the start
    for pos in range(4, 16):
        logits, _ = model(idx[:, pos:pos + 1], kv_cache=kv_cache, pos=pos)
        assert kv_cache[0][0] is k0  # written in place, never re-made or concatenated
        assert torch.allclose(logits, model(idx[:, :pos + 1])[0], atol=1e-5)


def test_top_p_keeps_the_smallest_set_reaching_p():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 3))
    # top_p so small that only the most likely token survives: greedy
    assert torch.equal(model.generate(idx, 10, top_p=1e-6), model.generate(idx, 10, top_k=1))
    # with top_p=0.5 every drawn token is among those the nucleus allows
    torch.manual_seed(1)
    out = model.generate(idx, 12, top_p=0.5, temperature=3.0)
    for t in range(3, 15):
        probs = torch.softmax(model(out[:, :t])[0][:, -1] / 3.0, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        for b in range(2):
            rank = (order[b] == out[b, t]).nonzero().item()
            assert before[b, rank] < 0.5 + 1e-6


def test_generation_stops_once_every_row_has_the_stop_token():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 3))
    greedy = model.generate(idx, 12, top_k=1)
    stop = greedy[0, 5].item()  # row 0 produces it by its third new token

    def length_up_to_stop(row):
        hits = (row[3:] == stop).nonzero()
        return hits[0].item() + 4 if len(hits) else 15
    expected = max(length_up_to_stop(greedy[b]) for b in range(2))
    out = model.generate(idx, 12, top_k=1, stop_token=stop)
    assert torch.equal(out, greedy[:, :expected])
    one_row = model.generate(idx[:1], 12, top_k=1, stop_token=stop)
    assert torch.equal(one_row, greedy[:1, :length_up_to_stop(greedy[0])])
