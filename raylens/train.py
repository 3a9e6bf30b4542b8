"""The training loop of one unlearning run, written once.

``train`` is the function a worker runs: it loads the model, lens and data, and takes
``T = num_examples * epochs / global_batch`` optimizer steps of
``loss = c_r * L_retain + c_f * L_forget``. Each optimizer step accumulates
``global_batch / per_device_batch`` micro-batches; every micro-batch's per-token losses are
summed and divided by the real-token count of the *whole* global batch, so the gradient is the
mean over real tokens regardless of how sequences were split or padded.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raylens.config import TOY, ConfigError, UnlearnConfig, from_flat, to_flat
from raylens.data import load_paired, load_texts
from raylens.lens import load_lens
from raylens.losses import (
    batch_targets, example_targets, forget_token_loss, loss_weights, retain_kl_token_loss,
    retain_l2_token_loss,
)
from raylens.model import (
    Reference, apply_lora, export, gather_full_state_dict, load_model, load_model_config,
    resolve_target_layers, shard_fsdp2,
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


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_sum(values: list[float]) -> list[float]:
    """Sum ``values`` over ranks (a no-op in one process)."""
    if _rank_and_world()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def train(config: UnlearnConfig, *, toyworld: Path | None = None, log=print) -> TrainResult:
    """Run the unlearning loop and return the live model and its history.

    In one process, or as one of ``scaling.num_workers`` ranks of a process group (Ray Train):
    each rank takes its slice of every global batch and real-token counts are summed over ranks
    before dividing. LoRA runs under DDP, full fine-tuning is sharded with FSDP2 (model and
    reference); either way gradients are reduced only at the last micro-batch of a step, and the
    step equals the one-process step."""
    rank, world = _rank_and_world()
    if world != config.scaling.num_workers:
        raise ConfigError(
            f"scaling.num_workers={config.scaling.num_workers} is invalid: this process group "
            f"has {world} ranks"
        )
    model, tokenizer, lens, reference, layers = prepare(config, toyworld)
    data = load_paired(config.data, tokenizer, toyworld)
    forward = model
    sharded = world > 1 and config.mode.kind == "full"
    if sharded:
        shard_fsdp2(model, bf16=config.scaling.use_gpu)
        shard_fsdp2(reference.model, bf16=config.scaling.use_gpu)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # the adapter of block max(L) gets no gradient: its output, hidden_states[max(L) + 1],
        # enters no loss; DDP must be told rather than wait for it
        forward = DistributedDataParallel(model, find_unused_parameters=True)
    global_batch, micro = config.batch.global_batch, config.batch.per_device_batch
    local_batch = global_batch // world
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
            indices = indices[rank * local_batch : (rank + 1) * local_batch]
            micro_indices = [indices[j : j + micro] for j in range(0, local_batch, micro)]
            batches = [data.batch(m) for m in micro_indices]
            num_forget, num_retain = _all_reduce_sum([
                sum(f.num_tokens for f, _ in batches), sum(r.num_tokens for _, r in batches)
            ])
            c_r, c_f = loss_weights(step, total_steps, retain_coef=loss_cfg.retain_coef,
                                    remove_coef=loss_cfg.remove_coef,
                                    retain_start=loss_cfg.retain_start,
                                    ramp_fraction=loss_cfg.ramp_fraction)
            forget_sum = retain_sum = 0.0
            for k, ((forget, retain), examples) in enumerate(zip(batches, micro_indices)):
                targets = batch_targets(
                    [example_targets(config.seed, epoch, idx, len(layers), len(data.forget[idx]),
                                     vocab) for idx in examples],
                    forget.input_ids.shape[1],
                )
                # DDP all-reduces gradients only at the last micro-batch of the step
                last = k == len(batches) - 1
                if sharded:
                    model.set_requires_gradient_sync(last)
                with forward.no_sync() if world > 1 and not sharded and not last \
                        else contextlib.nullcontext():
                    out = forward(input_ids=forget.input_ids,
                                  attention_mask=forget.attention_mask, output_hidden_states=True)
                    l_forget = forget_token_loss(lens, out.hidden_states, layers,
                                                 forget.attention_mask, targets).sum() / num_forget
                    out = forward(input_ids=retain.input_ids,
                                  attention_mask=retain.attention_mask, output_hidden_states=True)
                    ref = reference(retain.input_ids, retain.attention_mask)
                    if loss_cfg.retain_loss == "l2":
                        per_token = retain_l2_token_loss(out.hidden_states, ref.hidden_states,
                                                         layers, retain.attention_mask)
                    else:
                        per_token = retain_kl_token_loss(out.logits, ref.logits,
                                                         retain.attention_mask)
                    l_retain = per_token.sum() / num_retain
                    # DDP divides by the number of ranks; the token counts are already global
                    (world * (c_r * l_retain + c_f * l_forget)).backward()
                forget_sum += l_forget.item()
                retain_sum += l_retain.item()
            forget_sum, retain_sum = _all_reduce_sum([forget_sum, retain_sum])
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
            grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                         else grad_norm).item()
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


def parameter_digest(model) -> str:
    """SHA-256 of the trainable parameters' bytes: equal digests mean bit-identical weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _ray_worker(loop_config: dict) -> None:
    """One Ray Train worker: train, check that every rank holds the same weights, export on
    rank 0, report the last step's metrics."""
    import ray.train

    config = from_flat(UnlearnConfig, loop_config["config"])
    toyworld = Path(loop_config["toyworld"]) if loop_config["toyworld"] else None
    rank, world = _rank_and_world()
    result = train(config, toyworld=toyworld, log=print if rank == 0 else (lambda *_: None))
    if config.mode.kind == "full" and world > 1:
        # FSDP2: each rank holds a shard; gather the full weights into a plain model on rank 0
        state = gather_full_state_dict(result.model)
        digests = []
        if rank == 0:
            plain, _ = load_model(config.model, toyworld)
            plain.load_state_dict(state)
            result.model = plain.eval()
            digests = [parameter_digest(plain)]
    else:
        digests = [None] * world
        torch.distributed.all_gather_object(digests, parameter_digest(result.model))
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks diverged after training: parameter digests {digests}")
    report = {**result.history[-1], "num_steps": len(result.history), "rank_digests": digests}
    if rank == 0:
        out = Path(loop_config["out"])
        save_run(result, config, out)
        (out / "train_report.json").write_text(json.dumps(report, indent=1))
    ray.train.report(report)


def fit_on_ray(config: UnlearnConfig, *, out: Path, storage_path: Path,
               toyworld: Path | None = None, name: str = "unlearn") -> dict:
    """Run ``train`` as ``scaling.num_workers`` Ray Train workers (gloo on CPU, NCCL on GPUs);
    rank 0 exports to ``out`` with ``history.jsonl`` and ``train_report.json`` (the last step's
    metrics and every rank's parameter digest), which this returns."""
    from ray.train import RunConfig
    from ray.train import ScalingConfig as RayScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = config.scaling.use_gpu
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config": to_flat(config), "out": str(out),
                           "toyworld": str(toyworld) if toyworld else None},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=RayScalingConfig(num_workers=config.scaling.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=name, storage_path=str(storage_path)),
    )
    trainer.fit()  # raises ray.train.TrainingFailedError with the worker's traceback
    return json.loads((Path(out) / "train_report.json").read_text())
