"""
The GPT language model, in one file.
Module and parameter names follow nanoGPT (and so OpenAI's GPT-2), so their
checkpoints load unchanged. Three toggles set this model apart:
- flash_attn: attention through torch's scaled_dot_product_attention, or the explicit softmax.
- position: how a token knows where it is. 'learned': a table of position embeddings (wpe), as GPT-2;
  'alibi': a per-head linear distance penalty on the scores (Press et al., 2021); 'rope': q and k rotated
  by angles that grow with the position (Su et al., 2021); 'none': nothing but the causal mask (Kazemnejad
  et al., 2023). The last three have no table, so a model trained at block_size evaluates longer contexts.
- pretrained token embeddings: GPT(config, pretrained_embeddings=...) starts the tied
  wte/lm_head weight from a given matrix.
Speed-ups for CPUs live in cpu.py and are applied from outside; reading and writing files in files.py.
"""

import math
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from loss import chunked_cross_entropy

GPT2_VOCAB_SIZE = 50257  # GPT-2's BPE: 50,000 merges, 256 bytes and <|endoftext|>
# OpenAI's checkpoints use Conv1D modules, whose weights are the transpose of a Linear's
CONV1D_WEIGHTS = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, as GPT-2; False is a bit faster and better
    flash_attn: bool = True
    position: str = 'learned'  # 'learned', 'alibi', 'rope' or 'none' (the docstring above)
    rope_base: float = 10000.0  # RoPE: channel pair i turns by rope_base ** (-2i / head size) radians per position
    alibi: bool = False  # the older switch: True means position='alibi'; kept in step with position
    gelu: str = 'erf'  # the exact GELU, as nanoGPT; 'tanh': GPT-2's approximation, which its weights were trained with

    def __post_init__(self):
        if self.position not in ('learned', 'alibi', 'rope', 'none'):
            raise ValueError(f"position={self.position!r} is not 'learned', 'alibi', 'rope' or 'none'")
        if self.alibi and self.position not in ('learned', 'alibi'):
            raise ValueError(f"alibi=True and position='{self.position}' disagree (alibi=True means "
                             f"position='alibi'): set only position")
        self.position = 'alibi' if self.alibi else self.position  # older configs and checkpoints say alibi=True
        self.alibi = self.position == 'alibi'


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash_attn = config.flash_attn
        self.position = config.position
        self.block_size = config.block_size

    def forward(self, x, attn_bias, rope=None, kv_cache=None, pos=0):
        B, T, C = x.size()  # batch size, sequence length, embedding width (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.position == 'rope':  # before the cache: cached keys keep the rotation of their own position
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:  # decoding: the keys and values of positions 0..pos-1 are kept from earlier calls
            if pos == 0:  # the prompt: room for a whole context, allocated once, never grown
                kv_cache[:] = [k.new_empty(B, self.n_head, max(T, self.block_size), C // self.n_head) for _ in range(2)]
            kv_cache[0][:, :, pos:pos + T] = k
            kv_cache[1][:, :, pos:pos + T] = v
            k, v = kv_cache[0][:, :, :pos + T], kv_cache[1][:, :, :pos + T]  # (B, nh, Tk, hs), Tk = pos + T
        if self.flash_attn:
            # plain causal attention needs no mask: is_causal says it, and one query may see every key
            mask = attn_bias if self.position == 'alibi' or T not in (1, k.size(2)) else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=mask is None and T > 1)
        else:
            att = (q * (1.0 / math.sqrt(k.size(-1)))) @ k.transpose(-2, -1)  # (B, nh, T, Tk)
            att = F.softmax(att + attn_bias, dim=-1)  # -inf above the diagonal; with ALiBi, -slope * distance
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, Tk) x (B, nh, Tk, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # the heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='none' if config.gelu == 'erf' else 'tanh')
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_bias, rope=None, kv_cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), attn_bias, rope, kv_cache, pos)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config, pretrained_embeddings=None):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            # only learned positions have a table; wpe comes second, as in nanoGPT,
            # because optimizer states are matched to parameters by order when a checkpoint resumes
            **(dict(wpe=nn.Embedding(config.block_size, config.n_embd)) if config.position == 'learned' else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one tensor, two uses
        self._attn_bias_cache = {}  # (device, dtype) -> the (n_head or 1, L, L) additive attention bias
        self.gradient_checkpointing = False  # True: training keeps only each Block's input and recomputes the rest in backward

        self.apply(self._init_weights)
        # GPT-2: residual projections scaled down by 1/sqrt(2 * n_layer)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # loaded after the tying above, so that the tied weight really holds the given matrix
        if pretrained_embeddings is not None:
            self.load_pretrained_embeddings(pretrained_embeddings)

    def get_num_params(self, non_embedding=True):
        """Number of parameters; by default without the position embeddings (the token
        embeddings count, since they are tied to the output layer)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.position == 'learned':
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @torch.no_grad()
    def load_pretrained_embeddings(self, embeddings):
        """Start the tied wte/lm_head weight from a [vocab, n_embd] matrix. Rows past its
        vocabulary (the padding up to vocab_size) keep their random init."""
        emb = torch.as_tensor(embeddings)
        V, C = self.config.vocab_size, self.config.n_embd
        if emb.dim() != 2 or emb.size(0) > V or emb.size(1) != C:
            raise ValueError(f"embedding matrix has shape {list(emb.shape)} but this model needs "
                             f"[vocab <= {V}, {C}]; fit it to n_embd={C} with fit_pretrained_embeddings")
        self.transformer.wte.weight[:emb.size(0)].copy_(emb)

    @torch.compiler.disable  # python-side caching; keeps the compiled graph free of it
    def attention_bias(self, Tq, Tk, device, dtype):
        """Additive attention bias for the last Tq of Tk positions: -inf above the diagonal (a query
        sees no later key), and -slope * distance with ALiBi. Built once per (device, dtype) for the
        longest length seen and sliced after that."""
        bias = self._attn_bias_cache.get((device, dtype))
        if bias is None or bias.size(-1) < Tk:
            L = max(Tk, self.config.block_size)
            pos = torch.arange(L, device=device)
            distance = pos[:, None] - pos[None, :]  # query minus key, >= 0 where attention is allowed
            slopes = alibi_slopes(self.config.n_head) if self.config.position == 'alibi' else torch.zeros(1)
            bias = -slopes.to(device)[:, None, None] * distance
            bias = bias.masked_fill(distance < 0, float('-inf')).to(dtype)
            self._attn_bias_cache[(device, dtype)] = bias
        return bias[:, Tk - Tq:Tk, :Tk]

    def forward(self, idx, targets=None, kv_cache=None, pos=0, chunked_loss=False):
        """idx: (B, T) token ids at positions pos..pos+T-1. kv_cache: a list of one list per
        layer, filled at pos=0 and extended after that (see generate). With targets and chunked_loss,
        the loss is computed a few rows at a time (loss.py), never holding all logits: logits is None."""
        device = idx.device
        b, t = idx.size()
        position = self.config.position
        if position == 'learned' and pos + t > self.config.block_size:
            raise ValueError(f"cannot forward a sequence of length {pos + t}: block_size is only {self.config.block_size} "
                             f"(learned positions); position='rope', 'alibi' or 'none' go longer")
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if position == 'learned':
            x = x + self.transformer.wpe(torch.arange(pos, pos + t, dtype=torch.long, device=device))
        x = self.transformer.drop(x)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x.dtype
        attn_bias = self.attention_bias(t, pos + t, device, dtype)
        hs = self.config.n_embd // self.config.n_head
        rope = rope_cos_sin(pos, t, hs, self.config.rope_base, device) if position == 'rope' else None  # (T, hs) each
        for i, block in enumerate(self.transformer.h):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # recomputed with the RNG state of the forward, so dropout drops the same units
                x = torch.utils.checkpoint.checkpoint(block, x, attn_bias, rope, use_reentrant=False)
            else:
                x = block(x, attn_bias, rope, None if kv_cache is None else kv_cache[i], pos)
        x = self.transformer.ln_f(x)

        if targets is not None and chunked_loss:
            logits, loss = None, chunked_cross_entropy(x.view(-1, x.size(-1)), self.lm_head.weight, targets.view(-1))
        elif targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            # inference: the output layer on the last position only
            logits = self.lm_head(x[:, -1:, :])
            loss = None
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context, e.g. to finetune GPT-2 (1024) at a smaller block size."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot crop block_size to {block_size}: the model's is only {self.config.block_size}")
        self.config.block_size = block_size
        for block in self.transformer.h:
            block.attn.block_size = block_size
        if self.config.position == 'learned':
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """OpenAI's GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') or a local directory in
        Hugging Face format, through transformers. Only dropout and flash_attn may be overridden."""
        override_args = override_args or {}
        if other := set(override_args) - {'dropout', 'flash_attn'}:
            raise ValueError(f"from_pretrained can only override 'dropout' and 'flash_attn', not {sorted(other)}")
        import transformers
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(name_or_path)
        c = hf_model.config
        gelu = {'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh', 'gelu': 'erf'}.get(c.activation_function)
        # GPT2Config settings model.py does not implement, at GPT-2's values: weights made with others compute otherwise
        for k, v in dict(activation_function=c.activation_function if gelu else 'gelu_new', scale_attn_weights=True,
                         scale_attn_by_inverse_layer_idx=False, layer_norm_epsilon=1e-5, tie_word_embeddings=True, n_inner=None).items():
            if getattr(c, k, v) != v:
                raise ValueError(f"{name_or_path} has {k}={getattr(c, k)!r}, which model.py does not implement (GPT-2's: {v!r})")
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                           n_embd=c.n_embd, bias=True, gelu=gelu, dropout=override_args.get('dropout', 0.0),
                           flash_attn=override_args.get('flash_attn', True))
        print(f"loading weights from pretrained gpt: {name_or_path} (n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd})")
        model = cls(config)
        sd = model.state_dict()
        sd_hf = {k: v for k, v in hf_model.state_dict().items() if not k.endswith(('.attn.bias', '.attn.masked_bias'))}
        if set(sd_hf) != set(sd):
            raise ValueError(f"{name_or_path} is not a GPT-2 checkpoint we can map: differing keys {sorted(set(sd_hf) ^ set(sd))[:5]}")
        with torch.no_grad():
            for k, v in sd_hf.items():
                sd[k].copy_(v.t() if k.endswith(CONV1D_WEIGHTS) else v)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # 2-D tensors (matmul weights, embeddings) are decayed; biases and LayerNorm gains are not
        params = [p for p in self.parameters() if p.requires_grad]
        decay_params = [p for p in params if p.dim() >= 2]
        nodecay_params = [p for p in params if p.dim() < 2]
        optim_groups = [{'params': decay_params, 'weight_decay': weight_decay}, {'params': nodecay_params, 'weight_decay': 0.0}]
        print(f"num decayed parameter tensors: {len(decay_params)}, with {sum(p.numel() for p in decay_params):,} parameters")
        print(f"num non-decayed parameter tensors: {len(nodecay_params)}, with {sum(p.numel() for p in nodecay_params):,} parameters")
        use_fused = 'fused' in inspect.signature(torch.optim.AdamW).parameters and device_type in ('cuda', 'mps', 'cpu')
        optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **({'fused': True} if use_fused else {}))
        print(f"using fused AdamW: {use_fused}")
        return optimizer

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilization: achieved FLOP/s over the device's peak_flops (runtime.peak_flops).
        FLOPs per token as in the PaLM paper, appendix B: 6N + 12 L H Q T."""
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        return min(1.0, flops_per_iter / dt / peak_flops)  # a peak measured while the machine was busy reads low

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None, use_cache=True):
        """Sample max_new_tokens after idx (B, T). With use_cache the prompt runs once and then one
        position per step, reusing keys and values; past block_size the context is cropped to the
        last block_size tokens and recomputed each step, as nanoGPT does, so both give the same
        tokens. temperature=0 takes the most likely token at every step (greedy). Stops early once
        every row has produced stop_token."""
        block_size = self.config.block_size
        kv_cache = [[] for _ in self.transformer.h]
        cache_len = 0  # positions currently held in kv_cache
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        T = idx.size(1)  # tokens so far
        idx = torch.cat((idx, idx.new_empty(idx.size(0), max_new_tokens)), dim=1)  # room for all: no cat per token
        for _ in range(max_new_tokens):
            if not use_cache or T > block_size:
                logits, _ = self(idx[:, max(0, T - block_size):T])
            elif cache_len == 0:
                logits, _ = self(idx[:, :T], kv_cache=kv_cache)
                cache_len = T
            else:
                logits, _ = self(idx[:, cache_len:T], kv_cache=kv_cache, pos=cache_len)
                cache_len = T
            logits = logits[:, -1, :].float() / (temperature or 1.0)  # in float32 whatever the model's dtype
            if top_k is not None and top_k < logits.size(-1):
                v, _ = torch.topk(logits, top_k)
                logits[logits < v[:, [-1]]] = -float('Inf')
            if top_p is not None:  # nucleus: the smallest set of tokens whose probability reaches top_p
                sorted_logits, sorted_idx = torch.sort(logits, descending=True)
                cum_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
                drop = cum_probs - F.softmax(sorted_logits, dim=-1) >= top_p
                drop[:, 0] = False  # the most likely token stays, whatever top_p
                logits[drop.scatter(1, sorted_idx, drop)] = -float('Inf')
            probs = F.softmax(logits, dim=-1)
            # temperature 0: greedy, the most likely token (top_k and top_p always keep it)
            idx_next = torch.multinomial(probs, num_samples=1) if temperature > 0 else logits.argmax(-1, keepdim=True)
            idx[:, T:T + 1] = idx_next
            T += 1
            if stop_token is not None:
                done |= idx_next.squeeze(1) == stop_token
                if done.all():
                    break
        return idx[:, :T]


# -----------------------------------------------------------------------------
# helpers: RoPE's rotation, ALiBi slopes, pretrained embeddings, checkpoints' names

def rope_cos_sin(pos, T, hs, base, device):
    """cos and sin of RoPE's angles at positions pos..pos+T-1, each (T, hs): position p turns channel
    pair i by p * base ** (-2i / hs), from one radian per position (i = 0) down to about 1 / base."""
    inv_freq = 1.0 / (base ** (torch.arange(0, hs, 2, device=device).float() / hs))  # (hs/2,)
    angles = torch.arange(pos, pos + T, device=device).float()[:, None] * inv_freq  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs): pair i is channels i and i + hs/2
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each channel pair (x_i, x_{i+hs/2}) of x (B, nh, T, hs) by its angle: q . k then depends on
    the positions only through their distance. Pairs are half-split, as GPT-NeoX and transformers' Llama, not
    interleaved (x_2i, x_2i+1) as RoFormer: contiguous halves, no strided views, and the same model up to a
    fixed order of q's and k's channels when trained from scratch."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated_half = torch.cat((-x2, x1), dim=-1)  # (B, nh, T, hs)
    return (x * cos + rotated_half * sin).to(x.dtype)  # float32 angles; back to the autocast dtype


def alibi_slopes(n_head):
    """Per-head slopes of ALiBi: a geometric sequence starting at 2^(-8/n) (Press et al.)."""
    def power_of_2_slopes(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]
    if math.log2(n_head).is_integer():
        return torch.tensor(power_of_2_slopes(n_head))
    # otherwise: the slopes of the closest smaller power of 2, then every other slope of the next one
    closest = 2 ** math.floor(math.log2(n_head))
    extra = power_of_2_slopes(2 * closest)[0::2][:n_head - closest]
    return torch.tensor(power_of_2_slopes(closest) + extra)


def fit_pretrained_embeddings(emb, n_embd, std=0.02, seed=1337):
    """Map a [vocab, D] embedding matrix to width n_embd and rescale it to the model's init std.
    When D != n_embd the map is a fixed Gaussian projection (seeded, so every run gets the same one),
    scaled by 1/sqrt(D), which roughly preserves the angles between token vectors (Johnson-Lindenstrauss)."""
    emb = emb.float()
    if emb.size(1) != n_embd:
        g = torch.Generator().manual_seed(seed)
        emb = emb @ (torch.randn(emb.size(1), n_embd, generator=g) / math.sqrt(emb.size(1)))
    emb = emb - emb.mean()
    return emb * (std / emb.std())


def clean_state_dict(state_dict):
    """A state dict as our GPT names it: drops torch.compile's '_orig_mod.' prefix (checkpoints of
    compiled models) and the causal-mask buffers that nanoGPT saves when it runs without flash."""
    prefix = '_orig_mod.'
    sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
    return {k: v for k, v in sd.items() if not k.endswith('.attn.bias')}
