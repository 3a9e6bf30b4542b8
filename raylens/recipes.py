"""The recipes raylens ships: the seed runs' runs as flat overrides of ``UnlearnConfig``, its
real setting (model, lens, corpora, GPUs), and the toy-world sweep ``raylens demo`` runs.

The library holds the components and the schema (``raylens.config``); a recipe only picks a
combination. They live in the package rather than beside the sweep files so that ``--recipe``
and ``raylens demo`` work from an installed raylens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from raylens.config import AttackConfig, ConfigError, SweepConfig, UnlearnConfig, replace

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
"""Base settings of the seed runs' recipes, as flat overrides of ``UnlearnConfig``."""


SEED_SETUP: dict[str, Any] = {
    "model.name_or_path": "EleutherAI/deep-ignorance-unfiltered", "model.dtype": "bfloat16",
    "model.gradient_checkpointing": True,
    "lens.name_or_path": "EleutherAI/deep-ignorance-unfiltered-lens",
    "data.forget": "Unlearning/WMDP-Bio-Remove-Dataset",
    "data.retain": "EleutherAI/wikitext_document_level",
    "loss.target_layers": (5, 10, 15, 20, 25, 30), "batch.global_batch": 32, "batch.epochs": 1,
    "scaling.use_gpu": True, "eval.tasks": ("wmdp_bio_robust", "mmlu"), "eval.subset": 0.25,
}
"""The seed runs' real setting, shared by every recipe: model, lens, corpora, target layers,
global batch, GPUs, and WMDP-Bio-Robust + MMLU on a 0.25 subset during search. The sweep files
add each recipe's examples, coefficients, learning rates and workers."""


def recipe(name: str, overrides: dict[str, Any] | None = None) -> UnlearnConfig:
    """The ``UnlearnConfig`` of recipe ``name`` with dotted-key ``overrides`` applied."""
    if name not in RECIPES:
        raise ConfigError(f"recipe={name!r} is invalid: allowed one of {', '.join(RECIPES)}")
    return replace(UnlearnConfig(), {**RECIPES[name], **(overrides or {})})


def demo_sweep(storage: str = "raylens-runs", name: str = "demo", num_trials: int = 12,
               overrides: dict | None = None) -> SweepConfig:
    """The toy-world sweep ``raylens demo`` runs: full fine-tuning with AdamW (the ``sft_adamw``
    recipe as hand-tuned on the toy world: 1,024 documents, 64 steps), retain coefficient and
    lr on log scales wide enough to reach collapsed and unchanged models, the hand-tuned point
    first; a retain accuracy below 0.6 counts as collapsed. ``overrides`` change the base."""
    return SweepConfig(
        name=name, storage=storage, num_trials=num_trials, retain_floor=0.6,
        base=replace(recipe("sft_adamw"), {"scaling.checkpoint_every": 0, **(overrides or {})}),
        space={"loss.retain_coef": ("log", 0.003, 10.0), "optim.lr": ("log", 3e-5, 1e-2)},
    )


REAL_ATTACK_LR_SCALE = 2e-5 / 3e-4
"""Attack learning rates on the real model are the toy world's times this. The seed's attack
took lr 2e-5 on the 6.9B model; on the toy model lr 3e-4 plays its part: 32 steps of it bring
the LoRA-unlearned model from 0.28 back to 0.89 toy_wmdp, while the control model, which never
saw the hazard facts, learns them from the same 512 documents only from 0.22 to 0.29 (at 2e-3
the control reaches 0.45: the attack then teaches rather than recovers; docs/results.md)."""

SUITES: dict[str, dict[str, Any]] = {
    # The seed's attack: 512 forget documents, batch 16, one epoch (32 steps), eval every 10.
    "seed": {"attacks": {"seed": {}}, "retain_guard": None},
    # Cheap enough for every trial (3 x 12 steps on the toy world): full fine-tuning, a
    # LoRA attacker (5x the lr, as the field pairs LoRA 1e-4 with full 2e-5) and benign data
    # (the retain corpus: it restores forgotten knowledge on some defences).
    "short": {"attacks": {
        "full": {"num_examples": 192, "eval_every": 6},
        "lora": {"num_examples": 192, "eval_every": 6, "mode": "lora", "lr": 1.5e-3},
        "benign": {"num_examples": 192, "eval_every": 6, "corpus": "retain"},
    }, "retain_guard": None},
    # For Pareto finalists: the Deep Ignorance attack recipe (AdamW, weight decay 0.01, linear,
    # no warmup, fp16 autocast over fp32 weights, two epochs) and its cosine and bf16 variants,
    # then a small attacker search over lr and steps; a point counts only while retain accuracy
    # stays within 10 % of its start.
    "long": {"attacks": {
        "deep-ignorance": {"num_examples": 1024, "epochs": 2, "dtype": "float16",
                           "eval_every": 16},
        "deep-ignorance-cosine": {"num_examples": 1024, "epochs": 2, "dtype": "float16",
                                  "schedule": "cosine", "warmup_ratio": 0.01, "eval_every": 16},
        "deep-ignorance-bf16": {"num_examples": 1024, "epochs": 2, "dtype": "bfloat16",
                                "eval_every": 16},
        "search-lr1e-4-64": {"num_examples": 1024, "lr": 1e-4, "max_steps": 64,
                             "schedule": "constant", "eval_every": 16},
        "search-lr1e-3-16": {"num_examples": 256, "lr": 1e-3, "max_steps": 16,
                             "schedule": "constant", "eval_every": 4},
        "search-lr3e-3-16": {"num_examples": 256, "lr": 3e-3, "max_steps": 16,
                             "schedule": "constant", "eval_every": 4},
        "search-lr1e-3-64": {"num_examples": 1024, "lr": 1e-3, "max_steps": 64,
                             "schedule": "constant", "eval_every": 16},
    }, "retain_guard": 0.1},
}
"""Named attack suites, as ``AttackConfig`` overrides scaled to the toy world, sized by cost:
``seed`` (the default), ``short`` (every trial), ``long`` (finalists)."""

REAL_ATTACK: dict[str, Any] = {"per_device_batch": 1, "eval_every": 10}
"""What an attack on the real model changes besides the lr: one 2,048-token document per
forward pass (accumulated to the batch of 16)."""


def suite(name: str, *, real: bool = False) -> tuple[list[AttackConfig], float | None]:
    """The attacks of suite ``name`` and its retain guard; ``real``: scaled to the real model
    (lr x ``REAL_ATTACK_LR_SCALE``, ``REAL_ATTACK``; the long suite's larger corpus, eval every
    500 steps as Deep Ignorance did, is left to the caller's overrides)."""
    if name not in SUITES:
        raise ConfigError(f"attack suite={name!r} is invalid: allowed one of {', '.join(SUITES)}")
    attacks = []
    for attack_name, overrides in SUITES[name]["attacks"].items():
        attack = AttackConfig(name=attack_name, **overrides)
        if real:
            attack = dataclasses.replace(attack, lr=attack.lr * REAL_ATTACK_LR_SCALE,
                                         **{k: v for k, v in REAL_ATTACK.items()
                                            if k != "eval_every" or "eval_every" not in overrides})
        attacks.append(attack)
    return attacks, SUITES[name]["retain_guard"]
