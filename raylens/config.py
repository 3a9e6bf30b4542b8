"""Typed settings for every part of raylens, validated on construction.

No torch and no ray here: a config must be buildable (and rejected) before any compute starts.
Every section is a frozen dataclass; a bad value raises ``ValueError`` naming the dotted field
(``loss.retain_coef``), the value given and what is allowed. ``to_flat``/``from_flat`` convert a
config to a flat ``{"section.field": value}`` dict and back without loss, for MLflow params
(which come back as strings) and Ray Tune search spaces.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

TOY = "toy"
"""Source name meaning "the embedded toy world" for models, lenses and corpora."""


class ConfigError(ValueError):
    """A setting is invalid; the message names the field, the value and what is allowed."""


def _fail(section: str, name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{section}.{name}={value!r} is invalid: allowed {allowed}")


def _check_positive(section: str, name: str, value: Any, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        _fail(section, name, value, f"a positive {'integer' if integer else 'number'}")


def _check_nonneg(section: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        _fail(section, name, value, "a number >= 0")


def _check_fraction(section: str, name: str, value: Any, *, closed_low: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0 <= value <= 1 if closed_low else 0 < value <= 1)
    if not ok:
        _fail(section, name, value, f"a number in {'[' if closed_low else '('}0, 1]")


def _check_choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(section, name, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_text(section: str, name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        _fail(section, name, value, "a non-empty string")


SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""Sweep names: they become folder names, an MLflow experiment and an Optuna study."""


def url_password(url: str) -> str | None:
    """The password a URL carries in its ``user:password@`` part, if any."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(str(url)).password
    except ValueError:
        return None


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to print and log)."""
    from urllib.parse import urlsplit

    parts = urlsplit(str(url))
    if parts.password is None:
        return str(url)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True)
class ModelConfig:
    """The model to unlearn."""

    _section: ClassVar[str] = "model"
    name_or_path: str = TOY
    """Hub id (``EleutherAI/deep-ignorance-unfiltered``), local folder, or ``toy``."""
    revision: str | None = None
    """Hub revision; ignored for folders and the toy world."""
    dtype: str = "float32"
    """Compute dtype: float32, bfloat16 or float16. Full fine-tuning trains fp32 master
    weights and optimizer state and computes in this dtype (FSDP2 mixed precision, or autocast
    in one process), its frozen reference held in it; LoRA holds the frozen base in it and the
    adapter in fp32. The export is written in the source checkpoint's dtype (docs/method.md)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    def __post_init__(self) -> None:
        _check_text(self._section, "name_or_path", self.name_or_path)
        _check_choice(self._section, "dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass(frozen=True)
class LensConfig:
    """The frozen tuned lens whose predictions are unlearned."""

    _section: ClassVar[str] = "lens"
    name_or_path: str = TOY
    """Hub id (``EleutherAI/deep-ignorance-unfiltered-lens``), local folder, or ``toy``."""
    revision: str | None = None
    """Hub revision; ignored for folders and the toy world."""

    def __post_init__(self) -> None:
        _check_text(self._section, "name_or_path", self.name_or_path)


@dataclass(frozen=True)
class DataConfig:
    """Forget and retain corpora: hub datasets, local JSONL files with a ``text`` field, or ``toy``."""

    _section: ClassVar[str] = "data"
    forget: str = TOY
    """Forget corpus: ``Unlearning/WMDP-Bio-Remove-Dataset``, a JSONL path, or ``toy``."""
    forget_fields: tuple[str, ...] = ("title", "abstract", "text")
    """Hub forget columns joined by blank lines into one document (JSONL uses ``text``)."""
    retain: str = TOY
    """Retain corpus: ``EleutherAI/wikitext_document_level``, a JSONL path, or ``toy``."""
    retain_subset: str | None = "wikitext-103-raw-v1"
    """Hub dataset configuration of the retain corpus."""
    retain_field: str = "page"
    """Hub retain column (JSONL uses ``text``)."""
    retain_shuffle_seed: int = 42
    """A hub retain corpus is shuffled with ``datasets.Dataset.shuffle(seed=...)`` (the seed's
    order) before the first examples are taken; JSONL files are read in order."""
    num_examples: int = 1024
    """Forget/retain pairs used for training (forget i is paired with retain i)."""
    max_length: int = 2048
    """Documents are truncated to this many tokens."""

    def __post_init__(self) -> None:
        s = self._section
        _check_text(s, "forget", self.forget)
        _check_text(s, "retain", self.retain)
        if not self.forget_fields or not all(isinstance(f, str) and f for f in self.forget_fields):
            _fail(s, "forget_fields", self.forget_fields, "a non-empty list of column names")
        _check_text(s, "retain_field", self.retain_field)
        if isinstance(self.retain_shuffle_seed, bool) or not isinstance(self.retain_shuffle_seed, int):
            _fail(s, "retain_shuffle_seed", self.retain_shuffle_seed, "an integer")
        _check_positive(s, "num_examples", self.num_examples, integer=True)
        _check_positive(s, "max_length", self.max_length, integer=True)


@dataclass(frozen=True)
class LossConfig:
    """The unlearning objective and its schedules."""

    _section: ClassVar[str] = "loss"
    target_layers: tuple[int, ...] | None = None
    """Layers whose lens predictions are unlearned; None = every n_layers//6-th layer (5..30 of 32)."""
    retain_coef: float = 5.0
    """Final weight of the retain loss."""
    remove_coef: float = 5.0
    """Initial weight of the forget loss (it decays to 0.75x)."""
    retain_start: float = 0.25
    """Retain weight at step 0 as a fraction of ``retain_coef`` (r0)."""
    ramp_fraction: float = 1.0
    """Schedules ramp over this fraction of the optimizer steps (T_ramp / T)."""
    retain_loss: str = "l2"
    """``l2``: hidden-state distance to the reference; ``kl``: per-token output KL."""
    retain_layers: str = "target"
    """Hidden states the ``l2`` retain loss compares: ``target`` (the target layers) or ``all``
    (every hidden state the model returns, embeddings and final normed state included: the
    seed's LoRA runs)."""
    retain_reduction: str = "token"
    """What the summed retain loss is divided by, over the whole global batch: ``token`` (real
    tokens: the mean per token, whatever the padding and document lengths), ``sequence``
    (sequences: a sum per sequence, the seed's KL ``batchmean``) or ``padded_position``
    (sequences x ``data.max_length``: pads counted as zeros, the seed's LoRA ``nanmean``)."""

    def __post_init__(self) -> None:
        s = self._section
        if self.target_layers is not None:
            layers = self.target_layers
            if (
                not isinstance(layers, tuple)
                or not layers
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
                or len(set(layers)) != len(layers)
            ):
                _fail(s, "target_layers", layers, "None or distinct non-negative layer indices")
        _check_nonneg(s, "retain_coef", self.retain_coef)
        _check_nonneg(s, "remove_coef", self.remove_coef)
        if self.retain_coef == 0 and self.remove_coef == 0:
            _fail(s, "remove_coef", self.remove_coef, "a positive value when retain_coef is 0")
        _check_fraction(s, "retain_start", self.retain_start)
        _check_fraction(s, "ramp_fraction", self.ramp_fraction, closed_low=False)
        _check_choice(s, "retain_loss", self.retain_loss, ("l2", "kl"))
        _check_choice(s, "retain_layers", self.retain_layers, ("target", "all"))
        _check_choice(s, "retain_reduction", self.retain_reduction,
                      ("token", "sequence", "padded_position"))
        if self.retain_loss == "kl" and self.retain_layers != "target":
            _fail(s, "retain_layers", self.retain_layers, "'target' with retain_loss='kl' "
                  "(the KL compares output distributions, not hidden states)")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    _section: ClassVar[str] = "optim"
    name: str = "adamw"
    """``adamw`` for all parameters, or ``muon`` (Muon for 2-D hidden matrices, AdamW for the rest)."""
    lr: float = 1e-3
    """AdamW learning rate (used when ``name`` is adamw)."""
    muon_lr: float = 0.02
    """Muon learning rate for the 2-D hidden matrices."""
    adam_lr: float = 3e-4
    """AdamW learning rate for embeddings, unembedding, norms and biases under Muon."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's (beta1, beta2); the seed's Muon runs used (0.9, 0.95) for their AdamW half."""
    muon_adjust_lr: str = "original"
    """How Muon scales ``muon_lr`` per matrix (``torch.optim.Muon``'s ``adjust_lr_fn``):
    ``original`` multiplies by sqrt(max(1, rows/cols)); ``match_rms_adamw`` by
    0.2 * sqrt(max(rows, cols)), giving updates the RMS of AdamW's, so ``muon_lr`` is on AdamW's
    scale (the seed's convention: on GPT-NeoX-6.9B its step is 12.8-25.6x the original's)."""
    warmup_ratio: float = 0.0
    """Fraction of steps of linear warmup before the linear decay to 0."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""

    def __post_init__(self) -> None:
        s = self._section
        _check_choice(s, "name", self.name, ("adamw", "muon"))
        for name in ("lr", "muon_lr", "adam_lr", "grad_clip"):
            _check_positive(s, name, getattr(self, name))
        betas = self.adam_betas
        if not (isinstance(betas, tuple) and len(betas) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                for b in betas)):
            _fail(s, "adam_betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.95]")
        _check_choice(s, "muon_adjust_lr", self.muon_adjust_lr, ("original", "match_rms_adamw"))
        _check_fraction(s, "warmup_ratio", self.warmup_ratio)
        if self.warmup_ratio == 1:
            _fail(s, "warmup_ratio", self.warmup_ratio, "a number in [0, 1)")
        _check_nonneg(s, "weight_decay", self.weight_decay)


@dataclass(frozen=True)
class ModeConfig:
    """What is trained: a LoRA adapter or all weights."""

    _section: ClassVar[str] = "mode"
    kind: str = "lora"
    """``lora`` (reference = adapter disabled) or ``full`` (reference = frozen copy in
    ``model.dtype``; fp32 master weights)."""
    lora_rank: int = 16
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: tuple[str, ...] | None = None
    """Module names to adapt; None = PEFT's default for the architecture."""

    def __post_init__(self) -> None:
        s = self._section
        _check_choice(s, "kind", self.kind, ("lora", "full"))
        _check_positive(s, "lora_rank", self.lora_rank, integer=True)
        _check_positive(s, "lora_alpha", self.lora_alpha)
        _check_fraction(s, "lora_dropout", self.lora_dropout)
        if self.lora_dropout == 1:
            _fail(s, "lora_dropout", self.lora_dropout, "a number in [0, 1)")
        mods = self.lora_target_modules
        if mods is not None and (
            not isinstance(mods, tuple) or not mods or not all(isinstance(m, str) and m for m in mods)
        ):
            _fail(s, "lora_target_modules", mods, "None or a non-empty list of module names")


@dataclass(frozen=True)
class BatchConfig:
    """Batching: global batch = per-device batch x workers x accumulation steps."""

    _section: ClassVar[str] = "batch"
    global_batch: int = 32
    """Sequences per optimizer step, summed over workers and accumulation."""
    per_device_batch: int = 8
    """Sequences per forward pass on one worker."""
    epochs: int = 1
    """Passes over the forget/retain pairs."""

    def __post_init__(self) -> None:
        for name in ("global_batch", "per_device_batch", "epochs"):
            _check_positive(self._section, name, getattr(self, name), integer=True)


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train workers of one trial."""

    _section: ClassVar[str] = "scaling"
    num_workers: int = 1
    """Training processes (one per GPU on a cluster)."""
    use_gpu: bool = False
    """Give each worker a GPU and use NCCL; otherwise CPU with gloo."""
    checkpoint_every: int = 50
    """Optimizer steps between sharded checkpoints (weights, optimizer, schedule, step, RNG);
    0 writes none. A restarted worker group or a rerun with ``--resume`` continues from the
    last one."""
    keep_checkpoints: int = 2
    """Checkpoints kept on storage (the newest)."""
    max_failures: int = 2
    """Worker-group failures Ray Train recovers from (from the last checkpoint) before the
    run fails."""

    def __post_init__(self) -> None:
        s = self._section
        _check_positive(s, "num_workers", self.num_workers, integer=True)
        if not isinstance(self.use_gpu, bool):
            _fail(s, "use_gpu", self.use_gpu, "true or false")
        for name in ("checkpoint_every", "max_failures"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(s, name, value, "an integer >= 0")
        _check_positive(s, "keep_checkpoints", self.keep_checkpoints, integer=True)


EVAL_TASKS = ("toy_wmdp", "toy_mmlu", "wmdp_bio_robust", "wmdp_bio", "mmlu", "mmlu_stem")
"""Tasks raylens scores (all 0-shot). The toy tasks and ``wmdp_bio_robust`` ship as YAMLs in
``raylens/tasks``; the others are lm-eval built-ins and need their datasets cached."""


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation after (and during) unlearning; always 0-shot."""

    _section: ClassVar[str] = "eval"
    tasks: tuple[str, ...] = ("toy_wmdp", "toy_mmlu")
    """Tasks to score, from ``EVAL_TASKS``."""
    batch_size: int = 32
    """Questions per forward pass."""
    time_limit_s: float = 1800.0
    """An evaluation running longer than this fails with an error naming the task (checked
    between batches)."""
    subset: float | None = None
    """Score a fixed, seeded, stratified fraction of each task's questions (during search);
    None scores all of them (final numbers)."""
    subset_seed: int = 0
    """Seed of the subset: the same seed gives the same questions in every trial."""
    data_dir: str | None = None
    """Folder of local dataset snapshots, ``<data_dir>/<hub id>`` (offline clusters); None uses
    the hub or its cache."""

    def __post_init__(self) -> None:
        s = self._section
        if not isinstance(self.tasks, tuple) or not self.tasks:
            _fail(s, "tasks", self.tasks, "a non-empty list from " + ", ".join(EVAL_TASKS))
        for task in self.tasks:
            if task not in EVAL_TASKS:
                _fail(s, "tasks", self.tasks, "tasks from " + ", ".join(EVAL_TASKS))
        _check_positive(s, "batch_size", self.batch_size, integer=True)
        _check_positive(s, "time_limit_s", self.time_limit_s)
        if self.subset is not None:
            ok = isinstance(self.subset, (int, float)) and not isinstance(self.subset, bool)
            if not (ok and 0 < self.subset <= 1):
                _fail(s, "subset", self.subset, "a fraction in (0, 1] or null (all questions)")
        if isinstance(self.subset_seed, bool) or not isinstance(self.subset_seed, int):
            _fail(s, "subset_seed", self.subset_seed, "an integer")
        if self.data_dir is not None:
            _check_text(s, "data_dir", self.data_dir)


@dataclass(frozen=True)
class AttackConfig:
    """Fine-tuning attack on the unlearned model (tamper resistance)."""

    _section: ClassVar[str] = "attack"
    enabled: bool = False
    """Run the attack after unlearning. Not implemented yet: ``true`` is refused."""
    num_examples: int = 512
    """Forget-domain documents used by the attacker."""
    lr: float = 2e-5
    """Attacker learning rate."""
    global_batch: int = 16
    """Attacker sequences per optimizer step."""
    epochs: int = 1
    """Attacker passes over its examples."""
    eval_every: int = 10
    """Evaluate WMDP every this many attacker steps."""

    def __post_init__(self) -> None:
        s = self._section
        if not isinstance(self.enabled, bool):
            _fail(s, "enabled", self.enabled, "true or false")
        if self.enabled:  # refused rather than silently ignored
            _fail(s, "enabled", self.enabled, "false: this version runs no fine-tuning attack "
                  "yet (the attack.* settings are reserved for it)")
        for name in ("num_examples", "global_batch", "epochs", "eval_every"):
            _check_positive(s, name, getattr(self, name), integer=True)
        _check_positive(s, "lr", self.lr)


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs are recorded in MLflow, and how much of each run is copied there."""

    _section: ClassVar[str] = "tracking"
    enabled: bool = True
    """Record runs in MLflow (sweeps: a parent run and one nested run per trial)."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None: ``$MLFLOW_TRACKING_URI`` if set (``cluster.yaml`` points it at
    the head node's MLflow server), else ``sqlite:///raylens-mlflow.db`` in the working
    directory."""
    artifact_location: str = "raylens-artifacts"
    """Folder for the artifacts of experiments created in a local (sqlite or file) store; a
    server stores them where it was told (``--artifacts-destination``)."""
    experiment: str = "raylens"
    """MLflow experiment of single runs; a sweep's experiment is the sweep's name."""
    max_model_mb: float = 512.0
    """An exported model or adapter up to this size is copied into the run's artifacts; a larger
    one is recorded by path (tag ``model_path``), since checkpoints of 7B models do not belong in
    a tracking store."""

    def __post_init__(self) -> None:
        s = self._section
        if not isinstance(self.enabled, bool):
            _fail(s, "enabled", self.enabled, "true or false")
        if self.tracking_uri is not None:
            _check_text(s, "tracking_uri", self.tracking_uri)
            if url_password(self.tracking_uri):
                raise ConfigError(
                    f"tracking.tracking_uri carries a password, which would be logged with "
                    f"every run: use {redact_url(self.tracking_uri)} with "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment")
        for name in ("artifact_location", "experiment"):
            _check_text(s, name, getattr(self, name))
        _check_nonneg(s, "max_model_mb", self.max_model_mb)


@dataclass(frozen=True)
class UnlearnConfig:
    """One unlearning run: every setting of a trial."""

    _section: ClassVar[str] = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    lens: LensConfig = field(default_factory=LensConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    """Seed of model init, data order and the forget loss's random targets."""

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail("run", "seed", self.seed, "an integer")
        if self.mode.kind == "lora" and self.optim.name == "muon":
            _fail("optim", "name", self.optim.name, "'adamw' with mode.kind='lora' (Muon needs full)")
        per_step = self.batch.per_device_batch * self.scaling.num_workers
        if self.batch.global_batch % per_step:
            _fail(
                "batch",
                "global_batch",
                self.batch.global_batch,
                f"a multiple of per_device_batch x scaling.num_workers = {per_step}",
            )
        if self.data.num_examples < self.batch.global_batch:
            _fail(
                "data",
                "num_examples",
                self.data.num_examples,
                f"at least batch.global_batch = {self.batch.global_batch}",
            )

    @property
    def accumulation_steps(self) -> int:
        """Forward passes per optimizer step on each worker."""
        return self.batch.global_batch // (self.batch.per_device_batch * self.scaling.num_workers)


@dataclass(frozen=True)
class ToyWorldConfig:
    """The embedded toy world: synthetic facts, a tiny GPT-NeoX, a control model and a lens."""

    _section: ClassVar[str] = "toyworld"
    seed: int = 0
    """Seed of every random choice: same seed, byte-identical data and the same models."""
    num_entities: int = 48
    """Entities per domain; each has 4 facts, so each eval set has 4x this many questions."""
    num_docs: int = 1024
    """Documents per domain (forget corpus = hazard, retain corpus = general)."""
    hidden_size: int = 96
    """Width of the tiny GPT-NeoX."""
    num_layers: int = 6
    """Blocks of the tiny GPT-NeoX."""
    num_heads: int = 4
    """Attention heads."""
    train_steps: int = 600
    """Optimizer steps of pretraining (the control model gets the same)."""
    train_batch: int = 32
    """Documents per pretraining step."""
    lr: float = 3e-3
    """Peak pretraining learning rate."""
    lens_steps: int = 300
    """Optimizer steps of tuned-lens training."""
    build_threads: int = 2
    """CPU threads torch uses while building (pretraining, lens, baseline), whatever the machine
    has: the thread count sets the reduction order, so pinning it makes a 2-core laptop and a
    64-core node build the same world (same CPU kind and torch build). Part of the content key."""

    def __post_init__(self) -> None:
        s = self._section
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail(s, "seed", self.seed, "an integer")
        if not isinstance(self.num_entities, int) or not 8 <= self.num_entities <= 400:
            _fail(s, "num_entities", self.num_entities, "an integer in [8, 400]")
        for name in ("num_docs", "hidden_size", "num_layers", "num_heads", "train_steps",
                     "train_batch", "lens_steps", "build_threads"):
            _check_positive(s, name, getattr(self, name), integer=True)
        if self.hidden_size % self.num_heads:
            _fail(s, "hidden_size", self.hidden_size, f"a multiple of num_heads={self.num_heads}")
        _check_positive(s, "lr", self.lr)


# ---- flat dicts -------------------------------------------------------------------------------


def to_flat(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config into ``{"section.field": value}`` with plain values (tuples become lists)."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            flat.update(to_flat(value, key + "."))
        else:
            flat[key] = list(value) if isinstance(value, tuple) else value
    return flat


def from_flat(cls: type, flat: dict[str, Any]) -> Any:
    """Rebuild a config of type ``cls`` from ``to_flat`` output; values may also be strings (MLflow).

    Keys absent from ``flat`` keep their defaults; unknown keys are an error naming the key.
    """
    known = set(to_flat(cls()))
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}: allowed keys are {sorted(known)}")
    return _build(cls, flat, "")


def _build(cls: type, flat: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, flat, key + ".")
        elif key in flat:
            kwargs[f.name] = _coerce(key, flat[key], hint)
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a flat value (native or its string form) to the field's declared type."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if isinstance(value, str) and (optional and value in ("None", "")):
        return None
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = _literal(key, value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is invalid: allowed a list")
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(key, v, inner) for v in value)
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ConfigError(f"{key}={value!r} is invalid: allowed true or false")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            value = _literal(key, value)
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if hint is int and isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    return value


def _literal(key: str, text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"{key}={text!r} is invalid: allowed a number or list literal") from None


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` (command-line ``--set``) as a dict; values stay strings."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is invalid: allowed key=value, e.g. loss.retain_coef=5")
        overrides[key.strip()] = value.strip()
    return overrides


def replace(config: Any, overrides: dict[str, Any]) -> Any:
    """Return ``config`` with dotted-key overrides applied (strings allowed), validated again."""
    flat = to_flat(config)
    flat.update(overrides)
    return from_flat(type(config), flat)


__all__ = [
    "TOY", "EVAL_TASKS", "ConfigError", "ModelConfig", "LensConfig", "DataConfig", "LossConfig", "OptimConfig",
    "ModeConfig", "BatchConfig", "ScalingConfig", "EvalConfig", "AttackConfig", "TrackingConfig",
    "UnlearnConfig", "ToyWorldConfig", "SweepConfig", "to_flat", "from_flat", "replace",
    "parse_overrides", "replace_sweep", "RECIPES", "SEED_SETUP",
    "ALL_LINEAR_NEOX", "recipe",
]


ALL_LINEAR_NEOX = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

RECIPES: dict[str, dict[str, Any]] = {
    # The seed's best run (LoRA rank 16, alpha 16, retain 5, remove 5, global batch 32, AdamW),
    # scaled to the toy world: lr 2e-2 (seed 1e-3), 16 passes over the 1,024 toy documents
    # (512 steps; seed: 8,192 examples, 256 steps) and LoRA on every linear layer (seed: PEFT's
    # default, query_key_value only, which leaves toy_wmdp at ~0.8 on the toy model). At lr 1e-2
    # toy_wmdp ended at 0.27-0.33 on the two seed-0 builds (README, "Figures and machines"), too
    # close to the 0.35 acceptance bound; 2e-2 ends at 0.28 on both (0.34 on seed 1).
    "lora_adamw": {"mode.kind": "lora", "optim.name": "adamw", "optim.lr": 2e-2,
                   "loss.retain_coef": 5.0, "loss.remove_coef": 5.0, "batch.epochs": 16,
                   "batch.per_device_batch": 32, "mode.lora_target_modules": ALL_LINEAR_NEOX},
    # Full fine-tuning with AdamW and warmup 0.5 as in the seed's later runs; on the toy model the
    # retain/remove balance sits near retain 0.05 (retain 0 collapses, retain 0.5 barely unlearns).
    "sft_adamw": {"mode.kind": "full", "optim.name": "adamw", "optim.lr": 3e-3,
                  "optim.warmup_ratio": 0.5, "loss.retain_coef": 0.05, "loss.remove_coef": 5.0,
                  "batch.epochs": 2},
    # Full fine-tuning with Muon for the hidden matrices and the seed's optimizer: Muon's lr on
    # AdamW's scale (match_rms_adamw) and AdamW betas (0.9, 0.95). muon_lr 0.01 on the toy
    # model's 96-wide matrices is the step torch's original scaling took at 0.02 (x1.96; x3.9
    # for dense_4h_to_h).
    "sft_muon": {"mode.kind": "full", "optim.name": "muon", "optim.muon_lr": 0.01,
                 "optim.muon_adjust_lr": "match_rms_adamw", "optim.adam_betas": (0.9, 0.95),
                 "optim.adam_lr": 3e-4, "loss.retain_coef": 0.05, "loss.remove_coef": 5.0,
                 "batch.epochs": 2},
}
"""Base settings of the seed log's recipes, as flat overrides of ``UnlearnConfig``."""


SEED_SETUP: dict[str, Any] = {
    "model.name_or_path": "EleutherAI/deep-ignorance-unfiltered", "model.dtype": "bfloat16",
    "model.gradient_checkpointing": True,
    "lens.name_or_path": "EleutherAI/deep-ignorance-unfiltered-lens",
    "data.forget": "Unlearning/WMDP-Bio-Remove-Dataset",
    "data.retain": "EleutherAI/wikitext_document_level",
    "loss.target_layers": (5, 10, 15, 20, 25, 30), "batch.global_batch": 32, "batch.epochs": 1,
    "scaling.use_gpu": True, "eval.tasks": ("wmdp_bio_robust", "mmlu"), "eval.subset": 0.25,
}
"""The seed log's real setting, shared by every recipe: model, lens, corpora, target layers,
global batch, GPUs, and WMDP-Bio-Robust + MMLU on a 0.25 subset during search. The sweep files
add each recipe's examples, coefficients, learning rates and workers."""


def recipe(name: str, overrides: dict[str, Any] | None = None) -> UnlearnConfig:
    """The ``UnlearnConfig`` of recipe ``name`` with dotted-key ``overrides`` applied."""
    if name not in RECIPES:
        raise ConfigError(f"recipe={name!r} is invalid: allowed one of {', '.join(RECIPES)}")
    return replace(UnlearnConfig(), {**RECIPES[name], **(overrides or {})})


def replace_sweep(sweep: "SweepConfig", fields: dict[str, Any],
                  base: dict[str, Any] | None = None) -> "SweepConfig":
    """``sweep`` with scalar ``fields`` changed (strings allowed, converted to the field's type)
    and dotted-key ``base`` overrides applied to its base run; validated again."""
    hints = typing.get_type_hints(SweepConfig)
    scalars = {f.name for f in dataclasses.fields(SweepConfig)} - {"base", "space"}
    unknown = sorted(set(fields) - scalars)
    if unknown:
        raise ConfigError(f"sweep settings {unknown} are invalid: allowed "
                          f"{', '.join('sweep.' + n for n in sorted(scalars))}")
    changes = {k: _coerce(f"sweep.{k}", v, hints[k]) for k, v in fields.items()}
    if base:
        changes["base"] = replace(sweep.base, base)
    return dataclasses.replace(sweep, **changes)


SPACE_KINDS = ("log", "uniform", "int", "choice")


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: a base run, the settings to search and how, the two objectives and a budget."""

    _section: ClassVar[str] = "sweep"
    name: str
    """Sweep name: its Tune experiment, Optuna study and run folders; the same name resumes."""
    base: UnlearnConfig
    """Every setting a trial does not sample."""
    space: dict[str, tuple]
    """Flat key -> ``("log", low, high)`` | ``("uniform", low, high)`` | ``("int", low, high)`` |
    ``("choice", [values])``; log scale for coefficients and learning rates."""
    num_trials: int = 12
    """Trials in the sweep (a resumed sweep counts the ones already run)."""
    forget_task: str = "toy_wmdp"
    """Objective 1, minimised: accuracy on this task (``wmdp``)."""
    retain_task: str = "toy_mmlu"
    """Objective 2, maximised: accuracy on this task (``mmlu``)."""
    retain_floor: float = 0.0
    """A trial whose retain accuracy falls below this is ``collapsed``: recorded, never on the
    Pareto front (a model answering at chance has the lowest forget accuracy)."""
    sampler: str = "tpe"
    """Optuna sampler: ``tpe`` (multi-objective TPE) or ``nsga2``."""
    seed: int = 0
    """Seed of the sampler."""
    evaluate_base_first: bool = True
    """Run the base config as the first trial: the hand-tuned point the search must beat."""
    evaluate_baseline: bool = True
    """Score the unmodified model once (kept in the sweep folder): the baseline row of reports
    and the star on the Pareto plot."""
    max_concurrent: int | None = None
    """Trials at once; None: as many as the cluster's ``TRAIN_DRIVER`` slots, counted while
    the sweep runs (nodes that join later add theirs)."""
    keep_exports: str = "all"
    """Which trials keep their exported model once the sweep ends: ``all``, or ``front`` (the
    Pareto front's; a dominated trial's export is deleted, its record and metrics stay).
    Checkpoints of a finished trial are always deleted."""
    storage: str = "raylens-runs"
    """Root folder (shared storage on a cluster): ``<storage>/<name>/`` holds Tune's experiment,
    Ray Train checkpoints, trial outputs and (by default) the Optuna study."""
    study_url: str | None = None
    """Optuna storage URL (any RDB, e.g. ``postgresql://...``); None: sqlite in the sweep folder."""

    def __post_init__(self) -> None:
        s = self._section
        _check_text(s, "name", self.name)
        if not SWEEP_NAME.fullmatch(self.name):  # it names folders: no "..", no separators
            _fail(s, "name", self.name, "letters, digits, '.', '_' or '-', starting with a "
                  "letter or digit (at most 100 characters)")
        if not isinstance(self.base, UnlearnConfig):
            _fail(s, "base", type(self.base).__name__, "an UnlearnConfig")
        keys = set(to_flat(self.base))
        if not isinstance(self.space, dict) or not self.space:
            _fail(s, "space", self.space, "a non-empty dict of flat key -> (kind, ...)")
        for key, spec in self.space.items():
            if key not in keys:
                _fail(s, "space", key, "keys of the flat UnlearnConfig, e.g. loss.retain_coef")
            if not isinstance(spec, tuple) or not spec or spec[0] not in SPACE_KINDS:
                _fail(s, f"space[{key!r}]", spec, "a tuple starting with one of " + ", ".join(SPACE_KINDS))
            if spec[0] == "choice":
                if len(spec) != 2 or not isinstance(spec[1], (list, tuple)) or not spec[1]:
                    _fail(s, f"space[{key!r}]", spec, "('choice', [value, ...])")
                for value in spec[1]:  # every choice must be a valid setting
                    replace(self.base, {key: value})
                continue
            ok = len(spec) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        for v in spec[1:]) and spec[1] < spec[2]
            if not ok or (spec[0] == "log" and spec[1] <= 0):
                _fail(s, f"space[{key!r}]", spec, f"('{spec[0]}', low, high) with "
                      f"{'0 < ' if spec[0] == 'log' else ''}low < high")
            for value in spec[1:]:  # both ends must be valid settings
                replace(self.base, {key: int(value) if spec[0] == "int" else value})
        for name in ("forget_task", "retain_task"):
            if getattr(self, name) not in self.base.eval.tasks:
                _fail(s, name, getattr(self, name), "one of base eval.tasks "
                      f"{list(self.base.eval.tasks)}")
        _check_fraction(s, "retain_floor", self.retain_floor)
        _check_positive(s, "num_trials", self.num_trials, integer=True)
        _check_choice(s, "sampler", self.sampler, ("tpe", "nsga2"))
        for name in ("evaluate_base_first", "evaluate_baseline"):
            if not isinstance(getattr(self, name), bool):
                _fail(s, name, getattr(self, name), "true or false")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail(s, "seed", self.seed, "an integer")
        if self.max_concurrent is not None:
            _check_positive(s, "max_concurrent", self.max_concurrent, integer=True)
        _check_text(s, "storage", self.storage)
        if self.study_url is not None:
            if "://" not in str(self.study_url):
                _fail(s, "study_url", self.study_url, "an SQLAlchemy URL such as sqlite:///f.db")
            if url_password(self.study_url):
                raise ConfigError(
                    f"sweep.study_url carries a password, which would be printed and pickled "
                    f"with the sweep's state: {redact_url(self.study_url)} is allowed, with the "
                    "password in ~/.pgpass (PostgreSQL) or the database's own client config")
        _check_choice(s, "keep_exports", self.keep_exports, ("all", "front"))
