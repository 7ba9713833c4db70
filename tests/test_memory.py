"""memory.py's activation figures: per-Block and rest-of-model measurements, scaled, are what a whole model keeps."""
import torch

from model import GPT, GPTConfig
from memory import activation_bytes_per_sequence, saved_bytes_per_sequence


def test_scaled_measurements_equal_the_whole_model_with_and_without_checkpointing():
    config = GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.1)
    block, checkpointed, head = activation_bytes_per_sequence(config)
    assert checkpointed == config.block_size * config.n_embd * 4  # a Block's float32 input, nothing else
    assert block > 10 * checkpointed
    torch.manual_seed(0)
    model = GPT(config)
    idx = lambda B: torch.randint(0, config.vocab_size, (B, config.block_size))
    assert saved_bytes_per_sequence(lambda B: model(idx(B), idx(B))[1]) == config.n_layer * block + head
    model.gradient_checkpointing = True
    assert saved_bytes_per_sequence(lambda B: model(idx(B), idx(B))[1]) == config.n_layer * checkpointed + head
