"""The unlearning objective as pure tensor math; no ray, no torch.distributed.

Every loss is returned *per token* (``[batch, seq]``, fp32) so that the training loop can average
over the real tokens of a whole global batch (across accumulation steps and ranks) with
``values.sum() / num_real_tokens``. Padding never enters a value: pad positions are zeroed, and
the forget loss's random targets are keyed on the example, not on its place in a batch, so
changing pad ids, pad length or the micro-batch split changes nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def lens_logits(lens, stream: torch.Tensor, layer: int) -> torch.Tensor:
    """Lens logits at ``layer`` in fp32: translator ``layer`` applied to ``stream``, which is
    ``hidden_states[layer]``, the residual stream entering block ``layer`` (the stream the lens
    was trained on); any leading shape."""
    return lens(stream.float(), layer).float()


def example_targets(seed: int, epoch: int, index: int, num_layers: int, length: int,
                    vocab_size: int) -> torch.Tensor:
    """Uniform random targets ``[num_layers, length]`` for forget example ``index`` in ``epoch``.

    Drawn from a generator keyed on (seed, epoch, index), so they do not depend on how examples
    are split into micro-batches, padded, or assigned to ranks."""
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63)
    return torch.randint(vocab_size, (num_layers, length), generator=gen)


def batch_targets(per_example: list[torch.Tensor], width: int) -> torch.Tensor:
    """Stack per-example targets into ``[num_layers, batch, width]`` (padding gets 0)."""
    num_layers = per_example[0].shape[0]
    out = torch.zeros((num_layers, len(per_example), width), dtype=torch.long)
    for row, targets in enumerate(per_example):
        out[:, row, : targets.shape[1]] = targets
    return out


def forget_token_loss(lens, hidden_states, layers, mask, targets,
                      chunk_tokens: int = 0) -> torch.Tensor:
    """Per token, ``mean_l CE(lens_l(h_l), y_l) / ln V`` in fp32; ``targets[k]`` holds the
    uniform random targets for ``layers[k]`` (``example_targets``). Pad positions are 0.

    Its mean is 1.0 when the lens predicts the uniform distribution (the optimum). With
    ``chunk_tokens`` (> 0, fewer than the batch's tokens) each layer's logits exist for that many
    tokens at a time: each chunk's cross-entropy is checkpointed, so the backward recomputes its
    logits instead of keeping the whole ``[batch, seq, vocab]`` tensor."""
    per_layer = []
    for k, layer in enumerate(layers):
        h, y = hidden_states[layer], targets[k].to(hidden_states[layer].device)
        tokens = h.shape[0] * h.shape[1]
        if 0 < chunk_tokens < tokens:
            flat, y = h.flatten(0, 1), y.flatten()
            ce = torch.cat([
                checkpoint(_lens_cross_entropy, lens, flat[i : i + chunk_tokens], layer,
                           y[i : i + chunk_tokens], use_reentrant=False,
                           preserve_rng_state=False)  # the lens draws no random numbers
                for i in range(0, tokens, chunk_tokens)])
        else:
            ce = _lens_cross_entropy(lens, h, layer, y)
        per_layer.append(ce.view(mask.shape) / math.log(lens_vocab(lens)))
    return torch.stack(per_layer).mean(0) * mask


def _lens_cross_entropy(lens, hidden: torch.Tensor, layer: int,
                        targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (fp32, flat) of ``lens_logits`` against ``targets`` (the shape
    of ``hidden`` less its last dimension)."""
    logits = lens_logits(lens, hidden, layer)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")


def lens_vocab(lens) -> int:
    """The lens's output vocabulary (its unembedding's rows)."""
    return lens.unembed.unembedding.out_features


def retain_l2_token_loss(hidden_states, ref_hidden_states, layers, mask) -> torch.Tensor:
    """Per token, ``mean_l ||h_l - h_l^ref||_2`` in fp32 against the frozen reference."""
    dists = [
        (hidden_states[l].float() - ref_hidden_states[l].float()).norm(dim=-1) for l in layers
    ]
    return torch.stack(dists).mean(0) * mask


def retain_denominator(reduction: str, *, tokens: float, sequences: int,
                       max_length: int) -> float:
    """What the global batch's summed retain loss is divided by (``loss.retain_reduction``):
    its real tokens, its sequences, or its sequences x ``max_length`` positions."""
    return {"token": tokens, "sequence": sequences,
            "padded_position": sequences * max_length}[reduction]


def retain_kl_token_loss(logits, ref_logits, mask) -> torch.Tensor:
    """Per token ``KL(ref || model)`` of the output distributions, fp32. Averaged per real token
    it does not grow with sequence length or padding (the seed's bf16 sum over positions and
    vocabulary did, and went negative)."""
    ref_logp = ref_logits.float().log_softmax(-1)
    logp = logits.float().log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1) * mask


def ramp(step: int, total_steps: int, ramp_fraction: float = 1.0) -> float:
    """``s = min(1, t / T_ramp)`` with ``T_ramp = ramp_fraction * T``."""
    t_ramp = max(ramp_fraction * total_steps, 1e-12)
    return min(1.0, step / t_ramp)


def loss_weights(step: int, total_steps: int, *, retain_coef: float, remove_coef: float,
                 retain_start: float = 0.25, ramp_fraction: float = 1.0) -> tuple[float, float]:
    """``(c_r, c_f)`` at optimizer step ``step``: the retain weight ramps from
    ``retain_start * retain_coef`` to ``retain_coef``; the forget weight decays from
    ``remove_coef`` to ``0.75 * remove_coef``."""
    s = ramp(step, total_steps, ramp_fraction)
    return retain_coef * (retain_start + (1 - retain_start) * s), remove_coef * (1 - 0.25 * s)


def causal_lm_token_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy ``[batch, seq - 1]`` in fp32 (a fine-tuning attack's loss):
    position ``t`` predicts token ``t + 1``; a position counts only when both are real tokens,
    so its sum divided by ``mask[:, 1:].sum()`` is the mean over predicted real tokens."""
    targets = input_ids[:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                reduction="none").view_as(targets)
    return per_token * (mask[:, 1:] * mask[:, :-1]).to(per_token.dtype)
