"""Sweep: FSDP2 + Muon across two GH200 nodes (8 GPUs per trial; the seed runs' "FSDP2 + Muon"
table: 128-1,024 examples, muon_lr 0.02, adam_lr 3e-4, retain 5-400, remove 5; its runs ended in
a collapsed MMLU, negative "L2" losses from a bad reduction, or failed saves). The base point is
its 1,024-example row with the table's optimizer and objective (docs/method.md): Muon on AdamW's
scale, betas (0.9, 0.95), the retain KL summed per sequence (here in fp32, per real token summed),
retain weight from 0.25x.

    ray submit cluster.yaml sweeps/fsdp2_muon.py
    python sweeps/fsdp2_muon.py --toy      # 2 CPU workers per trial (FSDP2 over gloo)
"""

import sys

from raylens.cli import sweep_main
from raylens.config import SweepConfig, replace
from raylens.recipes import SEED_SETUP, recipe

REAL_BASE = recipe("sft_muon", {**SEED_SETUP,
    "data.num_examples": 1024, "batch.per_device_batch": 1, "loss.retain_coef": 20.0,
    "loss.remove_coef": 5.0, "optim.muon_lr": 0.02, "optim.adam_lr": 3e-4,
    "loss.retain_loss": "kl", "loss.retain_reduction": "sequence", "loss.retain_start": 0.25,
    "scaling.num_workers": 8, "scaling.checkpoint_every": 8,
})
REAL = SweepConfig(
    name="fsdp2_muon", base=REAL_BASE,
    space={"loss.retain_coef": ("log", 1.0, 500.0), "loss.remove_coef": ("log", 0.5, 20.0),
           "optim.muon_lr": ("log", 1e-3, 5e-2)},
    num_trials=24, forget_task="wmdp_bio_robust", retain_task="mmlu", retain_floor=0.30,
)

TOY = SweepConfig(
    name="toy_fsdp2_muon",
    base=replace(recipe("sft_muon"), {"data.num_examples": 256, "scaling.num_workers": 2,
                                      "batch.per_device_batch": 16, "scaling.checkpoint_every": 0}),
    space={"loss.retain_coef": ("log", 0.003, 3.0), "optim.muon_lr": ("log", 1e-3, 2.5e-2)},
    num_trials=6, retain_floor=0.6,
)

if __name__ == "__main__":
    sys.exit(sweep_main(REAL, TOY))
