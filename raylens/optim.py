"""Optimizers and the learning-rate schedule.

``adamw``: one AdamW over all trainable parameters. ``muon``: ``torch.optim.Muon`` for the 2-D
hidden matrices (the weights of the blocks' linear layers) and AdamW for everything else
(embeddings, unembedding, norms, biases), each with its own learning rate. Weight decay follows
Hugging Face's convention: matrices decay, biases and norm weights do not.
"""

from __future__ import annotations

import math

import torch

from raylens.config import OptimConfig


def is_hidden_matrix(name: str, param: torch.Tensor, model) -> bool:
    """A 2-D weight inside a transformer block: not the input embedding or the output head."""
    if param.ndim != 2:
        return False
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return id(param) not in embeddings


def param_groups(model, config: OptimConfig) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Trainable parameters split into ``muon`` (hidden matrices, muon mode only), ``decay`` and
    ``no_decay`` (AdamW)."""
    groups: dict[str, list] = {"muon": [], "decay": [], "no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if config.name == "muon" and is_hidden_matrix(name, param, model):
            groups["muon"].append((name, param))
        elif param.ndim >= 2:
            groups["decay"].append((name, param))
        else:
            groups["no_decay"].append((name, param))
    return groups


def build_optimizers(model, config: OptimConfig) -> list[torch.optim.Optimizer]:
    """The optimizers of one run (AdamW, plus Muon first in muon mode); step them all together."""
    groups = param_groups(model, config)
    adam_lr = config.adam_lr if config.name == "muon" else config.lr
    adam_groups = [
        {"params": [p for _, p in groups["decay"]], "weight_decay": config.weight_decay},
        {"params": [p for _, p in groups["no_decay"]], "weight_decay": 0.0},
    ]
    optimizers: list[torch.optim.Optimizer] = []
    if groups["muon"]:
        optimizers.append(
            torch.optim.Muon([p for _, p in groups["muon"]], lr=config.muon_lr,
                             weight_decay=config.weight_decay,
                             adjust_lr_fn=config.muon_adjust_lr)
        )
    adam_groups = [g for g in adam_groups if g["params"]]
    if adam_groups:
        optimizers.append(torch.optim.AdamW(adam_groups, lr=adam_lr, betas=config.adam_betas))
    if not optimizers:
        raise ValueError("the model has no trainable parameters")
    return optimizers


def lr_factor(step: int, total_steps: int, warmup_ratio: float,
              schedule: str = "linear") -> float:
    """Linear warmup over ``warmup_ratio * T`` steps, then ``schedule`` to the end at ``T``:
    ``linear`` decays to 0, ``cosine`` follows half a cosine to 0, ``constant`` stays at 1."""
    warmup = int(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    left = max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * left))
    return left


def build_schedulers(optimizers, total_steps: int, warmup_ratio: float, schedule: str = "linear"):
    """One ``LambdaLR`` per optimizer, all following ``lr_factor``."""
    return [
        torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total_steps, warmup_ratio, schedule))
        for opt in optimizers
    ]
