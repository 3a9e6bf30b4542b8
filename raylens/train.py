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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raylens.collectives import all_gather, all_reduce_sum, any_rank, rank_and_world
from raylens.config import TOY, ConfigError, EvalConfig, UnlearnConfig, from_flat, to_flat
from raylens.data import load_paired, load_texts
from raylens.evaluate import Deadline, EvalError, accuracy, choice_logliks, load_questions, predictions, shard
from raylens.lens import load_lens
from raylens.losses import (
    batch_targets, example_targets, forget_token_loss, loss_weights, retain_denominator,
    retain_kl_token_loss, retain_l2_token_loss,
)
from raylens.model import (
    DTYPES, Reference, apply_lora, checkpoint_dtype, compute_context, export,
    gather_full_state_dict, load_model, load_model_config, load_sharded, load_tokenizer,
    master_dtype, resolve_target_layers,
)
from raylens.optim import build_optimizers, build_schedulers
from raylens.tracking import STEP_METRICS, StepLogger


@dataclass
class TrainResult:
    """The trained (live) model, its tokenizer, and one record per optimizer step."""

    model: object
    tokenizer: object
    history: list[dict] = field(default_factory=list)
    target_layers: tuple[int, ...] = ()
    resumed_from: int = 0
    """The checkpoint step this run continued from (0: started fresh)."""
    resident_bytes: int = 0
    """This rank's parameters, gradients and optimizer state after the first step (the frozen
    full-mode reference included), local shards only."""
    source_dtype: torch.dtype = torch.float32
    """The dtype of the source checkpoint: the export is written in it."""
    reference: object = None
    """The frozen reference the retain loss compared against."""


def lens_source(config: UnlearnConfig, toyworld: Path | None) -> str:
    """The lens's folder or hub id (``toy``: the toy world's lens folder)."""
    if config.lens.name_or_path == TOY:
        return str(Path(toyworld) / "lens")
    return config.lens.name_or_path


def validate(config: UnlearnConfig, toyworld: Path | None = None) -> tuple[int, ...]:
    """Check what needs the model's shape and the corpora, without loading weights; returns the
    target layers. Raises ``ConfigError`` naming the field, so a run fails before any compute."""
    model_config = load_model_config(config.model, toyworld)
    layers = resolve_target_layers(config.loss.target_layers, model_config.num_hidden_layers)
    load_texts(config.data, toyworld)
    _eval_questions(config.eval, load_tokenizer(config.model, toyworld), toyworld, model_config)
    return layers


def _eval_questions(ev: EvalConfig, tokenizer, toyworld: Path | None, model_config):
    return load_questions(ev.tasks, tokenizer, toyworld=toyworld, data_dir=ev.data_dir,
                          subset=ev.subset, seed=ev.subset_seed,
                          max_length=getattr(model_config, "max_position_embeddings", None))


def evaluate_live(model, tokenizer, ev: EvalConfig,
                  toyworld: Path | None = None) -> dict[str, dict]:
    """Score the live model (plain, LoRA or FSDP2-sharded) with the fast scorer, inside the run:
    each rank scores its share of the questions and the log-likelihoods are gathered, so every
    rank returns the same ``{task: {"acc", "acc_stderr", "n", "subset", "predictions"}}``."""
    rank, world = rank_and_world()
    questions = _eval_questions(ev, tokenizer, toyworld, model.config)
    deadline = Deadline(ev.tasks, ev.time_limit_s)

    def before_batch(done: str) -> None:
        # every rank stops at the same batch: a rank leaving alone would strand the others in
        # a collective forward (FSDP2) or gather (DDP)
        if any_rank(deadline.expired()):
            raise deadline.error(done)

    results = {}
    for task, qs in questions.items():
        mine = shard(qs, rank, world)
        logliks = choice_logliks(model, [qs[i] for i in mine], batch_size=ev.batch_size,
                                 before_batch=before_batch)
        if world > 1:
            parts = all_gather(list(zip(mine, logliks)))
            merged = dict(pair for part in parts for pair in part)
            logliks = [merged[i] for i in range(len(qs))]
        results[task] = {**accuracy(qs, logliks), "subset": ev.subset,
                         "chance": sum(1 / len(q.choices) for q in qs) / len(qs),
                         "predictions": predictions(logliks)}
    return results


def evaluate_base(config: UnlearnConfig, toyworld: Path | None = None) -> dict[str, dict]:
    """The unmodified model scored as every trial is (fast scorer, same tasks and subset):
    ``{task: {"acc", "acc_stderr", "n", "chance"}}``, the baseline a sweep is compared with."""
    model, tokenizer = load_model(config.model, toyworld)
    model = model.to(_device(config)).eval()
    scores = evaluate_live(model, tokenizer, config.eval, toyworld)
    return {task: {k: v for k, v in s.items() if k != "predictions"} for task, s in scores.items()}


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


def _sharded(config: UnlearnConfig) -> bool:
    """Whether the model is sharded with FSDP2: full fine-tuning in a process group."""
    return config.mode.kind == "full" and torch.distributed.is_initialized()


def _device(config: UnlearnConfig) -> torch.device:
    """CPU, or the GPU this process owns: Ray Train's (the one it made current, which FSDP2's
    mesh uses) inside a Ray Train worker, else the current CUDA device."""
    if not config.scaling.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("scaling.use_gpu=True is invalid here: this process sees no CUDA device")
    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except (ImportError, RuntimeError, AssertionError):  # not inside a Ray Train worker
        return torch.device("cuda", torch.cuda.current_device())


# Keys that may change between a checkpoint and its resume: they steer fault tolerance, not the run.
_RESUMABLE_CHANGES = ("scaling.checkpoint_every", "scaling.keep_checkpoints",
                      "scaling.max_failures")


class FolderCheckpoints:
    """Checkpoints of a one-process run in ``root/step_NNNNNN``: written under a temporary name
    and renamed when complete, so a crash mid-write leaves the previous one; the newest ``keep``
    stay."""

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def _complete(self) -> list[Path]:
        import re

        found = [p for p in self.root.glob("step_*") if re.fullmatch(r"step_\d+", p.name)]
        return sorted(found)

    @contextlib.contextmanager
    def latest(self):
        done = self._complete()
        yield done[-1] if done else None

    def save(self, step: int, write, metrics: dict) -> None:
        import shutil

        tmp = self.root / f"step_{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        tmp.rename(self.root / f"step_{step:06d}")
        for old in self._complete()[:-self.keep]:
            shutil.rmtree(old)


class RayCheckpoints:
    """Checkpoints reported to Ray Train: each rank writes its shard to a local folder and Ray
    merges the folders into one checkpoint on the run's storage; a restarted worker group (or a
    rerun of the same run name) starts from the latest."""

    @contextlib.contextmanager
    def latest(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
        else:
            with checkpoint.as_directory() as folder:
                yield Path(folder)

    def save(self, step: int, write, metrics: dict) -> None:
        import tempfile

        import ray.train

        with tempfile.TemporaryDirectory(prefix=f"raylens-step{step}-") as tmp:
            write(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _state_dict_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: only the adapter (the frozen base is reloaded from its source); full: every weight
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _write_checkpoint(folder: Path, *, model, optimizers, schedulers, step: int,
                      history: list[dict], config: UnlearnConfig) -> None:
    """Everything a resume needs: sharded weights and optimizer state (torch.distributed.checkpoint,
    one file per rank), this rank's RNG, and on rank 0 the step, schedule and history (the data
    position is the step: epoch orders are a function of seed and epoch)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = rank_and_world()
    model_state, optim_state = get_state_dict(model, optimizers, options=_state_dict_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder),
             no_dist=world == 1)
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if config.scaling.use_gpu else torch.empty(0)}
    torch.save(rng, folder / f"rng_rank{rank}.pt")
    if rank == 0:
        meta = {"step": step, "world": world, "config": to_flat(config),
                "schedulers": [sched.state_dict() for sched in schedulers], "history": history}
        (folder / "trainer.json").write_text(json.dumps(meta))


def _read_checkpoint(folder: Path, *, model, optimizers, schedulers,
                     config: UnlearnConfig) -> tuple[int, list[dict]]:
    """Restore a checkpoint written by ``_write_checkpoint`` in place; ``(step, history)``.
    A checkpoint of a different run (config or worker count) is refused, naming the field."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rank, world = rank_and_world()
    meta = json.loads((folder / "trainer.json").read_text())
    if meta["world"] != world:
        raise ConfigError(
            f"scaling.num_workers={world} is invalid for resuming {folder}: allowed "
            f"{meta['world']}, the worker count that wrote it"
        )
    ours = to_flat(config)
    for key in sorted(set(ours) | set(meta["config"])):
        if key not in _RESUMABLE_CHANGES and ours.get(key) != meta["config"].get(key):
            raise ConfigError(
                f"{key}={ours.get(key)!r} is invalid for resuming {folder}: allowed "
                f"{meta['config'].get(key)!r}, the value of the run that wrote it (or start a "
                f"new run)"
            )
    model_state, optim_state = get_state_dict(model, optimizers, options=_state_dict_options())
    state = {"model": model_state, "optim": optim_state}
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    missing = [key for key in model_state if f"model.{key}" not in saved]
    if missing:
        raise ValueError(f"checkpoint {folder} lacks weights {missing[:3]} (of {len(missing)})")
    # parameters that never received a gradient (the adapter of block max(L); blocks above it
    # under the L2 retain loss) have no optimizer state to restore
    dcp.load(state, checkpoint_id=str(folder),
             planner=dcp.DefaultLoadPlanner(allow_partial_load=True), no_dist=world == 1)
    set_state_dict(model, optimizers, model_state_dict=state["model"],
                   optim_state_dict=state["optim"],
                   options=_state_dict_options(strict=False))  # frozen weights are not in it
    for sched, sched_state in zip(schedulers, meta["schedulers"]):
        sched.load_state_dict(sched_state)
    rng = torch.load(folder / f"rng_rank{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if config.scaling.use_gpu:
        torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"], meta["history"]


def _resident_bytes(*modules, optimizers=()) -> int:
    """Bytes of this rank's parameters, gradients and optimizer state (local shards only)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        t = t.to_local() if hasattr(t, "to_local") else t
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for module in modules:
        for p in module.parameters():
            add(p.detach())
            if p.grad is not None:
                add(p.grad)
    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                add(value)
    return total


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
    rank, world = rank_and_world()
    if world != config.scaling.num_workers:
        raise ConfigError(
            f"scaling.num_workers={config.scaling.num_workers} is invalid: this process group "
            f"has {world} ranks"
        )
    device = device or _device(config)
    source_dtype = checkpoint_dtype(load_model_config(config.model, toyworld))
    # full fine-tuning in a process group is sharded with FSDP2 (one rank included: the same
    # code as N ranks); LoRA runs under DDP
    sharded = _sharded(config)
    model, tokenizer, lens, reference, layers = prepare(config, toyworld, sharded=sharded,
                                                        device=device)
    if rank:  # dropout masks: rank 0 keeps the one-process stream, the others draw their own
        torch.manual_seed(config.seed * 1_000_003 + rank)
    model.to(device)
    lens.to(device)
    if config.mode.kind == "full":
        reference.model.to(device)
    data = load_paired(config.data, tokenizer, toyworld)
    forward = model
    if world > 1 and not sharded:
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
    history: list[dict] = []
    first = 0
    if checkpoints is not None:
        with checkpoints.latest() as folder:
            if folder is not None:
                first, history = _read_checkpoint(folder, model=model, optimizers=optimizers,
                                                  schedulers=schedulers, config=config)
                log(f"resumed from {folder} at step {first}/{total_steps}")
    log_every = max(1, total_steps // 32)  # ~32 log lines per run; every step is in history
    vocab = lens.unembed.unembedding.out_features
    loss_cfg = config.loss
    # hidden_states holds the embeddings and the output of every block: num_layers + 1
    retain_layers = layers if loss_cfg.retain_layers == "target" \
        else tuple(range(model.config.num_hidden_layers + 1))
    every = config.scaling.checkpoint_every
    resident = None
    precision = compute_context(config.model, config.mode.kind, device, sharded=sharded)
    for step in range(first, total_steps):
        epoch, i = divmod(step, steps_per_epoch)
        start = time.perf_counter()
        indices = data.epoch_order(epoch, config.seed)[i * global_batch : (i + 1) * global_batch]
        indices = indices[rank * local_batch : (rank + 1) * local_batch]
        micro_indices = [indices[j : j + micro] for j in range(0, local_batch, micro)]
        batches = [(f.to(device), r.to(device)) for f, r in map(data.batch, micro_indices)]
        num_forget, num_retain = all_reduce_sum([
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
                with precision:
                    out = forward(input_ids=forget.input_ids,
                                  attention_mask=forget.attention_mask, output_hidden_states=True)
                l_forget = forget_token_loss(lens, out.hidden_states, layers,
                                             forget.attention_mask, targets).sum() / num_forget
                with precision:
                    out = forward(input_ids=retain.input_ids,
                                  attention_mask=retain.attention_mask, output_hidden_states=True)
                    ref = reference(retain.input_ids, retain.attention_mask)
                if loss_cfg.retain_loss == "l2":
                    per_token = retain_l2_token_loss(out.hidden_states, ref.hidden_states,
                                                     retain_layers, retain.attention_mask)
                else:
                    per_token = retain_kl_token_loss(out.logits, ref.logits,
                                                     retain.attention_mask)
                l_retain = per_token.sum() / retain_denominator(
                    loss_cfg.retain_reduction, tokens=num_retain, sequences=global_batch,
                    max_length=config.data.max_length)
                # DDP divides by the number of ranks; the token counts are already global
                (world * (c_r * l_retain + c_f * l_forget)).backward()
            forget_sum += l_forget.item()
            retain_sum += l_retain.item()
        forget_sum, retain_sum = all_reduce_sum([forget_sum, retain_sum])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                     else grad_norm).item()
        # the lr of the first optimizer (Muon's in Muon runs); AdamW's beside it under Muon
        lr, adam_lr = schedulers[0].get_last_lr()[0], schedulers[-1].get_last_lr()[0]
        for opt in optimizers:
            opt.step()
        if resident is None:  # weights, gradients and optimizer state all exist now
            extra = (reference.model,) if config.mode.kind == "full" else ()
            resident = _resident_bytes(model, *extra, optimizers=optimizers)
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
        if len(optimizers) > 1:
            record["adam_lr"] = adam_lr
        history.append(record)
        if (step + 1) % log_every == 0 or step + 1 == total_steps:
            log(
                f"step {step + 1:4d}/{total_steps} retain {retain_sum:.4f} (x{c_r:.3g}) "
                f"forget {forget_sum:.4f} (x{c_f:.3g}) lr {lr:.3g} grad {grad_norm:.3g} "
                f"{record['tokens_per_s']:.0f} tok/s"
            )
        if checkpoints is not None and every and (step + 1) % every == 0 \
                and step + 1 < total_steps:
            checkpoints.save(step + 1, lambda folder: _write_checkpoint(
                folder, model=model, optimizers=optimizers, schedulers=schedulers,
                step=step + 1, history=history, config=config), record)
        if on_step is not None:
            on_step(record)
    model.eval()
    return TrainResult(model, tokenizer, history, layers, resumed_from=first,
                       resident_bytes=resident or 0, source_dtype=source_dtype,
                       reference=reference)


def save_run(result: TrainResult, config: UnlearnConfig, out: Path) -> Path:
    """Export the model and write ``config.json`` (flat) and ``history.jsonl``; returns the model
    folder, the one any later evaluation must read. ``result.model`` becomes the exported model."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_flat(config), indent=1, sort_keys=True))
    with open(out / "history.jsonl", "w") as f:
        for record in result.history:
            f.write(json.dumps(record) + "\n")
    folder, result.model = export(result.model, result.tokenizer, out, config.mode.kind,
                                  result.source_dtype)
    return folder


def parameter_digest(model) -> str:
    """SHA-256 of the trainable parameters' bytes: equal digests mean bit-identical weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            # the raw bytes: numpy has no bfloat16, and a cast could hide a difference
            digest.update(param.detach().cpu().contiguous().flatten().view(torch.uint8)
                          .numpy().tobytes())
    return digest.hexdigest()


def _peak_memory_mb(use_gpu: bool) -> float:
    """This process's peak memory: allocated CUDA memory on GPU, resident set size on CPU."""
    if use_gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


class RayStepMetrics:
    """Each step's record as Prometheus gauges through ``ray.util.metrics``: Ray exports them
    as ``ray_raylens_<name>`` tagged with ``run`` (the Ray Train run name: the trial id), which
    the Grafana dashboard in ``dashboards/`` plots beside Ray's own metrics."""

    NAMES = ("step", *STEP_METRICS)

    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run}
        self.gauges = {name: Gauge(f"raylens_{name}", tag_keys=("run",),
                                   description=f"raylens training: {name} of the latest step")
                       for name in self.NAMES}

    def __call__(self, record: dict) -> None:
        for name, gauge in self.gauges.items():
            value = record.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(float(value), tags=self.tags)


def _ray_worker(loop_config: dict) -> None:
    """One Ray Train worker: train (resuming from Ray's latest checkpoint, if any), check that
    every rank holds the same weights, export on rank 0, report the last step's metrics."""
    import ray.train

    config = from_flat(UnlearnConfig, loop_config["config"])
    toyworld = Path(loop_config["toyworld"]) if loop_config["toyworld"] else None
    rank, world = rank_and_world()
    metrics = RayStepMetrics(loop_config["name"]) if rank == 0 else None
    curves = StepLogger(*loop_config["mlflow"]) if rank == 0 and loop_config.get("mlflow") \
        else None

    def on_step(record: dict) -> None:  # rank 0: Prometheus gauges and MLflow curves
        if metrics:
            metrics(record)
        if curves:
            curves(record)

    device = _device(config)
    try:
        result = train(config, toyworld=toyworld, log=print if rank == 0 else (lambda *_: None),
                       checkpoints=RayCheckpoints(), on_step=on_step, device=device)
    finally:  # the curve up to a crash is kept; a restart skips the steps already logged
        if curves:
            curves.flush()
    scores, eval_error = None, None
    if loop_config.get("evaluate"):
        try:  # on the live (sharded) model: no export/reload round trip
            with compute_context(config.model, config.mode.kind, device,
                                 sharded=_sharded(config)):
                scores = evaluate_live(result.model, result.tokenizer, config.eval, toyworld)
        except EvalError as exc:  # the trained model is still exported; the reason is recorded
            eval_error = str(exc)
    memory = all_gather({"resident_mb": result.resident_bytes / 2**20,
                         "peak_mb": _peak_memory_mb(config.scaling.use_gpu)})
    import ray.util

    nodes = all_gather(ray.util.get_node_ip_address())  # where each rank ran
    if _sharded(config):
        # FSDP2: each rank holds a shard; gather the full weights into a plain model on rank 0
        state = gather_full_state_dict(result.model)
        digests = []
        if rank == 0:
            # in the export's dtype: load_state_dict casts the fp32 master weights into it
            plain, _ = load_model(config.model, toyworld, dtype=result.source_dtype)
            plain.load_state_dict(state)
            result.model = plain.eval()
            digests = [parameter_digest(plain)]
    else:
        digests = all_gather(parameter_digest(result.model))
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks diverged after training: parameter digests {digests}")
    report = {**result.history[-1], "num_steps": len(result.history), "rank_digests": digests,
              "resumed_from": result.resumed_from, "memory_per_rank": memory,
              "node_per_rank": nodes,
              "eval": scores, "eval_error": eval_error}
    if rank == 0:
        out = Path(loop_config["out"])
        save_run(result, config, out)
        (out / "train_report.json").write_text(json.dumps(report, indent=1))
    # per-question predictions stay in the file; Ray's logs and result store get the rest
    slim = {k: v for k, v in report.items() if k != "eval"}
    slim["eval"] = {task: {k: v for k, v in s.items() if k != "predictions"}
                    for task, s in (scores or {}).items()}
    ray.train.report(slim)


def fit_on_ray(config: UnlearnConfig, *, out: Path, storage_path: Path,
               toyworld: Path | None = None, name: str = "unlearn",
               evaluate: bool = True, mlflow_run: tuple[str, str] | None = None) -> dict:
    """Run ``train`` as ``scaling.num_workers`` Ray Train workers (gloo on CPU, NCCL on GPUs);
    rank 0 exports to ``out`` with ``history.jsonl`` and ``train_report.json`` (the last step's
    metrics, every rank's parameter digest and memory, the step it resumed from, and with
    ``evaluate`` the fast scorer's results on the live model or the error that stopped it),
    which this returns. Checkpoints go to ``storage_path/name``: a failed worker group is restarted from the
    last one up to ``scaling.max_failures`` times, and a new call with the same ``name`` and
    ``storage_path`` continues an interrupted run. ``mlflow_run``: ``(tracking uri, run id)``
    that rank 0 logs each step's metrics to; every run exports them to Ray's Prometheus metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = config.scaling.use_gpu
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config": to_flat(config), "out": str(out), "evaluate": evaluate,
                           "toyworld": str(toyworld) if toyworld else None, "name": name,
                           "mlflow": list(mlflow_run) if mlflow_run else None},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=RayScalingConfig(num_workers=config.scaling.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=name, storage_path=str(storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=config.scaling.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.scaling.max_failures)),
    )
    trainer.fit()  # raises ray.train.TrainingFailedError with the worker's traceback
    return json.loads((Path(out) / "train_report.json").read_text())
