"""Sweep: full fine-tuning with AdamW (the seed runs' "SFT + AdamW" table).

The seed runs searched retain_coef 15-500, remove_coef 1-20 and lr 1e-5-5e-4 by hand, one axis at a
time, at 1,024 examples (32 steps, global batch 32, warmup 0.5) and found only collapsed or
unchanged models. Here Optuna searches all three on a log scale against both objectives. The base
point is the table's best-balanced row (retain 200, remove 1, lr 5e-4) with the table's objective
(docs/method.md): the retain KL summed per sequence (``batchmean``), retain weight from 0.25x.

    ray submit cluster.yaml sweeps/sft_adamw.py      # the real model on a GH200 cluster
    python sweeps/sft_adamw.py --toy                  # the toy world, on this machine
"""

import sys

from raylens.cli import sweep_main
from raylens.config import SweepConfig
from raylens.recipes import SEED_SETUP, demo_sweep, recipe

REAL_BASE = recipe("sft_adamw", {**SEED_SETUP,
    "data.num_examples": 1024, "batch.per_device_batch": 2, "loss.retain_coef": 200.0,
    "loss.remove_coef": 1.0, "optim.lr": 5e-4, "optim.warmup_ratio": 0.5,
    "loss.retain_loss": "kl", "loss.retain_reduction": "sequence", "loss.retain_start": 0.25,
    "scaling.num_workers": 4, "scaling.checkpoint_every": 8,
})
REAL = SweepConfig(
    name="sft_adamw", base=REAL_BASE,
    space={"loss.retain_coef": ("log", 1.0, 1000.0), "loss.remove_coef": ("log", 0.5, 30.0),
           "optim.lr": ("log", 1e-5, 1e-3)},
    num_trials=48, forget_task="wmdp_bio_robust", retain_task="mmlu", retain_floor=0.30,
)

TOY = demo_sweep(name="toy_sft_adamw")  # what `raylens demo` runs

if __name__ == "__main__":
    sys.exit(sweep_main(REAL, TOY))
