"""The training loop of one unlearning run, written once.

``train`` is the function a worker runs: it loads the model, lens and data, and takes
``T = num_examples * epochs / global_batch`` optimizer steps of
``loss = c_r * L_retain + c_f * L_forget``. Each optimizer step accumulates
``global_batch / per_device_batch`` micro-batches; every micro-batch's per-token losses are
summed and divided by the real-token count of the *whole* global batch, so the gradient is the
mean over real tokens regardless of how sequences were split or padded.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raylens.config import TOY, UnlearnConfig, to_flat
from raylens.data import load_paired, load_texts
from raylens.lens import load_lens
from raylens.losses import (
    batch_targets, example_targets, forget_token_loss, loss_weights, retain_kl_token_loss,
    retain_l2_token_loss,
)
from raylens.model import (
    Reference, apply_lora, export, load_model, load_model_config, resolve_target_layers,
)
from raylens.optim import build_optimizers, build_schedulers


@dataclass
class TrainResult:
    """The trained (live) model, its tokenizer, and one record per optimizer step."""

    model: object
    tokenizer: object
    history: list[dict] = field(default_factory=list)
    target_layers: tuple[int, ...] = ()


def _lens_source(config: UnlearnConfig, toyworld: Path | None) -> str:
    if config.lens.name_or_path == TOY:
        return str(Path(toyworld) / "lens")
    return config.lens.name_or_path


def validate(config: UnlearnConfig, toyworld: Path | None = None) -> tuple[int, ...]:
    """Check what needs the model's shape and the corpora, without loading weights; returns the
    target layers. Raises ``ConfigError`` naming the field, so a run fails before any compute."""
    num_layers = load_model_config(config.model, toyworld).num_hidden_layers
    layers = resolve_target_layers(config.loss.target_layers, num_layers)
    load_texts(config.data, toyworld)
    return layers


def prepare(config: UnlearnConfig, toyworld: Path | None = None):
    """Model (LoRA-wrapped or fully trainable), tokenizer, frozen lens, reference, target layers."""
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.model, toyworld)
    layers = resolve_target_layers(config.loss.target_layers, model.config.num_hidden_layers)
    # the lens copies the final norm and unembedding now, before any weight changes
    lens = load_lens(model, _lens_source(config, toyworld), config.lens.revision).float()
    if config.mode.kind == "lora":
        model = apply_lora(model, config.mode, layers,
                           gradient_checkpointing=config.model.gradient_checkpointing)
    reference = Reference(model, config.mode.kind)
    model.train()
    return model, tokenizer, lens, reference, layers


def train(config: UnlearnConfig, *, toyworld: Path | None = None, log=print) -> TrainResult:
    """Run the unlearning loop in this process and return the live model and its history."""
    model, tokenizer, lens, reference, layers = prepare(config, toyworld)
    data = load_paired(config.data, tokenizer, toyworld)
    global_batch, micro = config.batch.global_batch, config.batch.per_device_batch
    steps_per_epoch = len(data) // global_batch
    total_steps = steps_per_epoch * config.batch.epochs
    optimizers = build_optimizers(model, config.optim)
    schedulers = build_schedulers(optimizers, total_steps, config.optim.warmup_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    log_every = max(1, total_steps // 32)  # ~32 log lines per run; every step is in history
    vocab = lens.unembed.unembedding.out_features
    loss_cfg = config.loss
    history: list[dict] = []
    step = 0
    for epoch in range(config.batch.epochs):
        order = data.epoch_order(epoch, config.seed)
        for i in range(steps_per_epoch):
            start = time.perf_counter()
            indices = order[i * global_batch : (i + 1) * global_batch]
            micro_indices = [indices[j : j + micro] for j in range(0, global_batch, micro)]
            batches = [data.batch(m) for m in micro_indices]
            num_forget = sum(f.num_tokens for f, _ in batches)
            num_retain = sum(r.num_tokens for _, r in batches)
            c_r, c_f = loss_weights(step, total_steps, retain_coef=loss_cfg.retain_coef,
                                    remove_coef=loss_cfg.remove_coef,
                                    retain_start=loss_cfg.retain_start,
                                    ramp_fraction=loss_cfg.ramp_fraction)
            forget_sum = retain_sum = 0.0
            for (forget, retain), examples in zip(batches, micro_indices):
                targets = batch_targets(
                    [example_targets(config.seed, epoch, idx, len(layers), len(data.forget[idx]),
                                     vocab) for idx in examples],
                    forget.input_ids.shape[1],
                )
                out = model(input_ids=forget.input_ids, attention_mask=forget.attention_mask,
                            output_hidden_states=True)
                l_forget = forget_token_loss(lens, out.hidden_states, layers, forget.attention_mask,
                                             targets).sum() / num_forget
                out = model(input_ids=retain.input_ids, attention_mask=retain.attention_mask,
                            output_hidden_states=True)
                ref = reference(retain.input_ids, retain.attention_mask)
                if loss_cfg.retain_loss == "l2":
                    per_token = retain_l2_token_loss(out.hidden_states, ref.hidden_states, layers,
                                                     retain.attention_mask)
                else:
                    per_token = retain_kl_token_loss(out.logits, ref.logits, retain.attention_mask)
                l_retain = per_token.sum() / num_retain
                (c_r * l_retain + c_f * l_forget).backward()
                forget_sum += l_forget.item()
                retain_sum += l_retain.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip).item()
            lr = schedulers[-1].get_last_lr()[0]
            for opt in optimizers:
                opt.step()
            for sched in schedulers:
                sched.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            record = {
                "step": step + 1, "epoch": epoch, "retain_loss": retain_sum,
                "forget_loss": forget_sum, "retain_weight": c_r, "forget_weight": c_f,
                "loss": c_r * retain_sum + c_f * forget_sum, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": (num_forget + num_retain) / (time.perf_counter() - start),
            }
            history.append(record)
            if (step + 1) % log_every == 0 or step + 1 == total_steps:
                log(
                    f"step {step + 1:4d}/{total_steps} retain {retain_sum:.4f} (x{c_r:.3g}) "
                    f"forget {forget_sum:.4f} (x{c_f:.3g}) lr {lr:.3g} grad {grad_norm:.3g} "
                    f"{record['tokens_per_s']:.0f} tok/s"
                )
            step += 1
    model.eval()
    return TrainResult(model, tokenizer, history, layers)


def save_run(result: TrainResult, config: UnlearnConfig, out: Path) -> Path:
    """Export the model and write ``config.json`` (flat) and ``history.jsonl``; returns the model
    folder, the one any later evaluation must read. ``result.model`` becomes the exported model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_flat(config), indent=1, sort_keys=True))
    with open(out / "history.jsonl", "w") as f:
        for record in result.history:
            f.write(json.dumps(record) + "\n")
    folder, result.model = export(result.model, result.tokenizer, out, config.mode.kind)
    return folder
