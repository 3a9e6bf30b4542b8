"""The training loop of one unlearning run, written once, in three levels.

``train`` is the function a worker runs: ``setup`` loads the model, lens and data under the
run's parallelism plan; ``train_step`` takes one of ``T = num_examples * epochs / global_batch``
optimizer steps of ``loss = c_r * L_retain + c_f * L_forget``; ``loss_step`` computes one
micro-batch's two losses. Each optimizer step accumulates ``global_batch / per_device_batch``
micro-batches; every micro-batch's per-token losses are summed and divided by the real-token
count of the *whole* global batch, so the gradient is the mean over real tokens regardless of
how sequences were split or padded. ``run`` is one whole run (train, score, export), the same
in one process and in every Ray Train worker.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raylens.checkpoint import read_checkpoint, usable_checkpoint, write_checkpoint
from raylens.collectives import all_gather, all_reduce_sum, rank_and_world
from raylens.config import TOY, ConfigError, UnlearnConfig, to_flat
from raylens.data import load_paired, load_texts
from raylens.evaluate import EvalError, evaluate_live, question_set
from raylens.lens import check_lens, load_lens
from raylens.losses import (
    batch_targets,
    example_targets,
    forget_token_loss,
    lens_vocab,
    loss_weights,
    retain_denominator,
    retain_kl_token_loss,
    retain_l2_token_loss,
)
from raylens.model import (
    DTYPES,
    Reference,
    apply_lora,
    checkpoint_dtype,
    export,
    load_model,
    load_model_config,
    load_sharded,
    load_tokenizer,
    master_dtype,
    resolve_target_layers,
)
from raylens.optim import build_optimizers, build_schedulers
from raylens.parallel import Plan, peak_memory_mb, plan_for, resident_bytes
from raylens.tracking import StepLogger


@dataclass
class TrainResult:
    """The trained (live) model, its tokenizer, and one record per optimizer step."""

    model: Any
    tokenizer: Any
    history: list[dict] = field(default_factory=list)
    target_layers: tuple[int, ...] = ()
    resumed_from: int = 0
    """The checkpoint step this run continued from (0: started fresh)."""
    resident_bytes: int = 0
    """This rank's parameters, gradients and optimizer state after the first step (the frozen
    full-mode reference included), local shards only."""
    source_dtype: torch.dtype = torch.float32
    """The dtype of the source checkpoint: the export is written in it."""
    reference: Any = None
    """The frozen reference the retain loss compared against."""
    plan: Any = None
    """The parallelism plan the run trained under."""
    diverged: str | None = None
    """Why the run stopped early (a non-finite loss at step N), or None."""


def lens_source(config: UnlearnConfig, toyworld: Path | None) -> str:
    """The lens's folder or hub id (``toy``: the toy world's lens folder)."""
    if config.lens.name_or_path == TOY:
        if toyworld is None:
            raise ConfigError("lens.name_or_path='toy' is invalid here: allowed with a toy world")
        return str(Path(toyworld) / "lens")  # callers may pass the folder as a string
    return config.lens.name_or_path


def validate(config: UnlearnConfig, toyworld: Path | None = None) -> tuple[int, ...]:
    """Check what needs the model's shape (the target layers, the lens), the corpora and the
    evaluation tasks, without loading weights; returns the
    target layers. Raises ``ConfigError`` naming the field, so a run fails before any compute."""
    model_config = load_model_config(config.model, toyworld)
    layers = resolve_target_layers(config.loss.target_layers, model_config.num_hidden_layers)
    check_lens(lens_source(config, toyworld), config.lens.revision, model_config)
    load_texts(config.data, toyworld)
    encoded_questions(config, toyworld, model_config)
    return layers


def encoded_questions(config: UnlearnConfig, toyworld: Path | None = None,
                      model_config=None) -> dict[tuple, dict]:
    """``{question_key: questions}``: the run's evaluation questions, encoded once per process
    (``evaluate.question_set``), as a driver hands them to its workers
    (``evaluate.remember_questions``)."""
    model_config = model_config or load_model_config(config.model, toyworld)
    return question_set(config.eval, load_tokenizer(config.model, toyworld), toyworld,
                        model_config)


def prepare(config: UnlearnConfig, toyworld: Path | None = None, *, sharded: bool = False,
            device=None):
    """Model (LoRA-wrapped or fully trainable), tokenizer, frozen lens, reference, target layers;
    weights in the dtypes of the precision policy (``raylens.model``). ``sharded``: full
    fine-tuning under FSDP2, built on the meta device and loaded shard by shard onto
    ``device`` (``load_sharded``)."""
    torch.manual_seed(config.seed)
    if sharded:
        model, frozen, head = load_sharded(config.model, toyworld, device=device)
        tokenizer = load_tokenizer(config.model, toyworld)
    else:
        model, tokenizer = load_model(config.model, toyworld,
                                      dtype=master_dtype(config.mode.kind, config.model))
        frozen, head = None, model
    layers = resolve_target_layers(config.loss.target_layers, model.config.num_hidden_layers)
    # the lens copies the final norm and unembedding now, before any weight changes
    lens = load_lens(head, lens_source(config, toyworld), config.lens.revision).float()
    if config.mode.kind == "lora":
        model = apply_lora(model, config.mode, layers,
                           gradient_checkpointing=config.model.gradient_checkpointing)
    reference = Reference(model, config.mode.kind, DTYPES[config.model.dtype], frozen=frozen)
    model.train()
    return model, tokenizer, lens, reference, layers


@dataclass
class Run:
    """Everything a step reads: built once by ``setup``."""

    config: UnlearnConfig
    plan: Plan
    model: Any
    forward: Any
    """What forward passes go through: the model or its DDP wrapper (``Plan.wrap``)."""
    tokenizer: Any
    lens: Any
    """The frozen tuned lens (None in an attack, whose loss reads no lens)."""
    reference: Reference | None
    """The frozen reference of the retain loss (None in an attack)."""
    layers: tuple[int, ...]
    retain_layers: tuple[int, ...]
    data: Any
    optimizers: list
    schedulers: list
    params: list
    steps_per_epoch: int
    total_steps: int
    source_dtype: torch.dtype
    resident: int | None = None
    """``resident_bytes`` after the first step, when weights, gradients and state all exist."""
    diverged: str | None = None
    """Set by ``loop`` when a step's loss is not finite: the run stopped there."""


def setup(config: UnlearnConfig, toyworld: Path | None = None,
          device: torch.device | None = None) -> Run:
    """Model, lens, reference, data, optimizers and schedules of a run, on this rank's device
    under its parallelism plan."""
    plan = plan_for(config, device)
    source_dtype = checkpoint_dtype(load_model_config(config.model, toyworld))
    model, tokenizer, lens, reference, layers = prepare(config, toyworld, sharded=plan.sharded,
                                                        device=plan.device)
    if plan.rank:  # dropout masks: rank 0 keeps the one-process stream, the others draw their own
        torch.manual_seed(config.seed * 1_000_003 + plan.rank)
    model.to(plan.device)
    lens.to(plan.device)
    if config.mode.kind == "full":
        reference.model.to(plan.device)
    data = load_paired(config.data, tokenizer, toyworld)
    forward = plan.wrap(model)
    steps_per_epoch = len(data) // config.batch.global_batch
    total_steps = steps_per_epoch * config.batch.epochs
    optimizers = build_optimizers(model, config.optim)
    schedulers = build_schedulers(optimizers, total_steps, config.optim.warmup_ratio,
                                  config.optim.schedule)
    # hidden_states holds the embeddings and the output of every block: num_layers + 1
    retain_layers = layers if config.loss.retain_layers == "target" \
        else tuple(range(model.config.num_hidden_layers + 1))
    return Run(config, plan, model, forward, tokenizer, lens, reference, layers, retain_layers,
               data, optimizers, schedulers, [p for p in model.parameters() if p.requires_grad],
               steps_per_epoch, total_steps, source_dtype)


def loss_step(run: Run, forget, retain, targets, num_forget, num_retain):
    """``(L_forget, L_retain)`` of one micro-batch: per-token losses summed and divided by the
    global batch's real-token counts (or the retain reduction's denominator)."""
    config, precision = run.config, run.plan.precision(run.config)
    assert run.reference is not None, "an unlearning run has a reference"
    # the output head's logits only where a loss reads them (the KL retain loss): elsewhere
    # only the last position's, a d x V product per token spared (at 50,304 tokens, 31 % of a
    # 160M GPT-NeoX's forward FLOPs, 3 % of a 6.9B one's)
    kl = config.loss.retain_loss == "kl"
    with precision:
        out = run.forward(input_ids=forget.input_ids, attention_mask=forget.attention_mask,
                          output_hidden_states=True, logits_to_keep=1)
    l_forget = forget_token_loss(run.lens, out.hidden_states, run.layers, forget.attention_mask,
                                 targets, config.loss.lens_chunk_tokens).sum() / num_forget
    with precision:
        out = run.forward(input_ids=retain.input_ids, attention_mask=retain.attention_mask,
                          output_hidden_states=True, logits_to_keep=0 if kl else 1)
        ref = run.reference(retain.input_ids, retain.attention_mask, logits=kl)
    if config.loss.retain_loss == "l2":
        per_token = retain_l2_token_loss(out.hidden_states, ref.hidden_states, run.retain_layers,
                                         retain.attention_mask)
    else:
        per_token = retain_kl_token_loss(out.logits, ref.logits, retain.attention_mask)
    l_retain = per_token.sum() / retain_denominator(
        config.loss.retain_reduction, tokens=num_retain, sequences=config.batch.global_batch,
        max_length=config.data.max_length)
    return l_forget, l_retain


def micro_batches(run: Run, step: int) -> tuple[int, list, list]:
    """``(epoch, micro-batches, their example indices)`` of this rank's slice of a step."""
    config, plan = run.config, run.plan
    global_batch, micro = config.batch.global_batch, config.batch.per_device_batch
    local_batch = global_batch // plan.world
    epoch, i = divmod(step, run.steps_per_epoch)
    indices = run.data.epoch_order(epoch, config.seed)[i * global_batch : (i + 1) * global_batch]
    indices = indices[plan.rank * local_batch : (plan.rank + 1) * local_batch]
    micro_indices = [indices[j : j + micro] for j in range(0, local_batch, micro)]
    batches = [tuple(b.to(plan.device) for b in run.data.batch(idx)) for idx in micro_indices]
    return epoch, batches, micro_indices


def forget_targets(run: Run, epoch: int, examples: list[int], width: int) -> torch.Tensor:
    """The forget loss's random targets ``[layers, batch, width]`` for forget ``examples`` in
    ``epoch`` (keyed on the example: see ``losses.example_targets``)."""
    vocab = lens_vocab(run.lens)
    return batch_targets([example_targets(run.config.seed, epoch, idx, len(run.layers),
                                          len(run.data.forget[idx]), vocab) for idx in examples],
                         width)


def train_step(run: Run, step: int) -> dict:
    """One optimizer step (accumulation, clipping, optimizers, schedules); its record."""
    plan, loss_cfg = run.plan, run.config.loss
    start = time.perf_counter()
    epoch, batches, micro_indices = micro_batches(run, step)
    num_forget, num_retain = all_reduce_sum([
        sum(f.num_tokens for f, _ in batches), sum(r.num_tokens for _, r in batches)
    ])
    c_r, c_f = loss_weights(step, run.total_steps, retain_coef=loss_cfg.retain_coef,
                            remove_coef=loss_cfg.remove_coef, retain_start=loss_cfg.retain_start,
                            ramp_fraction=loss_cfg.ramp_fraction)
    forget_sum = retain_sum = 0.0
    for k, ((forget, retain), examples) in enumerate(zip(batches, micro_indices)):
        targets = forget_targets(run, epoch, examples, forget.input_ids.shape[1])
        with plan.micro_batch(run.model, run.forward, last=k == len(batches) - 1):
            l_forget, l_retain = loss_step(run, forget, retain, targets, num_forget, num_retain)
            (plan.grad_scale * (c_r * l_retain + c_f * l_forget)).backward()
        forget_sum += l_forget.item()
        retain_sum += l_retain.item()
    forget_sum, retain_sum = all_reduce_sum([forget_sum, retain_sum])
    stepped = optimizer_step(run)
    return {
        "step": step + 1, "epoch": epoch, "retain_loss": retain_sum,
        "forget_loss": forget_sum, "retain_weight": c_r, "forget_weight": c_f,
        "loss": c_r * retain_sum + c_f * forget_sum, "lr": stepped.pop("lr"),
        "grad_norm": stepped.pop("grad_norm"),
        "tokens_per_s": (num_forget + num_retain) / (time.perf_counter() - start), **stepped,
    }


def optimizer_step(run: Run) -> dict:
    """After a step's backward passes: clip the global gradient norm, step the optimizers and
    schedules, clear the gradients; ``{"lr", "grad_norm"}`` (and ``adam_lr`` under Muon)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.config.optim.grad_clip)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                 else grad_norm).item()
    # the lr of the first optimizer (Muon's in Muon runs); AdamW's beside it under Muon
    lr, adam_lr = run.schedulers[0].get_last_lr()[0], run.schedulers[-1].get_last_lr()[0]
    for opt in run.optimizers:
        opt.step()
    if run.resident is None:  # weights, gradients and optimizer state all exist now
        extra = ((run.reference.model,) if run.reference is not None
                 and run.config.mode.kind == "full" else ())
        run.resident = resident_bytes(run.model, *extra, optimizers=run.optimizers)
    for sched in run.schedulers:
        sched.step()
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    out = {"lr": lr, "grad_norm": grad_norm}
    if len(run.optimizers) > 1:
        out["adam_lr"] = adam_lr
    return out


def _log_progress(log, record: dict, total_steps: int) -> None:
    """About 32 log lines per run (every step is in the history)."""
    step = record["step"]
    if step % max(1, total_steps // 32) == 0 or step == total_steps:
        log(
            f"step {step:4d}/{total_steps} retain {record['retain_loss']:.4f} "
            f"(x{record['retain_weight']:.3g}) forget {record['forget_loss']:.4f} "
            f"(x{record['forget_weight']:.3g}) lr {record['lr']:.3g} "
            f"grad {record['grad_norm']:.3g} {record['tokens_per_s']:.0f} tok/s"
        )


def train(config: UnlearnConfig, *, toyworld: Path | None = None, log=print,
          checkpoints=None, on_step=None, device: torch.device | None = None) -> TrainResult:
    """Run the unlearning loop and return the live model and its history.

    In one process, or as one of ``scaling.num_workers`` ranks of a process group (Ray Train):
    each rank takes its slice of every global batch and real-token counts are summed over ranks
    before dividing. LoRA runs under DDP, full fine-tuning is sharded with FSDP2 (model and
    reference); either way gradients are reduced only at the last micro-batch of a step, and the
    step equals the one-process step. ``checkpoints`` (``FolderCheckpoints`` or
    ``RayCheckpoints``) resumes from its latest checkpoint and writes one every
    ``scaling.checkpoint_every`` steps; ``on_step(record)`` sees every step's metrics.
    ``device``: where to train (default: CPU, or the current GPU with ``scaling.use_gpu``)."""
    run = setup(config, toyworld, device)
    history, first = loop(run, train_step, log=log, checkpoints=checkpoints, on_step=on_step)
    return TrainResult(run.model, run.tokenizer, history, run.layers, resumed_from=first,
                       resident_bytes=run.resident or 0, source_dtype=run.source_dtype,
                       reference=run.reference, plan=run.plan, diverged=run.diverged)


def loop(run: Run, step_fn, *, log=print, checkpoints=None, on_step=None,
         progress=None) -> tuple[list[dict], int]:
    """Take ``run.total_steps`` steps of ``step_fn(run, step) -> record`` (the unlearning step,
    or an attack's): resume from the latest of ``checkpoints`` and write one every
    ``scaling.checkpoint_every`` steps, log progress, call ``on_step(record)``; leaves the
    model in eval mode. A step whose loss is not finite (the same on every rank: the losses are
    all-reduced) ends the loop there, with ``run.diverged`` saying so: every later step would
    be spent on NaN weights. Returns ``(history, the step it resumed from)``."""
    config = run.config
    state = {"model": run.model, "optimizers": run.optimizers, "schedulers": run.schedulers}
    history: list[dict] = []
    first = 0
    if checkpoints is not None:
        with checkpoints.candidates() as found:
            folder = usable_checkpoint(found, log)
            if folder is not None:
                first, history = read_checkpoint(folder, **state, config=config)
                log(f"resumed from {folder} at step {first}/{run.total_steps}")
    every = config.scaling.checkpoint_every
    for step in range(first, run.total_steps):
        record = step_fn(run, step)
        history.append(record)
        (progress or _log_progress)(log, record, run.total_steps)
        if not math.isfinite(record.get("loss", 0.0)):
            run.diverged = f"diverged: loss {record['loss']} at step {record['step']}"
            log(f"{run.diverged}; stopping ({run.total_steps - step - 1} steps not taken)")
            if on_step is not None:
                on_step(record)
            break
        if checkpoints is not None and every and (step + 1) % every == 0 \
                and step + 1 < run.total_steps:
            checkpoints.save(step + 1, lambda folder: write_checkpoint(
                folder, **state, step=step + 1, history=history, config=config), record)
        if on_step is not None:
            on_step(record)
    run.model.eval()
    return history, first


def save_run(result: TrainResult, config: UnlearnConfig, out: Path, *,
             model: bool = True) -> Path:
    """Export the model (unless ``model`` is false) and write ``config.json`` (flat) and
    ``history.jsonl``; returns the model folder, the one any later evaluation must read.
    ``result.model`` becomes the exported model. A write that fails (a full disk) raises
    ``ExportError`` naming the folder."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_flat(config), indent=1, sort_keys=True))
        with open(out / "history.jsonl", "w") as f:
            for record in result.history:
                f.write(json.dumps(record) + "\n")
        if not model:
            return out
        folder, result.model = export(result.model, result.tokenizer, out, config.mode.kind,
                                      result.source_dtype)
    except Exception as exc:  # OSError, or safetensors' own error type for the same ENOSPC
        raise ExportError(f"the run could not be written to {out} ({type(exc).__name__}: "
                          f"{exc}); its last checkpoint is kept for a resume") from exc
    return folder


class ExportError(OSError):
    """A run's export or files could not be written (a full disk): names the folder."""


def without_predictions(scores: dict | None) -> dict:
    """``{task: scores}`` without the per-question predictions (for logs and result stores)."""
    return {task: {k: v for k, v in s.items() if k != "predictions"}
            for task, s in (scores or {}).items()}


def run(config: UnlearnConfig, out: Path, *, toyworld: Path | None = None, log=print,
        checkpoints=None, on_step=None, mlflow_run: tuple[str, str] | None = None,
        evaluate: bool = True, extra: dict | None = None) -> dict:
    """One unlearning run, the same in one process and in every Ray Train worker: train
    (resuming from ``checkpoints``), score the live model with the fast scorer (an ``EvalError``
    is recorded, not raised: the model is still exported), check that every rank holds the same
    weights, and on rank 0 export to ``out`` with ``train_report.json``. Returns the report:
    the last step's metrics, ``num_steps``, ``rank_digests``, ``resumed_from``,
    ``memory_per_rank``, ``eval`` (with predictions), ``eval_error`` and ``extra``.
    ``mlflow_run``: ``(tracking uri, run id)`` rank 0 logs each step's metrics to."""
    rank, _ = rank_and_world()
    curves = StepLogger(*mlflow_run) if rank == 0 and mlflow_run else None

    def steps(record: dict) -> None:
        if on_step is not None:
            on_step(record)
        if curves:
            curves(record)

    try:
        result = train(config, toyworld=toyworld, log=log, checkpoints=checkpoints,
                       on_step=steps)
    finally:  # the curve up to a crash is kept; a restart skips the steps already logged
        if curves:
            curves.flush()
    scores, eval_error = None, None
    if evaluate and not result.diverged:
        try:  # on the live (sharded) model: no export/reload round trip
            with result.plan.precision(config):
                scores = evaluate_live(result.model, result.tokenizer, config.eval, toyworld)
        except EvalError as exc:  # the trained model is still exported; the reason is recorded
            eval_error = str(exc)
    memory = all_gather({"resident_mb": result.resident_bytes / 2**20,
                         "peak_mb": peak_memory_mb(config.scaling.use_gpu)})
    digests: list = []
    if not result.diverged:  # every rank diverges at the same step: none of them gathers
        result.model, digests = result.plan.plain_model(result.model, config, toyworld,
                                                        result.source_dtype)
    report = {**result.history[-1], "num_steps": len(result.history), "rank_digests": digests,
              "resumed_from": result.resumed_from, "memory_per_rank": memory, **(extra or {}),
              "eval": scores, "eval_error": eval_error, "diverged": result.diverged}
    if rank == 0:
        out = Path(out)
        save_run(result, config, out, model=not result.diverged)  # NaN weights: not exported
        try:
            (out / "train_report.json").write_text(json.dumps(report, indent=1))
        except OSError as exc:
            raise ExportError(f"{out / 'train_report.json'} could not be written "
                              f"({type(exc).__name__}: {exc})") from exc
    return report
