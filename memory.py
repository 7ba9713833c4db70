"""
Memory per GPU to train GPT-2 sizes with train.py: one GPU, DDP and FSDP (--fsdp=True) on 2 and 8 GPUs,
with and without gradient_checkpointing. Prints the table of assets/notes/2026-12-01-memory.md:
$ python memory.py
Model states by formula, for N parameters over G GPUs (float32 weights, AdamW, bfloat16 compute):
  weights 4N, gradients 4N, AdamW's two moments 8N bytes; FSDP keeps 1/G of each on every GPU.
  buffers, one GPU: the bfloat16 copies of the weights that autocast makes for a step (2N).
  DDP adds its gradient buckets, a second copy of the gradients (4N).
  FSDP: no autocast copies (it computes in bfloat16 weights it gathers): the root unit's weights (embeddings,
  ln_f) gathered in bfloat16 through forward and backward (2R), two Blocks' at a time (the one computing and
  the next, prefetched: 4B) and one Block's unsharded gradients before they are reduce-scattered (2B + 4B).
Activations are measured, not counted: the bytes of the tensors autograd keeps for backward (saved-tensor
hooks), on this CPU under bfloat16 autocast with flash attention, as a GPU runs the step. One Block and the
rest of the model (embeddings, ln_f, lm_head, loss) are measured at the config's block_size and width for one
sequence and scaled by the micro-batch and n_layer (tests/test_memory.py checks that the scaling is exact).
With gradient checkpointing a Block keeps only its input, and one Block's activations exist at a time, when
backward recomputes them. Not counted: the CUDA context and allocator slack (~1 GB) and the transient
tensors of backward (e.g. the gradient of the logits).
"""
import torch

from model import GPT, GPTConfig, Block

GiB = 2 ** 30


def saved_bytes_per_sequence(forward):
    """Bytes of the distinct tensors autograd keeps for backward, per sequence: forward(batch_size) is
    measured at batch 1 and 2 and subtracted, which leaves out what the batch does not scale (weights,
    their bfloat16 casts, the attention bias)."""
    totals = []
    for batch_size in (1, 2):
        saved = {}

        def keep(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        # the model as built (flash_attn=True: sdpa), as a GPU trains; train.py would pick explicit products on a CPU
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast('cpu', torch.bfloat16):
            out = forward(batch_size)
        totals.append(sum(saved.values()))
        del out
    return totals[1] - totals[0]


def activation_bytes_per_sequence(config):
    """(one Block's, one checkpointed Block's, the rest of the model's) activations for one sequence."""
    torch.manual_seed(0)
    block = Block(config)
    head = GPT(GPTConfig(**{**config.__dict__, 'n_layer': 0}))  # embeddings, ln_f, lm_head and the loss
    T, C = config.block_size, config.n_embd
    attn_bias = head.attention_bias(T, T, torch.device('cpu'), torch.bfloat16)
    x = lambda B: torch.randn(B, T, C, requires_grad=True)
    idx = lambda B: torch.randint(0, config.vocab_size, (B, T))
    return (saved_bytes_per_sequence(lambda B: block(x(B), attn_bias)),
            saved_bytes_per_sequence(lambda B: torch.utils.checkpoint.checkpoint(block, x(B), attn_bias, use_reentrant=False)),
            saved_bytes_per_sequence(lambda B: head(idx(B), idx(B))[1]))


def parameter_counts(config):
    """(all parameters, the root unit's: those outside the Blocks, one Block's), counted without memory."""
    with torch.device('meta'):
        model = GPT(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_block = sum(p.numel() for p in model.transformer.h[0].parameters())
    return n_params, n_params - config.n_layer * n_block, n_block


def per_gpu_bytes(counts, activations, batch_size, n_layer, strategy='one GPU', gpus=1):
    """Bytes per GPU, from parameter_counts and activation_bytes_per_sequence: [weights, gradients, AdamW, buffers,
    activations, total, activations checkpointed, total checkpointed]. strategy: 'one GPU', 'DDP' or 'FSDP'."""
    N, R, B = counts
    block, checkpointed, head = activations
    activations = batch_size * (n_layer * block + head)
    activations_checkpointed = batch_size * (n_layer * checkpointed + block + head)
    shard = gpus if strategy == 'FSDP' else 1
    buffers = {'one GPU': 2 * N, 'DDP': 2 * N + 4 * N, 'FSDP': 2 * R + 4 * B + 6 * B}[strategy]
    states = [4 * N / shard, 4 * N / shard, 8 * N / shard, buffers]
    return [*states, activations, sum(states) + activations, activations_checkpointed, sum(states) + activations_checkpointed]


def predicted_bytes(config, batch_size, strategy='one GPU', gpus=1):
    """per_gpu_bytes of training config at batch_size (the activations measured now, on this CPU: seconds for gpt2)."""
    return per_gpu_bytes(parameter_counts(config), activation_bytes_per_sequence(config), batch_size, config.n_layer,
                         strategy, gpus)


# the configs' runs: train_gpt2.py trains gpt2 from scratch; finetune_shakespeare.py starts from OpenAI's weights
runs = [('gpt2', 'config/train_gpt2.py', 12, dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=False)),
        ('gpt2-medium', 'config/finetune_shakespeare.py', 1, dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257)),
        ('gpt2-large', 'config/finetune_shakespeare.py', 1, dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257)),
        ('gpt2-xl', 'config/finetune_shakespeare.py', 1, dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257))]

if __name__ == '__main__':
    exec(open('configurator.py').read())  # no settings: --help says so, and anything else is refused
    print("GiB per GPU, bfloat16; activations for one micro-batch (gradient accumulation adds none)")
    print("| model (config) | batch x block | run on | weights | gradients | AdamW | buffers | activations | total | "
          "activations, checkpointed | total, checkpointed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, config_file, batch_size, args in runs:
        config = GPTConfig(**args)
        counts, activations = parameter_counts(config), activation_bytes_per_sequence(config)
        for strategy, G in (('one GPU', 1), ('DDP', 2), ('DDP', 8), ('FSDP', 2), ('FSDP', 8)):
            row = per_gpu_bytes(counts, activations, batch_size, config.n_layer, strategy, G)
            print(f"| {name} {counts[0] / 1e6:.0f}M ({config_file.split('/')[-1]}) | {batch_size} x {config.block_size} | "
                  f"{strategy if G == 1 else f'{strategy}, {G} GPUs'} | " + " | ".join(f"{b / GiB:.1f}" for b in row) + " |")
