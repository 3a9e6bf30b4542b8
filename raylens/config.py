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
from typing import Any, ClassVar, Literal

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


def _check_integer(section: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(section, name, value, "an integer")


def _check_count(section: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(section, name, value, "an integer >= 0")


def _check_below_one(section: str, name: str, value: Any) -> None:
    _check_fraction(section, name, value)
    if value == 1:
        _fail(section, name, value, "a number in [0, 1)")


def _check_bool(section: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(section, name, value, "true or false")


def _positive_int(section: str, name: str, value: Any) -> None:
    _check_positive(section, name, value, integer=True)


def _open_fraction(section: str, name: str, value: Any) -> None:
    _check_fraction(section, name, value, closed_low=False)


def _check_names(section: str, name: str, value: Any) -> None:
    if not value or not all(isinstance(f, str) and f for f in value):
        _fail(section, name, value, "a non-empty list of column names")


def _check_layers(section: str, name: str, layers: Any) -> None:
    if (not isinstance(layers, tuple) or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
            or len(set(layers)) != len(layers)):
        _fail(section, name, layers, "None or distinct non-negative layer indices")


def _check_betas(section: str, name: str, betas: Any) -> None:
    if not (isinstance(betas, tuple) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
            for b in betas)):
        _fail(section, name, betas, "two numbers in [0, 1), e.g. [0.9, 0.95]")


def _check_modules(section: str, name: str, mods: Any) -> None:
    if not isinstance(mods, tuple) or not mods or not all(isinstance(m, str) and m for m in mods):
        _fail(section, name, mods, "None or a non-empty list of module names")


def _check_tasks(section: str, name: str, tasks: Any) -> None:
    if not isinstance(tasks, tuple) or not tasks:
        _fail(section, name, tasks, "a non-empty list from " + ", ".join(EVAL_TASKS))
    for task in tasks:
        if task not in EVAL_TASKS:
            _fail(section, name, tasks, "tasks from " + ", ".join(EVAL_TASKS))


def _check_subset(section: str, name: str, subset: Any) -> None:
    ok = isinstance(subset, (int, float)) and not isinstance(subset, bool)
    if not (ok and 0 < subset <= 1):
        _fail(section, name, subset, "a fraction in (0, 1] or null (all questions)")


def _check_tracking_uri(section: str, name: str, uri: Any) -> None:
    _check_text(section, name, uri)
    if url_password(uri):
        raise ConfigError(
            f"{section}.{name} carries a password, which would be logged with every run: use "
            f"{redact_url(uri)} with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in "
            "the environment")


def _check_entities(section: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or not 8 <= value <= 400:
        _fail(section, name, value, "an integer in [8, 400]")


def _f(default: Any, check, **kwargs) -> Any:
    """A field with its check: ``check(section, name, value)`` raises ``ConfigError``."""
    return field(default=default, metadata={"check": check}, **kwargs)


_HINTS: dict[type, dict[str, Any]] = {}
"""Each config class's resolved annotations, read once."""


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


class _Checked:
    """Validation declared with the fields: a ``Literal`` annotation allows its choices, ``bool``
    true or false, ``int`` an integer, and a field's ``check`` (``_f``) anything more; a value
    of None passes where the annotation allows it. ``_cross_checks`` holds the rules between
    fields, run after them."""

    _section: ClassVar[str]

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            value, hint = getattr(self, f.name), hints[f.name]
            args = typing.get_args(hint)
            if value is None and type(None) in args:
                continue
            if type(None) in args:
                hint = next(a for a in args if a is not type(None))
            if typing.get_origin(hint) is typing.Literal:
                _check_choice(self._section, f.name, value, typing.get_args(hint))
            elif hint is bool:
                _check_bool(self._section, f.name, value)
            elif hint is int and "check" not in f.metadata:
                _check_integer(self._section, f.name, value)
            if f.metadata.get("check"):
                f.metadata["check"](self._section, f.name, value)
        self._cross_checks()

    def _cross_checks(self) -> None:
        """Rules between fields (none here)."""


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
class ModelConfig(_Checked):
    """The model to unlearn."""

    _section: ClassVar[str] = "model"
    name_or_path: str = _f(TOY, _check_text)
    """Hub id (``EleutherAI/deep-ignorance-unfiltered``), local folder, or ``toy``."""
    revision: str | None = None
    """Hub revision; ignored for folders and the toy world."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype: float32, bfloat16 or float16. Full fine-tuning trains fp32 master
    weights and optimizer state and computes in this dtype (FSDP2 mixed precision, or autocast
    in one process), its frozen reference held in it; LoRA holds the frozen base in it and the
    adapter in fp32. The export is written in the source checkpoint's dtype (docs/method.md)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""



@dataclass(frozen=True)
class LensConfig(_Checked):
    """The frozen tuned lens whose predictions are unlearned."""

    _section: ClassVar[str] = "lens"
    name_or_path: str = _f(TOY, _check_text)
    """Hub id (``EleutherAI/deep-ignorance-unfiltered-lens``), local folder, or ``toy``."""
    revision: str | None = None
    """Hub revision; ignored for folders and the toy world."""



@dataclass(frozen=True)
class DataConfig(_Checked):
    """Forget and retain corpora: hub datasets, local JSONL files with a ``text`` field, or ``toy``."""

    _section: ClassVar[str] = "data"
    forget: str = _f(TOY, _check_text)
    """Forget corpus: ``Unlearning/WMDP-Bio-Remove-Dataset``, a JSONL path, or ``toy``."""
    forget_fields: tuple[str, ...] = _f(("title", "abstract", "text"), _check_names)
    """Hub forget columns joined by blank lines into one document (JSONL uses ``text``)."""
    retain: str = _f(TOY, _check_text)
    """Retain corpus: ``EleutherAI/wikitext_document_level``, a JSONL path, or ``toy``."""
    retain_subset: str | None = "wikitext-103-raw-v1"
    """Hub dataset configuration of the retain corpus."""
    retain_field: str = _f("page", _check_text)
    """Hub retain column (JSONL uses ``text``)."""
    retain_shuffle_seed: int = 42
    """A hub retain corpus is shuffled with ``datasets.Dataset.shuffle(seed=...)`` (the seed's
    order) before the first examples are taken; JSONL files are read in order."""
    num_examples: int = _f(1024, _positive_int)
    """Forget/retain pairs used for training (forget i is paired with retain i)."""
    max_length: int = _f(2048, _positive_int)
    """Documents are truncated to this many tokens."""



@dataclass(frozen=True)
class LossConfig(_Checked):
    """The unlearning objective and its schedules."""

    _section: ClassVar[str] = "loss"
    target_layers: tuple[int, ...] | None = _f(None, _check_layers)
    """Layers whose lens predictions are unlearned; None = every n_layers//6-th layer (5..30 of 32)."""
    retain_coef: float = _f(5.0, _check_nonneg)
    """Final weight of the retain loss."""
    remove_coef: float = _f(5.0, _check_nonneg)
    """Initial weight of the forget loss (it decays to 0.75x)."""
    retain_start: float = _f(0.25, _check_fraction)
    """Retain weight at step 0 as a fraction of ``retain_coef`` (r0)."""
    ramp_fraction: float = _f(1.0, _open_fraction)
    """Schedules ramp over this fraction of the optimizer steps (T_ramp / T)."""
    retain_loss: Literal["l2", "kl"] = "l2"
    """``l2``: hidden-state distance to the reference; ``kl``: per-token output KL."""
    retain_layers: Literal["target", "all"] = "target"
    """Hidden states the ``l2`` retain loss compares: ``target`` (the target layers) or ``all``
    (every hidden state the model returns, embeddings and final normed state included: the
    seed's LoRA runs)."""
    retain_reduction: Literal["token", "sequence", "padded_position"] = "token"
    """What the summed retain loss is divided by, over the whole global batch: ``token`` (real
    tokens: the mean per token, whatever the padding and document lengths), ``sequence``
    (sequences: a sum per sequence, the seed's KL ``batchmean``) or ``padded_position``
    (sequences x ``data.max_length``: pads counted as zeros, the seed's LoRA ``nanmean``)."""
    lens_chunk_tokens: int = _f(1024, _check_count)
    """The forget loss computes each target layer's lens logits for this many tokens at a time
    and recomputes them in the backward pass (activation checkpointing), so its memory is
    ``chunk x vocabulary`` instead of ``batch x sequence x vocabulary`` per layer (a 2,048-token
    sequence at 50,304 tokens: 412 MB of fp32 logits per layer kept for the backward, against
    206 MB transient); 0: whole, nothing recomputed. The loss and gradients are the same."""

    def _cross_checks(self) -> None:
        if self.retain_coef == 0 and self.remove_coef == 0:
            _fail(self._section, "remove_coef", self.remove_coef,
                  "a positive value when retain_coef is 0")
        if self.retain_loss == "kl" and self.retain_layers != "target":
            _fail(self._section, "retain_layers", self.retain_layers, "'target' with "
                  "retain_loss='kl' (the KL compares output distributions, not hidden states)")


@dataclass(frozen=True)
class OptimConfig(_Checked):
    """Optimizer and learning-rate schedule."""

    _section: ClassVar[str] = "optim"
    name: Literal["adamw", "muon"] = "adamw"
    """``adamw`` for all parameters, or ``muon`` (Muon for 2-D hidden matrices, AdamW for the rest)."""
    lr: float = _f(1e-3, _check_positive)
    """AdamW learning rate (used when ``name`` is adamw)."""
    muon_lr: float = _f(0.02, _check_positive)
    """Muon learning rate for the 2-D hidden matrices."""
    adam_lr: float = _f(3e-4, _check_positive)
    """AdamW learning rate for embeddings, unembedding, norms and biases under Muon."""
    adam_betas: tuple[float, float] = _f((0.9, 0.999), _check_betas)
    """AdamW's (beta1, beta2); the seed's Muon runs used (0.9, 0.95) for their AdamW half."""
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    """How Muon scales ``muon_lr`` per matrix (``torch.optim.Muon``'s ``adjust_lr_fn``):
    ``original`` multiplies by sqrt(max(1, rows/cols)); ``match_rms_adamw`` by
    0.2 * sqrt(max(rows, cols)), giving updates the RMS of AdamW's, so ``muon_lr`` is on AdamW's
    scale (the seed's convention: on GPT-NeoX-6.9B its step is 12.8-25.6x the original's)."""
    warmup_ratio: float = _f(0.0, _check_below_one)
    """Fraction of steps of linear warmup before the schedule."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """After warmup: ``linear`` decay to 0, ``cosine`` (half a cosine to 0) or ``constant``."""
    weight_decay: float = _f(0.01, _check_nonneg)
    """Decoupled weight decay."""
    grad_clip: float = _f(1.0, _check_positive)
    """Global gradient-norm clip."""



@dataclass(frozen=True)
class ModeConfig(_Checked):
    """What is trained: a LoRA adapter or all weights."""

    _section: ClassVar[str] = "mode"
    kind: Literal["lora", "full"] = "lora"
    """``lora`` (reference = adapter disabled) or ``full`` (reference = frozen copy in
    ``model.dtype``; fp32 master weights)."""
    lora_rank: int = _f(16, _positive_int)
    """LoRA rank r."""
    lora_alpha: float = _f(16.0, _check_positive)
    """LoRA scaling alpha."""
    lora_dropout: float = _f(0.05, _check_below_one)
    """Dropout on the LoRA input."""
    lora_target_modules: tuple[str, ...] | None = _f(None, _check_modules)
    """Module names to adapt; None = PEFT's default for the architecture."""



@dataclass(frozen=True)
class BatchConfig(_Checked):
    """Batching: global batch = per-device batch x workers x accumulation steps."""

    _section: ClassVar[str] = "batch"
    global_batch: int = _f(32, _positive_int)
    """Sequences per optimizer step, summed over workers and accumulation."""
    per_device_batch: int = _f(8, _positive_int)
    """Sequences per forward pass on one worker."""
    epochs: int = _f(1, _positive_int)
    """Passes over the forget/retain pairs."""



@dataclass(frozen=True)
class ScalingConfig(_Checked):
    """Ray Train workers of one trial."""

    _section: ClassVar[str] = "scaling"
    num_workers: int = _f(1, _positive_int)
    """Training processes (one per GPU on a cluster)."""
    use_gpu: bool = False
    """Give each worker a GPU and use NCCL; otherwise CPU with gloo."""
    checkpoint_every: int = _f(50, _check_count)
    """Optimizer steps between sharded checkpoints (weights, optimizer, schedule, step, RNG);
    0 writes none. A restarted worker group or a rerun with ``--resume`` continues from the
    last one."""
    keep_checkpoints: int = _f(2, _positive_int)
    """Checkpoints kept on storage (the newest)."""
    max_failures: int = _f(2, _check_count)
    """Worker-group failures Ray Train recovers from (from the last checkpoint) before the
    run fails."""



EVAL_TASKS = ("toy_wmdp", "toy_mmlu", "wmdp_bio_robust", "wmdp_bio", "mmlu", "mmlu_stem")
"""Tasks raylens scores (all 0-shot). The toy tasks and ``wmdp_bio_robust`` ship as YAMLs in
``raylens/tasks``; the others are lm-eval built-ins and need their datasets cached."""


@dataclass(frozen=True)
class EvalConfig(_Checked):
    """Evaluation after (and during) unlearning; always 0-shot."""

    _section: ClassVar[str] = "eval"
    tasks: tuple[str, ...] = _f(("toy_wmdp", "toy_mmlu"), _check_tasks)
    """Tasks to score, from ``EVAL_TASKS``."""
    batch_size: int = _f(32, _positive_int)
    """Questions per forward pass."""
    time_limit_s: float = _f(1800.0, _check_positive)
    """An evaluation running longer than this fails with an error naming the task (checked
    between batches)."""
    subset: float | None = _f(None, _check_subset)
    """Score a fixed, seeded, stratified fraction of each task's questions (during search);
    None scores all of them (final numbers)."""
    subset_seed: int = 0
    """Seed of the subset: the same seed gives the same questions in every trial."""
    data_dir: str | None = _f(None, _check_text)
    """Folder of local dataset snapshots, ``<data_dir>/<hub id>`` (offline clusters); None uses
    the hub or its cache."""



@dataclass(frozen=True)
class TrackingConfig(_Checked):
    """Where runs are recorded in MLflow, and how much of each run is copied there."""

    _section: ClassVar[str] = "tracking"
    enabled: bool = True
    """Record runs in MLflow (sweeps: a parent run and one nested run per trial)."""
    tracking_uri: str | None = _f(None, _check_tracking_uri)
    """MLflow tracking URI; None: ``$MLFLOW_TRACKING_URI`` if set (``cluster.yaml`` points it at
    the head node's MLflow server), else ``sqlite:///raylens-mlflow.db`` in the working
    directory."""
    artifact_location: str = _f("raylens-artifacts", _check_text)
    """Folder for the artifacts of experiments created in a local (sqlite or file) store; a
    server stores them where it was told (``--artifacts-destination``)."""
    experiment: str = _f("raylens", _check_text)
    """MLflow experiment of single runs; a sweep's experiment is the sweep's name."""
    max_model_mb: float = _f(512.0, _check_nonneg)
    """An exported model or adapter up to this size is copied into the run's artifacts; a larger
    one is recorded by path (tag ``model_path``), since checkpoints of 7B models do not belong in
    a tracking store."""



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


ATTACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Attack names: they label MLflow metrics (``attack/<name>/forget_acc``) and result files."""


def _check_attack_name(section: str, name: str, value: Any) -> None:
    if not isinstance(value, str) or not ATTACK_NAME.fullmatch(value):
        _fail(section, name, value, "letters, digits, '.', '_' or '-', starting with a letter "
              "or digit (at most 64 characters)")


def _check_level(section: str, name: str, value: Any) -> None:
    _check_fraction(section, name, value, closed_low=False)


@dataclass(frozen=True)
class AttackConfig(_Checked):
    """One fine-tuning attack on an unlearned model: causal-LM training on ``num_examples``
    documents of the run's forget (or, for a benign attack, retain) corpus, scored on the
    forget and retain tasks every ``eval_every`` steps. The defaults are the seed's attack
    (512 examples, batch 16, one epoch, eval every 10 steps, AdamW, linear, no warmup) scaled
    to the toy world (lr 3e-4; the seed's 2e-5 on the real model: ``recipes.suite``)."""

    _section: ClassVar[str] = "attack"
    name: str = _f("seed", _check_attack_name)
    """Label of the attack in results, metrics and reports."""
    corpus: Literal["forget", "retain"] = "forget"
    """Which of the run's corpora (``data.forget`` / ``data.retain``) the attacker trains on:
    ``retain`` is the benign-data attack."""
    num_examples: int = _f(512, _positive_int)
    """Documents of that corpus the attacker trains on (the first ones)."""
    max_length: int = _f(2048, _positive_int)
    """Documents are truncated to this many tokens."""
    mode: Literal["full", "lora"] = "full"
    """``full``: every weight (fp32 master weights); ``lora``: a fresh adapter on every layer."""
    lora_rank: int = _f(16, _positive_int)
    """LoRA rank (alpha = rank) of a ``lora`` attack."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """The attacker's optimizer (``muon`` needs ``mode='full'``; its hidden matrices use
    ``lr`` on AdamW's scale)."""
    lr: float = _f(3e-4, _check_positive)
    """Peak learning rate."""
    weight_decay: float = _f(0.01, _check_nonneg)
    """Decoupled weight decay (Deep Ignorance: 0.01)."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup (``optim.schedule``)."""
    warmup_ratio: float = _f(0.0, _check_below_one)
    """Fraction of the steps of linear warmup."""
    epochs: int = _f(1, _positive_int)
    """Passes over the attack documents."""
    max_steps: int | None = _f(None, _positive_int)
    """Stop after this many optimizer steps (None: ``epochs`` passes)."""
    global_batch: int = _f(16, _positive_int)
    """Documents per optimizer step, summed over workers and accumulation."""
    per_device_batch: int | None = _f(None, _positive_int)
    """Documents per forward pass on one worker; None: ``global_batch`` split evenly over the
    workers (one forward pass each per step)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype (``model.dtype``'s policy: fp32 master weights under autocast or FSDP2
    mixed precision for ``full``, the frozen base in it for ``lora``)."""
    eval_every: int = _f(10, _positive_int)
    """Optimizer steps between evaluations (and at step 0 and the last step)."""
    level: float = _f(0.5, _check_level)
    """Forget accuracy that counts as recovered: the result reports the first step reaching it."""
    seed: int = 0
    """Seed of the data order and a LoRA adapter's init."""

    def _cross_checks(self) -> None:
        if self.optimizer == "muon" and self.mode != "full":
            _fail(self._section, "optimizer", self.optimizer, "'adamw' with mode='lora' "
                  "(Muon needs mode='full')")
        if self.per_device_batch is not None and self.global_batch % self.per_device_batch:
            _fail(self._section, "global_batch", self.global_batch,
                  f"a multiple of per_device_batch={self.per_device_batch}")
        if self.num_examples < self.global_batch:
            _fail(self._section, "num_examples", self.num_examples,
                  f"at least global_batch = {self.global_batch}")


@dataclass(frozen=True)
class ToyWorldConfig(_Checked):
    """The embedded toy world: synthetic facts, a tiny GPT-NeoX, a control model and a lens."""

    _section: ClassVar[str] = "toyworld"
    seed: int = 0
    """Seed of every random choice: same seed, byte-identical data and the same models."""
    num_entities: int = _f(48, _check_entities)
    """Entities per domain; each has 4 facts, so each eval set has 4x this many questions."""
    num_docs: int = _f(1024, _positive_int)
    """Documents per domain (forget corpus = hazard, retain corpus = general)."""
    hidden_size: int = _f(96, _positive_int)
    """Width of the tiny GPT-NeoX."""
    num_layers: int = _f(6, _positive_int)
    """Blocks of the tiny GPT-NeoX."""
    num_heads: int = _f(4, _positive_int)
    """Attention heads."""
    train_steps: int = _f(600, _positive_int)
    """Optimizer steps of pretraining (the control model gets the same)."""
    train_batch: int = _f(32, _positive_int)
    """Documents per pretraining step."""
    lr: float = _f(3e-3, _check_positive)
    """Peak pretraining learning rate."""
    lens_steps: int = _f(300, _positive_int)
    """Optimizer steps of tuned-lens training."""
    build_threads: int = _f(2, _positive_int)
    """CPU threads torch uses while building (pretraining, lens, baseline), whatever the machine
    has: the thread count sets the reduction order, so pinning it makes a 2-core laptop and a
    64-core node build the same world (same CPU kind and torch build). Part of the content key."""

    def _cross_checks(self) -> None:
        if self.hidden_size % self.num_heads:
            _fail(self._section, "hidden_size", self.hidden_size,
                  f"a multiple of num_heads={self.num_heads}")


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
            kwargs[f.name] = _build(hint, flat, key + ".")  # type: ignore[arg-type]  # a class
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


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--set`` overrides as ``(the sweep's own, without "sweep.", the base run's)``."""
    own = {k[len("sweep."):]: v for k, v in overrides.items() if k.startswith("sweep.")}
    return own, {k: v for k, v in overrides.items() if not k.startswith("sweep.")}


def replace(config: Any, overrides: dict[str, Any]) -> Any:
    """Return ``config`` with dotted-key overrides applied (strings allowed), validated again."""
    flat = to_flat(config)
    flat.update(overrides)
    return from_flat(type(config), flat)


__all__ = [
    "TOY", "EVAL_TASKS", "ConfigError", "ModelConfig", "LensConfig", "DataConfig", "LossConfig",
    "OptimConfig",
    "ModeConfig", "BatchConfig", "ScalingConfig", "EvalConfig", "TrackingConfig",
    "UnlearnConfig", "AttackConfig", "ToyWorldConfig", "SweepConfig", "to_flat", "from_flat", "replace",
    "parse_overrides", "replace_sweep", "uses_toyworld",
]


def uses_toyworld(config: UnlearnConfig) -> bool:
    """Whether the run reads the toy world: a ``toy`` model, lens or corpus, or a toy task."""
    return TOY in (config.model.name_or_path, config.lens.name_or_path, config.data.forget,
                   config.data.retain) or any(t.startswith("toy_") for t in config.eval.tasks)


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


def _check_sweep_name(section: str, name: str, value: Any) -> None:
    _check_text(section, name, value)
    if not SWEEP_NAME.fullmatch(value):  # it names folders: no "..", no separators
        _fail(section, name, value, "letters, digits, '.', '_' or '-', starting with a "
              "letter or digit (at most 100 characters)")


def _check_study_url(section: str, name: str, url: Any) -> None:
    if "://" not in str(url):
        _fail(section, name, url, "an SQLAlchemy URL such as sqlite:///f.db")
    if url_password(url):
        raise ConfigError(
            f"{section}.{name} carries a password, which would be printed and pickled with the "
            f"sweep's state: {redact_url(url)} is allowed, with the password in ~/.pgpass "
            "(PostgreSQL) or the database's own client config")


def _check_space(s: str, space: dict, base: "UnlearnConfig") -> None:
    """A sweep's search space: flat keys of ``base``, each ``(kind, ...)`` with valid ends."""
    keys = set(to_flat(base))
    if not isinstance(space, dict) or not space:
        _fail(s, "space", space, "a non-empty dict of flat key -> (kind, ...)")
    for key, spec in space.items():
        if key not in keys:
            _fail(s, "space", key, "keys of the flat UnlearnConfig, e.g. loss.retain_coef")
        if not isinstance(spec, tuple) or not spec or spec[0] not in SPACE_KINDS:
            _fail(s, f"space[{key!r}]", spec, "a tuple starting with one of " + ", ".join(SPACE_KINDS))
        if spec[0] == "choice":
            if len(spec) != 2 or not isinstance(spec[1], (list, tuple)) or not spec[1]:
                _fail(s, f"space[{key!r}]", spec, "('choice', [value, ...])")
            for value in spec[1]:  # every choice must be a valid setting
                replace(base, {key: value})
            continue
        ok = len(spec) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                    for v in spec[1:]) and spec[1] < spec[2]
        if not ok or (spec[0] == "log" and spec[1] <= 0):
            _fail(s, f"space[{key!r}]", spec, f"('{spec[0]}', low, high) with "
                  f"{'0 < ' if spec[0] == 'log' else ''}low < high")
        for value in spec[1:]:  # both ends must be valid settings
            replace(base, {key: int(value) if spec[0] == "int" else value})


@dataclass(frozen=True)
class SweepConfig(_Checked):
    """One sweep: a base run, the settings to search and how, the two objectives and a budget."""

    _section: ClassVar[str] = "sweep"
    name: str
    """Sweep name: its Tune experiment, Optuna study and run folders; the same name resumes."""
    base: UnlearnConfig
    """Every setting a trial does not sample."""
    space: dict[str, tuple]
    """Flat key -> ``("log", low, high)`` | ``("uniform", low, high)`` | ``("int", low, high)`` |
    ``("choice", [values])``; log scale for coefficients and learning rates."""
    num_trials: int = _f(12, _positive_int)
    """Trials in the sweep (a resumed sweep counts the ones already run)."""
    forget_task: str = "toy_wmdp"
    """Objective 1, minimised: accuracy on this task (``wmdp``)."""
    retain_task: str = "toy_mmlu"
    """Objective 2, maximised: accuracy on this task (``mmlu``)."""
    retain_floor: float = _f(0.0, _check_fraction)
    """A trial whose retain accuracy falls below this is ``collapsed``: recorded, never on the
    Pareto front (a model answering at chance has the lowest forget accuracy)."""
    sampler: Literal["gp", "tpe", "nsga2", "random"] = "gp"
    """Optuna sampler: ``gp`` (Gaussian process, the default: it finds the front in the fewest
    trials of the four, ``bench/sweep_efficiency.py``), ``tpe`` (multi-objective TPE),
    ``nsga2`` or ``random``."""
    seed: int = 0
    """Seed of the sampler."""
    evaluate_base_first: bool = True
    """Run the base config as the first trial: the hand-tuned point the search must beat."""
    evaluate_baseline: bool = True
    """Score the unmodified model once (kept in the sweep folder): the baseline row of reports
    and the star on the Pareto plot."""
    max_concurrent: int | None = _f(None, _positive_int)
    """Trials at once; None: as many as the cluster's ``TRAIN_DRIVER`` slots, counted while
    the sweep runs (nodes that join later add theirs)."""
    keep_exports: Literal["all", "front"] = "all"
    """Which trials keep their exported model once the sweep ends: ``all``, or ``front`` (the
    Pareto front's; a dominated trial's export is deleted, its record and metrics stay).
    Checkpoints of a finished trial are always deleted."""
    storage: str = _f("raylens-runs", _check_text)
    """Root folder (shared storage on a cluster): ``<storage>/<name>/`` holds Tune's experiment,
    Ray Train checkpoints, trial outputs and (by default) the Optuna study."""
    study_url: str | None = _f(None, _check_study_url)
    """Optuna storage URL (any RDB, e.g. ``postgresql://...``); None: sqlite in the sweep folder."""
    attack_suite: Literal["seed", "short", "long"] | None = None
    """Attack suite run on every trial's export after its evaluation (``recipes.SUITES``;
    ``short`` is sized for it); None: no attack stage."""
    attack_objective: Literal["record", "instead", "beside"] = "record"
    """What the suite's worst post-attack forget accuracy is to the search: ``record`` (metrics
    only), ``instead`` (it replaces the pre-attack forget accuracy as objective 1) or
    ``beside`` (a third objective, minimised)."""

    def _cross_checks(self) -> None:
        s = self._section
        _check_sweep_name(s, "name", self.name)
        if not isinstance(self.base, UnlearnConfig):
            _fail(s, "base", type(self.base).__name__, "an UnlearnConfig")
        _check_space(s, self.space, self.base)
        for name in ("forget_task", "retain_task"):
            if getattr(self, name) not in self.base.eval.tasks:
                _fail(s, name, getattr(self, name), "one of base eval.tasks "
                      f"{list(self.base.eval.tasks)}")
        if self.attack_objective != "record" and self.attack_suite is None:
            _fail(s, "attack_objective", self.attack_objective,
                  "'record' without an attack_suite (name one: seed, short or long)")

    @property
    def objectives(self) -> tuple[str, ...]:
        """The row fields the search optimises (``pareto``): forget accuracy before the attack
        (``forget_acc``), after it (``attack_acc``, the suite's worst), retain accuracy."""
        return {"record": ("forget_acc", "retain_acc"), "instead": ("attack_acc", "retain_acc"),
                "beside": ("forget_acc", "attack_acc", "retain_acc")}[self.attack_objective]
