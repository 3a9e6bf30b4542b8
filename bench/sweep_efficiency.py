"""How many trials each Optuna sampler needs to find the toy sweep's front, on a tabular
benchmark of the toy world's response surface.

The surface: ``raylens demo``'s sweep (the ``sft_adamw`` recipe as hand-tuned, 1,024 documents,
64 steps; searched: ``loss.retain_coef`` on a log scale from 0.003 to 10 and ``optim.lr`` from
3e-5 to 1e-2; toy_wmdp minimised, toy_mmlu maximised, toy_mmlu below 0.6 infeasible) measured
once on a dense grid of both settings, each point one real training run with its in-trial
evaluation (``--build``, about 50 s a point on 2 cores). The table, with the commit, date and
settings that made it, is ``bench/data/toy_surface.json``. Between grid points the two
accuracies are interpolated linearly in the log-scaled settings (scipy's
``RegularGridInterpolator``), so a sampler's continuous suggestions get a value.

The comparison: each sampler (multi-objective TPE, NSGA-II with raylens's population, the GP
sampler, random search) runs ``--trials`` trials against the table for each of ``--seeds``
seeds, the hand-tuned point first as in every raylens sweep, the retain floor told as a
constraint. Reported: the hypervolume of the feasible front after n trials (reference point:
toy_wmdp 1.0, toy_mmlu 0.6; Optuna's own hypervolume code) as the median and quartiles over the
seeds, and how many trials each sampler needs for its median to reach random search's median
after 48.

    python bench/sweep_efficiency.py --build [--grid 7]   # the table (about 40 min)
    python bench/sweep_efficiency.py [--seeds 20]          # the comparison (minutes)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

TABLE = Path(__file__).parent / "data" / "toy_surface.json"
SPACE = {"loss.retain_coef": (0.003, 10.0), "optim.lr": (3e-5, 1e-2)}
"""The demo sweep's space (``raylens.recipes.demo_sweep``), both on log scales."""
REFERENCE = (1.0, 0.6)
"""Hypervolume reference point: toy_wmdp 1.0 (nothing unlearned), toy_mmlu 0.6 (the floor)."""


def build(grid: int) -> None:
    """Run the demo's trial at every point of a ``grid`` x ``grid`` log-spaced grid and write
    the table."""
    import raylens  # noqa: F401
    from raylens import toyworld as tw
    from raylens.config import replace, to_flat
    from raylens.recipes import demo_sweep
    from raylens.search import objectives
    from raylens.train import run

    world = tw.load_or_build()
    sweep = demo_sweep()
    axes = {k: np.geomspace(lo, hi, grid).tolist() for k, (lo, hi) in SPACE.items()}
    points = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for i, coef in enumerate(axes["loss.retain_coef"]):
            for j, lr in enumerate(axes["optim.lr"]):
                config = replace(sweep.base, {"loss.retain_coef": coef, "optim.lr": lr})
                report = run(config, Path(tmp) / f"{i}-{j}", toyworld=world.root,
                             log=lambda *_: None)
                result = objectives(report, sweep)
                points.append({"loss.retain_coef": coef, "optim.lr": lr, "wmdp": result["wmdp"],
                               "mmlu": result["mmlu"], "infeasible": result["infeasible"]})
                print(f"[{time.monotonic() - start:6.0f} s] retain_coef {coef:.4g} lr {lr:.3g}: "
                      f"toy_wmdp {result['wmdp']:.4f} toy_mmlu {result['mmlu']:.4f} "
                      f"{result['infeasible']}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    TABLE.parent.mkdir(exist_ok=True)
    TABLE.write_text(json.dumps({
        "made_by": "python bench/sweep_efficiency.py --build", "commit": commit,
        "date": time.strftime("%Y-%m-%d"), "world": world.root.name,
        "sweep": "raylens.recipes.demo_sweep() (sft_adamw, 1,024 documents, 64 steps)",
        "retain_floor": sweep.retain_floor, "base": {k: to_flat(sweep.base)[k] for k in SPACE},
        "axes": axes, "points": points,
        "seconds": round(time.monotonic() - start)}, indent=1))
    print(f"wrote {TABLE}")


class Surface:
    """The table as a function of the settings: both accuracies interpolated linearly in the
    log-scaled settings."""

    def __init__(self, table: dict):
        from scipy.interpolate import RegularGridInterpolator

        self.floor, self.base = table["retain_floor"], table["base"]
        axes = [np.log(table["axes"][k]) for k in SPACE]
        shape = tuple(len(a) for a in axes)
        by_point = {(p["loss.retain_coef"], p["optim.lr"]): p for p in table["points"]}
        keys = [(c, lr) for c in table["axes"]["loss.retain_coef"]
                for lr in table["axes"]["optim.lr"]]
        self.value = {name: RegularGridInterpolator(
            axes, np.array([by_point[k][name] for k in keys]).reshape(shape))
            for name in ("wmdp", "mmlu")}

    def __call__(self, coef: float, lr: float) -> tuple[float, float]:
        """(toy_wmdp, toy_mmlu) at these settings."""
        x = [[math.log(coef), math.log(lr)]]
        return float(self.value["wmdp"](x)[0]), float(self.value["mmlu"](x)[0])


def samplers(seed: int, trials: int) -> dict:
    """The samplers compared, seeded; NSGA-II with the population raylens gives it."""
    import optuna

    return {"tpe": optuna.samplers.TPESampler(seed=seed),
            "nsga2": optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, trials // 3)),
            "gp": optuna.samplers.GPSampler(seed=seed),
            "random": optuna.samplers.RandomSampler(seed=seed)}


def hypervolumes(surface: Surface, sampler, trials: int) -> list[float]:
    """The feasible front's hypervolume after each of ``trials`` trials of ``sampler``."""
    import optuna
    from optuna._hypervolume import compute_hypervolume

    study = optuna.create_study(directions=["minimize", "maximize"], sampler=sampler)
    study.enqueue_trial(surface.base)  # the hand-tuned point, as every raylens sweep starts
    reference = np.array([REFERENCE[0], -REFERENCE[1]])
    found: list[tuple[float, float]] = []
    out = []
    for _ in range(trials):
        trial = study.ask({k: optuna.distributions.FloatDistribution(lo, hi, log=True)
                           for k, (lo, hi) in SPACE.items()})
        wmdp, mmlu = surface(trial.params["loss.retain_coef"], trial.params["optim.lr"])
        trial.set_constraint("retain_floor", surface.floor - mmlu)
        study.tell(trial, [wmdp, mmlu])
        if mmlu >= surface.floor and wmdp < REFERENCE[0]:
            found.append((wmdp, -mmlu))
        out.append(float(compute_hypervolume(np.array(found), reference))
                   if found else 0.0)
    return out


def compare(seeds: int, trials: int) -> dict:
    """Every sampler over ``seeds`` seeds; prints the table and returns the figures."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if not TABLE.exists():
        raise SystemExit(f"{TABLE} is not built yet: python bench/sweep_efficiency.py --build")
    table = json.loads(TABLE.read_text())
    surface = Surface(table)
    curves: dict[str, list[list[float]]] = {}
    for seed in range(seeds):
        for name, sampler in samplers(seed, trials).items():
            curves.setdefault(name, []).append(hypervolumes(surface, sampler, trials))
    marks = [n for n in (4, 8, 12, 16, 24, 32, 48) if n <= trials]
    median = {name: [statistics.median(c[n - 1] for c in runs) for n in range(1, trials + 1)]
              for name, runs in curves.items()}
    target = median["random"][min(48, trials) - 1]
    print(f"table {TABLE.name}: {len(table['points'])} points at {table['commit']} "
          f"({table['date']}); {seeds} seeds x {trials} trials per sampler")
    print("hypervolume, median [25th, 75th percentile] over seeds, after n trials")
    print("sampler " + "".join(f"{f'n={n}':>22s}" for n in marks) + "   trials to random@48")
    figures: dict = {"target": target, "samplers": {}}
    for name, runs in curves.items():
        cells = []
        for n in marks:
            q = np.percentile([c[n - 1] for c in runs], [25, 50, 75])
            cells.append(f"{q[1]:.4f} [{q[0]:.4f}, {q[2]:.4f}]")
        reach = next((n for n in range(1, trials + 1) if median[name][n - 1] >= target), None)
        print(f"{name:7s} " + "".join(f"{c:>22s}" for c in cells) + f"   {reach}")
        figures["samplers"][name] = {"median": median[name], "trials_to_target": reach}
    return figures


def main() -> None:
    """Build the table (``--build``) or compare the samplers on it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true")
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.build:
        build(args.grid)
        return
    figures = compare(args.seeds, args.trials)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
