import math

import pytest
import torch

import torch.nn.functional as F

import loss as loss_module
from loss import chunked_cross_entropy, loss_and_grads_by_chunks
from model import GPT, GPTConfig, alibi_slopes, apply_rope, clean_state_dict, fit_pretrained_embeddings, rope_cos_sin


def tiny_config(**kw):
    args = dict(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
    args.update(kw)
    return GPTConfig(**args)


def twin_models(**kw):
    """The same weights with flash attention on and off."""
    torch.manual_seed(0)
    flash = GPT(tiny_config(flash_attn=True, **kw))
    explicit = GPT(tiny_config(flash_attn=False, **kw))
    explicit.load_state_dict(flash.state_dict())
    return flash, explicit


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
    """A random GPT-2 in Hugging Face format, saved locally (no download)."""
    from conftest import save_hf_gpt2
    return save_hf_gpt2(tmp_path_factory.mktemp('hf_gpt2'), vocab_size=211, n_positions=64, n_embd=48, n_layer=3, n_head=4)


def hf_logits(path, idx):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        return hf(idx).logits


def test_parameter_names_match_nanogpt():
    model = GPT(tiny_config(n_layer=1))
    names = set(model.state_dict())
    for name in ['transformer.wte.weight', 'transformer.wpe.weight', 'transformer.h.0.ln_1.weight',
                 'transformer.h.0.attn.c_attn.weight', 'transformer.h.0.attn.c_proj.bias',
                 'transformer.h.0.ln_2.bias', 'transformer.h.0.mlp.c_fc.weight',
                 'transformer.h.0.mlp.c_proj.weight', 'transformer.ln_f.weight', 'lm_head.weight']:
        assert name in names
    assert model.lm_head.weight is model.transformer.wte.weight
    assert 'transformer.wpe.weight' not in GPT(tiny_config(alibi=True)).state_dict()


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=8, n_embd=128))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.001


@pytest.mark.slow
def test_from_pretrained_local_dir_matches_hugging_face(hf_dir):
    idx = torch.randint(0, 211, (2, 40))
    model = GPT.from_pretrained(str(hf_dir)).eval()
    assert model.config.block_size == 64 and model.config.vocab_size == 211
    logits, _ = model(idx, idx)  # with targets: logits at every position
    assert (logits - hf_logits(hf_dir, idx)).abs().max().item() < 2e-5


def test_from_pretrained_by_name_goes_through_transformers(hf_dir, monkeypatch):
    import transformers
    real = transformers.GPT2LMHeadModel.from_pretrained
    asked = []

    def fake_download(name, *args, **kwargs):
        asked.append(name)
        return real(hf_dir)
    monkeypatch.setattr(transformers.GPT2LMHeadModel, 'from_pretrained', fake_download)
    model = GPT.from_pretrained('gpt2', override_args={'dropout': 0.1})
    monkeypatch.undo()
    assert asked == ['gpt2'] and model.config.dropout == 0.1
    idx = torch.randint(0, 211, (1, 64))
    logits, _ = model.eval()(idx, idx)
    assert (logits - hf_logits(hf_dir, idx)).abs().max().item() < 2e-5


def test_from_pretrained_rejects_other_overrides(hf_dir):
    with pytest.raises(ValueError, match="only override 'dropout'.*n_layer"):
        GPT.from_pretrained(str(hf_dir), override_args={'n_layer': 2})


@pytest.mark.parametrize('position', ['learned', 'alibi', 'rope', 'none'])
def test_flash_equals_explicit_attention(position):
    flash, explicit = twin_models(position=position)
    idx = torch.randint(0, 96, (3, 32))
    a, loss_a = flash.eval()(idx, idx)
    b, loss_b = explicit.eval()(idx, idx)
    assert (a - b).abs().max().item() <= 1e-5
    assert abs(loss_a.item() - loss_b.item()) <= 1e-5
    # and the gradients agree too
    loss_a.backward()
    loss_b.backward()
    for (name, p), q in zip(flash.named_parameters(), explicit.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize('flash', [False, True])
def test_attention_dropout_is_applied_in_training(flash):
    torch.manual_seed(0)
    model = GPT(tiny_config(flash_attn=flash, dropout=0.5))
    attn = model.transformer.h[0].attn
    attn.resid_dropout.p = 0.0  # isolate attention-probability dropout
    x = torch.randn(2, 16, 32)
    attn.train()
    torch.manual_seed(1)
    y1 = attn(x, model.attention_bias(16, 16, x.device, x.dtype))
    torch.manual_seed(2)
    y2 = attn(x, model.attention_bias(16, 16, x.device, x.dtype))
    assert (y1 - y2).abs().max().item() > 1e-3
    attn.eval()
    e1 = attn(x, model.attention_bias(16, 16, x.device, x.dtype))
    e2 = attn(x, model.attention_bias(16, 16, x.device, x.dtype))
    assert torch.equal(e1, e2)


@pytest.mark.parametrize('position', ['learned', 'alibi', 'rope', 'none'])
def test_flash_attn_picks_the_kernel_and_both_train(position, monkeypatch):
    """flash_attn=True goes through sdpa, under autocast too; False through the explicit products; the losses agree."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    idx = torch.randint(0, 96, (3, 32))
    losses = {}
    for flash in (True, False):
        torch.manual_seed(0)
        model = GPT(tiny_config(flash_attn=flash, position=position))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            _, losses[flash] = model(idx, idx)
        assert len(calls) == 2  # the two layers through sdpa with flash_attn=True, and none more without
        losses[flash].backward()
        assert all(p.grad is not None for p in model.parameters())
    assert abs(losses[True].item() - losses[False].item()) < 2e-2  # bfloat16 rounding apart


def test_alibi_slopes_follow_press_et_al():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.allclose(alibi_slopes(4), torch.tensor([2.0 ** (-2 * (i + 1)) for i in range(4)]))
    # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads
    s16 = [2.0 ** (-0.5 * (i + 1)) for i in range(16)]
    expected = [2.0 ** -(i + 1) for i in range(8)] + s16[0::2][:4]
    assert torch.allclose(alibi_slopes(12), torch.tensor(expected))


def test_alibi_bias_is_causal_linear_distance_penalty():
    model = GPT(tiny_config(alibi=True, n_head=2))
    bias = model.attention_bias(4, 4, torch.device('cpu'), torch.float32)
    slope = alibi_slopes(2)[1].item()
    assert bias.shape == (2, 4, 4)
    assert bias[1, 3, 0].item() == pytest.approx(-3 * slope)
    assert bias[1, 2, 2].item() == 0.0
    assert bias[0, 0, 1].item() == float('-inf')
    # one cached tensor, sliced for shorter lengths: no per-call or per-batch copies
    again = model.attention_bias(3, 3, torch.device('cpu'), torch.float32)
    assert again.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()


@pytest.mark.parametrize('flash', [False, True])
def test_alibi_evaluates_beyond_block_size(flash):
    torch.manual_seed(0)
    model = GPT(tiny_config(alibi=True, flash_attn=flash)).eval()
    for T in (64, 128):  # 2x and 4x block_size
        idx = torch.randint(0, 96, (2, T))
        logits, loss = model(idx, idx)
        assert logits.shape == (2, T, 96) and torch.isfinite(loss)
        assert abs(loss.item() - math.log(96)) < 1.0  # an untrained model: near uniform


def test_alibi_long_context_agrees_between_flash_and_explicit():
    flash, explicit = twin_models(alibi=True)
    idx = torch.randint(0, 96, (2, 128))
    assert (flash.eval()(idx, idx)[0] - explicit.eval()(idx, idx)[0]).abs().max().item() <= 1e-5


def test_learned_positions_refuse_longer_than_block_size():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="block_size is only 32.*position='rope', 'alibi' or 'none'"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize('position', ['alibi', 'rope', 'none'])
def test_schemes_without_a_table_evaluate_at_4x_block_size_alike_in_both_kernels(position):
    flash, explicit = twin_models(position=position)
    idx = torch.randint(0, 96, (2, 128))
    a, loss = flash.eval()(idx, idx)
    assert torch.isfinite(loss) and abs(loss.item() - math.log(96)) < 1.0  # untrained: near uniform
    assert (a - explicit.eval()(idx, idx)[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize('pos', [0, 37])
@pytest.mark.parametrize('base', [10000.0, 500000.0])
def test_rope_equals_transformers_llama_rotary_embedding(pos, base):
    """Our rotation of q and k against transformers' own (LlamaRotaryEmbedding and apply_rotary_pos_emb, the
    same half-split convention), at positions offset as in decoding with a KV cache."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    torch.manual_seed(0)
    B, nh, T, hs = 2, 3, 50, 16
    q, k = torch.randn(B, nh, T, hs), torch.randn(B, nh, T, hs)
    hf_config = LlamaConfig(hidden_size=nh * hs, num_attention_heads=nh, max_position_embeddings=1024,
                            rope_parameters={'rope_type': 'default', 'rope_theta': base})
    positions = torch.arange(pos, pos + T)[None].expand(B, T)
    cos, sin = LlamaRotaryEmbedding(hf_config)(q, positions)  # (B, T, hs) each
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    ours = rope_cos_sin(pos, T, hs, base, q.device)
    torch.testing.assert_close(apply_rope(q, *ours), q_hf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, *ours), k_hf, rtol=1e-6, atol=1e-6)
    # what RoPE is for: a query-key score that depends on the distance only, not on where the pair sits
    far = rope_cos_sin(pos + 500, T, hs, base, q.device)
    torch.testing.assert_close(apply_rope(q, *ours) @ apply_rope(k, *ours).transpose(-2, -1),
                               apply_rope(q, *far) @ apply_rope(k, *far).transpose(-2, -1), rtol=1e-4, atol=1e-4)


def test_position_setting_and_the_older_alibi_switch():
    assert GPTConfig(alibi=True).position == 'alibi' and GPTConfig(position='alibi').alibi
    assert not GPTConfig(position='rope').alibi and GPTConfig().position == 'learned'
    # an older checkpoint's model_args (alibi, no position) give the same model, without a position table
    old = GPT(tiny_config(alibi=True))
    assert 'transformer.wpe.weight' not in old.state_dict() and old.config.position == 'alibi'
    for position in ('rope', 'none'):
        assert not any('wpe' in k for k in GPT(tiny_config(position=position)).state_dict())
    with pytest.raises(ValueError, match="alibi=True and position='rope' disagree"):
        GPTConfig(alibi=True, position='rope')
    with pytest.raises(ValueError, match="position='rotary' is not 'learned', 'alibi', 'rope' or 'none'"):
        GPTConfig(position='rotary')


def test_pretrained_embeddings_are_what_the_model_computes_with():
    torch.manual_seed(0)
    emb = torch.randn(90, 32)  # 90 real tokens, padded vocab of 96
    model = GPT(tiny_config(), pretrained_embeddings=emb)
    wte, head = model.transformer.wte, model.lm_head
    assert torch.equal(wte.weight[:90], emb) and wte.weight is head.weight
    # the embedding the first layer sees is the loaded row (plus its position embedding)
    idx = torch.tensor([[5, 7]])
    seen = {}
    hook = model.transformer.drop.register_forward_hook(lambda m, i, o: seen.update(x=o))
    model.eval()(idx)
    hook.remove()
    assert torch.allclose(seen['x'][0], emb[[5, 7]] + model.transformer.wpe.weight[:2])
    # the output layer computes with the same rows
    h = torch.randn(1, 1, 32)
    assert torch.allclose(head(h)[..., :90], h @ emb.t(), atol=1e-6)
    # and after an optimizer step the two are still one tensor
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
    x = torch.randint(0, 96, (2, 16))
    model.train()(x, x)[1].backward()
    opt.step()
    assert model.transformer.wte.weight is model.lm_head.weight
    assert not torch.equal(model.transformer.wte.weight[:90], emb)  # it trained


def test_pretrained_embeddings_shape_error_names_both_shapes():
    with pytest.raises(ValueError, match=r'shape \[100, 32\].*\[vocab <= 96, 32\]'):
        GPT(tiny_config(), pretrained_embeddings=torch.zeros(100, 32))
    with pytest.raises(ValueError, match=r'shape \[90, 300\]'):
        GPT(tiny_config(), pretrained_embeddings=torch.zeros(90, 300))


def test_fit_pretrained_embeddings_projects_and_rescales():
    torch.manual_seed(0)
    glove_like = torch.randn(90, 300) * 0.4
    fitted = fit_pretrained_embeddings(glove_like, 32)
    assert fitted.shape == (90, 32)
    assert abs(fitted.std().item() - 0.02) < 1e-4
    assert torch.equal(fitted, fit_pretrained_embeddings(glove_like, 32))  # a fixed projection
    GPT(tiny_config(), pretrained_embeddings=fitted)  # and it fits the model


def test_crop_block_size():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 96, (1, 16))
    before = model(idx)[0]
    model.crop_block_size(16)
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape == (16, 32)
    assert torch.allclose(model(idx)[0], before)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match='only 16'):
        model.crop_block_size(64)


def test_configure_optimizers_decays_only_matrices():
    model = GPT(tiny_config())
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 'cpu')
    decayed, plain = opt.param_groups
    assert decayed['weight_decay'] == 0.1 and plain['weight_decay'] == 0.0
    assert all(p.dim() == 2 for p in decayed['params']) and all(p.dim() == 1 for p in plain['params'])
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == model.get_num_params(False)


def test_forward_without_targets_returns_last_position():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 96, (2, 10))
    logits, loss = model(idx)
    assert loss is None and logits.shape == (2, 1, 96)
    assert torch.allclose(logits[:, 0], model(idx, idx)[0][:, -1], atol=1e-6)


def test_chunked_cross_entropy_equals_f_cross_entropy_forward_and_backward():
    torch.manual_seed(0)
    x, weight = torch.randn(50, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    targets[::7] = -1  # ignored, as in hellaswag's targets
    expected = F.cross_entropy(x @ weight.t(), targets, ignore_index=-1)
    grad_x, grad_w = torch.autograd.grad(expected * 0.25, (x, weight))  # * 0.25: a gradient accumulation step
    for rows in (7, None):  # chunks through the autograd.Function; one chunk: F.cross_entropy itself
        loss = chunked_cross_entropy(x, weight, targets, chunk_rows=rows)
        assert torch.allclose(loss, expected, rtol=1e-6)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(torch.autograd.grad(loss * 0.25, (x, weight)), (grad_x, grad_w)))
    for rows in (1, 7, 50):  # chunks that do and do not divide the rows
        chunk_loss, chunk_grad_x, chunk_grad_w = loss_and_grads_by_chunks(x.detach(), weight.detach(), targets, True, chunk_rows=rows)
        assert torch.allclose(chunk_loss, expected, rtol=1e-6)
        assert torch.allclose(chunk_grad_x * 0.25, grad_x, rtol=1e-5, atol=1e-8)
        assert torch.allclose(chunk_grad_w * 0.25, grad_w, rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        assert torch.allclose(chunked_cross_entropy(x, weight, targets, chunk_rows=7), expected, rtol=1e-6)


@pytest.mark.parametrize('autocast', [False, True])
def test_loss_without_logits_equals_the_plain_loss(autocast, monkeypatch):
    """train.py's chunked_loss=True: the same loss and gradients (the tied wte/lm_head weight too). Under
    bfloat16 autocast both run the output layer in bfloat16: each is as close to float32's as the other."""
    monkeypatch.setattr(loss_module, 'rows_per_chunk', lambda vocab_size, device_type: 20)  # 64 rows: 4 chunks
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx, targets = torch.randint(0, 96, (2, 32)), torch.randint(0, 96, (2, 32))

    def loss_and_grads(chunked, bf16):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            logits, loss = model(idx, targets, chunked_loss=chunked)
        assert (logits is None) == chunked
        return loss.float(), torch.autograd.grad(loss, list(model.parameters()))
    plain, plain_grads = loss_and_grads(False, autocast)
    chunked, chunked_grads = loss_and_grads(True, autocast)
    if not autocast:
        assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-7)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(chunked_grads, plain_grads))
        return
    exact, exact_grads = loss_and_grads(False, False)
    assert abs(chunked - exact) <= 2 * abs(plain - exact) + 1e-3
    for a, b, ref in zip(chunked_grads, plain_grads, exact_grads):  # errors relative to each tensor's largest entry
        assert (a - ref).abs().max() <= 2 * (b - ref).abs().max() + 1e-3 * ref.abs().max()


@pytest.mark.slow
def test_loss_without_logits_under_torch_compile(monkeypatch):
    """Dynamo traces the chunked loss's autograd.Function (aot_eager: the tracing without inductor's C++ build)."""
    monkeypatch.setattr(loss_module, 'rows_per_chunk', lambda vocab_size, device_type: 20)
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx, targets = torch.randint(0, 96, (2, 32)), torch.randint(0, 96, (2, 32))
    _, expected = model(idx, targets)
    _, loss = torch.compile(model, backend='aot_eager')(idx, targets, chunked_loss=True)
    assert torch.allclose(loss, expected, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())), torch.autograd.grad(expected, list(model.parameters()))):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_generate_top_k_samples_only_from_top_k():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 96, (4, 3))
    out = model.generate(idx, 20, top_k=1)
    assert out.shape == (4, 23) and torch.equal(out[:, :3], idx)
    # top_k=1 is greedy: each new token is the argmax of the model's next-token logits
    for t in range(3, 23):
        assert torch.equal(out[:, t], model(out[:, :t])[0][:, -1].argmax(-1))
    # top_k=5: every sampled token is among the 5 most likely
    out = model.generate(idx, 30, top_k=5, temperature=2.0)
    for t in range(3, 33):
        top5 = model(out[:, :t])[0][:, -1].topk(5).indices
        assert (top5 == out[:, t:t + 1]).any(dim=1).all()


def test_checkpoints_without_a_gelu_key_keep_the_gelu_they_were_trained_with(tmp_path):
    """Before the gelu setting, our checkpoints (they have an alibi key) ran GPT-2's tanh GELU and nanoGPT's
    the exact one: each loads with its own, and a checkpoint that names its GELU gets that one."""
    from files import load_checkpoint
    torch.manual_seed(0)
    tanh_model = GPT(tiny_config(gelu='tanh')).eval()
    with torch.no_grad():
        for p in tanh_model.parameters():
            p.normal_(0.0, 0.3)  # far from the init, where the GELUs' inputs are too small to tell them apart
    erf_model = GPT(tiny_config(gelu='erf')).eval()
    erf_model.load_state_dict(tanh_model.state_dict())
    idx = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        tanh_logits, erf_logits = tanh_model(idx, idx)[0], erf_model(idx, idx)[0]
    assert (tanh_logits - erf_logits).abs().max().item() > 1e-4  # the two GELUs tell apart in the logits
    c = tanh_model.config
    ours_before = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size, bias=c.bias,
                       vocab_size=c.vocab_size, dropout=0.0, flash_attn=True, alibi=False)
    nanogpt = {k: v for k, v in ours_before.items() if k not in ('flash_attn', 'alibi')}
    for model_args, gelu, expected in [(ours_before, 'tanh', tanh_logits), (nanogpt, 'erf', erf_logits),
                                       ({**nanogpt, 'gelu': 'tanh'}, 'tanh', tanh_logits),
                                       ({**ours_before, 'gelu': 'erf'}, 'erf', erf_logits)]:
        torch.save({'model': tanh_model.state_dict(), 'model_args': model_args}, tmp_path / 'ckpt.pt')
        model = load_checkpoint(tmp_path)[0].eval()
        assert model.config.gelu == gelu, model_args
        with torch.no_grad():
            torch.testing.assert_close(model(idx, idx)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize('activation,gelu', [('gelu_new', 'tanh'), ('gelu_pytorch_tanh', 'tanh'), ('gelu', 'erf')])
def test_from_pretrained_takes_the_checkpoints_gelu(tmp_path, activation, gelu):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=211, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                               activation_function=activation)).save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.gelu == gelu
    idx = torch.randint(0, 211, (2, 40))
    assert (model(idx, idx)[0] - hf_logits(tmp_path, idx)).abs().max().item() < 2e-5


@pytest.mark.slow
@pytest.mark.parametrize('setting', [dict(activation_function='relu'), dict(scale_attn_weights=False),
                                     dict(scale_attn_by_inverse_layer_idx=True), dict(layer_norm_epsilon=1e-3),
                                     dict(tie_word_embeddings=False), dict(n_inner=100)])
def test_from_pretrained_refuses_settings_model_py_does_not_implement(tmp_path, setting):
    """Each of these changes what transformers computes from the same weights; loaded as GPT-2 they would give
    other logits without a word, so the setting is named instead."""
    from conftest import save_hf_gpt2
    (key, value), = setting.items()
    save_hf_gpt2(tmp_path / 'gpt2', vocab_size=211, seed=1, initializer_range=0.5)
    save_hf_gpt2(tmp_path / 'other', vocab_size=211, seed=1, initializer_range=0.5, **setting)
    idx = torch.randint(0, 211, (2, 40))
    if key != 'n_inner':  # (another shape: other weights altogether)
        assert (hf_logits(tmp_path / 'gpt2', idx) - hf_logits(tmp_path / 'other', idx)).abs().max() > 1e-3
    with pytest.raises(ValueError, match=f"other has {key}={value!r}, which model.py does not implement"):
        GPT.from_pretrained(str(tmp_path / 'other'))


def test_train_py_names_an_unimplemented_setting_of_a_hugging_face_directory(tmp_path, monkeypatch):
    from conftest import copy_repo, exit_message, save_hf_gpt2
    copy_repo(tmp_path)
    save_hf_gpt2(tmp_path / 'hf', tie_word_embeddings=False)
    message = exit_message(monkeypatch, tmp_path, 'train.py', '--init_from=hf', '--device=cpu', '--dataset=none')
    assert "cannot load hf: hf has tie_word_embeddings=False, which model.py does not implement" in message, message


def test_clean_state_dict_reads_compiled_and_non_flash_nanogpt_checkpoints():
    model = GPT(tiny_config())
    sd = {'_orig_mod.' + k: v for k, v in model.state_dict().items()}
    sd['_orig_mod.transformer.h.0.attn.bias'] = torch.ones(1, 1, 32, 32)  # nanoGPT's mask buffer
    GPT(tiny_config()).load_state_dict(clean_state_dict(sd))


@pytest.mark.slow
@pytest.mark.parametrize('position', ['learned', 'alibi', 'rope', 'none'])
@pytest.mark.parametrize('flash', [False, True])
def test_kv_cache_in_chunks_equals_one_forward(flash, position):
    torch.manual_seed(0)
    model = GPT(tiny_config(flash_attn=flash, position=position)).eval()
    idx = torch.randint(0, 96, (2, 20))
    full, _ = model(idx, idx)
    kv_cache = [[] for _ in model.transformer.h]
    model(idx[:, :8], kv_cache=kv_cache)
    # several new positions at once: the mask (and RoPE's angles) must be offset by the cache's length
    middle, _ = model(idx[:, 8:13], kv_cache=kv_cache, pos=8)
    last, _ = model(idx[:, 13:], kv_cache=kv_cache, pos=13)
    assert (middle[:, -1] - full[:, 12]).abs().max().item() < 1e-5
    assert (last[:, -1] - full[:, -1]).abs().max().item() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize('flash', [True, False])
@pytest.mark.parametrize('dropout', [0.0, 0.2])
def test_gradient_checkpointing_gives_the_same_gradients_and_saves_less(dropout, flash):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=32, dropout=dropout, flash_attn=flash))
    x, y = torch.randint(0, 32, (4, 16)), torch.randint(0, 32, (4, 16))

    def gradients_and_saved_bytes(checkpointing, seed=1):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(seed)  # decides the dropout masks
        saved = []  # what autograd keeps for backward: activations, but also the weights the matmuls need
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            _, loss = model(x, y)
        loss.backward()
        weights = {p.data_ptr() for p in model.parameters()}
        activations = {t.data_ptr(): t.untyped_storage().nbytes() for t in saved if t.data_ptr() not in weights}
        return [p.grad.clone() for p in model.parameters()], sum(activations.values())

    plain, plain_bytes = gradients_and_saved_bytes(False)
    recomputed, recomputed_bytes = gradients_and_saved_bytes(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))
    assert recomputed_bytes < plain_bytes / 2
    if dropout:  # the masks matter, so the equality above needs the recomputation to redraw the same ones
        other_masks, _ = gradients_and_saved_bytes(False, seed=2)
        assert not all(torch.equal(a, b) for a, b in zip(plain, other_masks))
