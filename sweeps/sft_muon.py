"""Sweep: full fine-tuning with Muon for the blocks' matrices and AdamW for the rest (the seed
runs' "SFT + Muon" table: 1,024 examples, 32 steps, muon_lr 1e-3, adam_lr 3e-4, retain 1-3,
remove 0.5-2, every point either collapsed MMLU or barely unlearned). The base point is its best-MMLU
row with the table's optimizer and objective (docs/method.md): Muon's lr on AdamW's scale
(``match_rms_adamw``), AdamW betas (0.9, 0.95), the retain KL summed per sequence, retain weight
ramping from 0.

    ray submit cluster.yaml sweeps/sft_muon.py
    python sweeps/sft_muon.py --toy
"""

import sys

from raylens.cli import sweep_main
from raylens.config import SweepConfig, replace
from raylens.recipes import SEED_SETUP, recipe

REAL_BASE = recipe("sft_muon", {**SEED_SETUP,
    "data.num_examples": 1024, "batch.per_device_batch": 2, "loss.retain_coef": 1.5,
    "loss.remove_coef": 1.5, "optim.muon_lr": 1e-3, "optim.adam_lr": 3e-4,
    "loss.retain_loss": "kl", "loss.retain_reduction": "sequence", "loss.retain_start": 0.0,
    "scaling.num_workers": 4, "scaling.checkpoint_every": 8,
})
REAL = SweepConfig(
    name="sft_muon", base=REAL_BASE,
    space={"loss.retain_coef": ("log", 0.3, 30.0), "loss.remove_coef": ("log", 0.3, 10.0),
           "optim.muon_lr": ("log", 1e-4, 3e-2), "optim.adam_lr": ("log", 3e-5, 1e-3)},
    num_trials=48, forget_task="wmdp_bio_robust", retain_task="mmlu", retain_floor=0.30,
)

TOY = SweepConfig(
    name="toy_sft_muon",
    base=replace(recipe("sft_muon"), {"data.num_examples": 512, "scaling.checkpoint_every": 0}),
    space={"loss.retain_coef": ("log", 0.003, 3.0), "optim.muon_lr": ("log", 1e-3, 2.5e-2)},
    num_trials=12, retain_floor=0.6,
)

if __name__ == "__main__":
    sys.exit(sweep_main(REAL, TOY))
