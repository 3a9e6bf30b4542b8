"""Tiny random GPT-NeoX models for tests whose assertions hold for any weights."""

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM


def tiny_neox(*, vocab: int = 50, hidden: int = 16, layers: int = 2, seed: int = 0,
              intermediate: int = 32, positions: int = 32, tied: bool = False):
    """A random GPT-NeoX (2 heads), seeded: the same arguments give the same weights."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=2, intermediate_size=intermediate,
                           max_position_embeddings=positions, tie_word_embeddings=tied)
    return GPTNeoXForCausalLM(config)
