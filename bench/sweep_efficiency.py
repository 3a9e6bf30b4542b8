"""How many trials each Optuna sampler needs to find the toy sweep's front, on a tabular
benchmark of the toy world's response surface.

The surface: ``raylens demo``'s sweep (the ``sft_adamw`` recipe as hand-tuned, 1,024 documents,
64 steps; searched: ``loss.retain_coef`` on a log scale from 0.003 to 10 and ``optim.lr`` from
3e-5 to 1e-2; toy_wmdp minimised, toy_mmlu maximised, toy_mmlu below 0.6 infeasible) measured
once on a dense grid of both settings, each point one real training run with its in-trial
evaluation (``--build``, about 26 s a point on 2 cores). The table, with the commit, date and
settings that made it, is ``bench/data/toy_surface.json``. Between grid points the two
accuracies are interpolated linearly in the log-scaled settings (scipy's
``RegularGridInterpolator``), so a sampler's continuous suggestions get a value.

The comparison: each sampler (the GP sampler, multi-objective TPE, NSGA-II, random search),
built by ``raylens.search.make_sampler`` as a sweep of ``--budget`` trials builds it (its random
start, NSGA-II's population), runs ``--trials`` trials against the table for each of ``--seeds``
seeds, the hand-tuned point first as in every raylens sweep, the retain floor told as a
constraint. Reported: the hypervolume of the feasible front after n trials (reference point:
toy_wmdp 1.0, toy_mmlu 0.6; Optuna's own hypervolume code) as the median and quartiles over the
seeds, and how many trials each sampler needs for its median to reach random search's median
after 48.

    python bench/sweep_efficiency.py --build [--grid 7]   # the table (about 22 min)
    python bench/sweep_efficiency.py [--seeds 20] [--budget 16]   # the comparison (5 min)
    python bench/sweep_efficiency.py --live gp tpe [--seed 0]      # live demo sweeps
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TABLE = Path(__file__).parent / "data" / "toy_surface.json"
SPACE = {"loss.retain_coef": (0.003, 10.0), "optim.lr": (3e-5, 1e-2)}
"""The demo sweep's space (``raylens.recipes.demo_sweep``), both on log scales."""
REFERENCE = (1.0, 0.6)
"""Hypervolume reference point: toy_wmdp 1.0 (nothing unlearned), toy_mmlu 0.6 (the floor)."""
MARKS = (4, 8, 12, 16, 24, 32, 48)
"""The trial counts the tables print."""


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


def samplers(seed: int, budget: int) -> dict:
    """The samplers compared, seeded, built as a raylens sweep of ``budget`` trials builds them
    (random start, NSGA-II's population)."""
    from raylens.search import make_sampler

    return {name: make_sampler(name, seed, budget) for name in ("gp", "tpe", "nsga2", "random")}


def volume_curve(outcomes) -> list[float]:
    """The feasible front's hypervolume after each ``(wmdp, mmlu, feasible)`` outcome in turn
    (Optuna's hypervolume code); an infeasible outcome adds nothing."""
    from optuna._hypervolume import compute_hypervolume

    reference = np.array([REFERENCE[0], -REFERENCE[1]])
    found: list[tuple[float, float]] = []
    out = []
    for wmdp, mmlu, feasible in outcomes:
        if feasible and wmdp < REFERENCE[0]:
            found.append((wmdp, -mmlu))
        out.append(float(compute_hypervolume(np.array(found), reference)) if found else 0.0)
    return out


def hypervolumes(surface: Surface, sampler, trials: int) -> list[float]:
    """The feasible front's hypervolume after each of ``trials`` trials of ``sampler``."""
    import optuna

    study = optuna.create_study(directions=["minimize", "maximize"], sampler=sampler)
    study.enqueue_trial(surface.base)  # the hand-tuned point, as every raylens sweep starts

    def outcomes():
        for _ in range(trials):
            trial = study.ask({k: optuna.distributions.FloatDistribution(lo, hi, log=True)
                               for k, (lo, hi) in SPACE.items()})
            wmdp, mmlu = surface(trial.params["loss.retain_coef"], trial.params["optim.lr"])
            trial.set_constraint("retain_floor", surface.floor - mmlu)
            study.tell(trial, [wmdp, mmlu])
            yield wmdp, mmlu, mmlu >= surface.floor

    return volume_curve(outcomes())


def compare(seeds: int, trials: int, budget: int) -> dict:
    """Every sampler, as a ``budget``-trial sweep builds it, for ``trials`` trials over ``seeds``
    seeds; prints the table and returns the figures."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if not TABLE.exists():
        raise SystemExit(f"{TABLE} is not built yet: python bench/sweep_efficiency.py --build")
    table = json.loads(TABLE.read_text())
    surface = Surface(table)
    curves: dict[str, list[list[float]]] = {}
    for seed in range(seeds):
        for name, sampler in samplers(seed, budget).items():
            curves.setdefault(name, []).append(hypervolumes(surface, sampler, trials))
    marks = [n for n in MARKS if n <= trials]
    median = {name: [statistics.median(c[n - 1] for c in runs) for n in range(1, trials + 1)]
              for name, runs in curves.items()}
    target = median["random"][min(48, trials) - 1]
    print(f"table {TABLE.name}: {len(table['points'])} points at {table['commit']} "
          f"({table['date']}); {seeds} seeds x {trials} trials per sampler, each built as a "
          f"{budget}-trial sweep builds it")
    print("hypervolume, median [25th, 75th percentile] over seeds, after n trials")
    print("sampler " + "".join(f"{f'n={n}':>24s}" for n in marks) + "   trials to random@48")
    figures: dict = {"target": target, "budget": budget, "seeds": seeds, "samplers": {}}
    for name, runs in curves.items():
        quartiles = {n: np.percentile([c[n - 1] for c in runs], [25, 50, 75]).tolist()
                     for n in marks}
        reach = next((n for n in range(1, trials + 1) if median[name][n - 1] >= target), None)
        print(f"{name:7s} " + "".join(f"{f'{q[1]:.4f} [{q[0]:.4f}, {q[2]:.4f}]':>24s}"
                                      for q in quartiles.values()) + f"   {reach}")
        figures["samplers"][name] = {"median": median[name], "trials_to_target": reach,
                                     "quartiles": quartiles}
    return figures


def _outcomes(study):
    """A study's ``(wmdp, mmlu, feasible)`` outcomes in the order its trials were suggested; a
    trial that did not complete is an infeasible one."""
    import optuna

    for trial in sorted(study.trials, key=lambda t: t.number):
        if trial.state != optuna.trial.TrialState.COMPLETE:
            yield None, None, False
        else:
            yield (*trial.values, all(v <= 0 for v in trial.constraints.values()))


def live(names: list[str], trials: int, seed: int) -> dict:
    """Run ``raylens demo`` once per sampler (``trials`` trials, sampler seed ``seed``), each in
    its own storage, and print each sweep's hypervolume after n trials, read from its Optuna
    study in the order the trials were suggested."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    figures = {}
    with tempfile.TemporaryDirectory() as storage:
        for name in names:
            sweep = f"live-{name}-s{seed}"
            start = time.monotonic()
            subprocess.run([sys.executable, "-m", "raylens.cli", "demo", "--name", sweep,
                            "--storage", storage,
                            "--trials", str(trials), "--set", f"sweep.sampler={name}",
                            "--set", f"sweep.seed={seed}"], check=False, cwd=storage,
                           stdout=subprocess.DEVNULL)  # its MLflow files in the storage too
            seconds = time.monotonic() - start
            study = optuna.load_study(study_name=sweep,
                                      storage=f"sqlite:///{storage}/{sweep}/optuna.db")
            curve = volume_curve(_outcomes(study))
            figures[name] = {"curve": curve, "seconds": round(seconds)}
            print(f"live {name:7s} seed {seed}: " + "  ".join(
                f"n={n} {curve[n - 1]:.4f}" for n in MARKS if n <= len(curve))
                + f"  ({len(curve)} trials, {seconds:.0f} s)", flush=True)
    return figures


def main() -> None:
    """Build the table (``--build``) or compare the samplers on it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true")
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--budget", type=int, default=16,
                        help="the sweep budget the samplers are built for (default 16)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--live", nargs="+", default=None, metavar="SAMPLER",
                        help="instead, run the demo sweep with each of these samplers "
                             "(--budget trials, --seed) and print its hypervolume after n trials")
    parser.add_argument("--seed", type=int, default=0, help="the sampler seed of --live")
    args = parser.parse_args()
    if args.build:
        build(args.grid)
        return
    if args.live:
        figures = live(args.live, args.budget, args.seed)
    else:
        figures = compare(args.seeds, args.trials, args.budget)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
