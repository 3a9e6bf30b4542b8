"""Sweep: LoRA + AdamW (the seed runs' best recipe: rank 16, retain 5, remove 5, lr 1e-3, 8,192
examples, 256 steps -> WMDP-Bio-Robust 23.16 %, MMLU 43.04 %).

The seed runs tried one point and one doubling of the data (which collapsed MMLU). Here Optuna searches
the two coefficients and the lr around it on a log scale. The base point is that run with its own
objective (docs/method.md, "The seed's objectives"): retain L2 over all 33 hidden states, averaged
over every padded position, retain weight ramping from 0.

    ray submit cluster.yaml sweeps/lora_adamw.py
    python sweeps/lora_adamw.py --toy
"""

import sys

from raylens.cli import sweep_main
from raylens.config import SweepConfig, replace
from raylens.recipes import SEED_SETUP, recipe

REAL_BASE = recipe("lora_adamw", {**SEED_SETUP,
    "data.num_examples": 8192, "batch.per_device_batch": 4, "loss.retain_coef": 5.0,
    "loss.remove_coef": 5.0, "optim.lr": 1e-3,
    "mode.lora_target_modules": None,  # PEFT's default for GPT-NeoX, as in the seed
    "loss.retain_layers": "all", "loss.retain_reduction": "padded_position",
    "loss.retain_start": 0.0,
    "scaling.num_workers": 4, "scaling.checkpoint_every": 64,
})
REAL = SweepConfig(
    name="lora_adamw", base=REAL_BASE,
    space={"loss.retain_coef": ("log", 0.5, 50.0), "loss.remove_coef": ("log", 0.5, 50.0),
           "optim.lr": ("log", 1e-4, 1e-2)},
    num_trials=32, forget_task="wmdp_bio_robust", retain_task="mmlu", retain_floor=0.30,
)

TOY = SweepConfig(
    name="toy_lora_adamw",
    base=replace(recipe("lora_adamw"), {"data.num_examples": 256, "batch.epochs": 8,
                                        "scaling.checkpoint_every": 0}),
    space={"loss.retain_coef": ("log", 0.5, 50.0), "optim.lr": ("log", 1e-3, 3e-2)},
    num_trials=12, retain_floor=0.6,
)

if __name__ == "__main__":
    sys.exit(sweep_main(REAL, TOY))
