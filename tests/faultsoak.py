"""The fault soak's parts that the local soak (``tests/test_soak.py``) and the cluster's
(``tests/cluster/soak.py``) share: the sweep, the canaries, the fault plan, the loop that runs a
sweep to its end while injecting the plan, what the records must show at the end, and the
search for leaked secrets. What differs between the two is how a driver is started and how a
fault is injected (a local process or server, or one on a node)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable

SWEEP_NAME = "soak"
SWEEP_FILE = """
import sys
from raylens.cli import sweep_main
from raylens.config import SweepConfig
from raylens.recipes import recipe
from raylens.config import replace

BASE = replace(recipe("sft_adamw"), {{"data.num_examples": 64, "scaling.checkpoint_every": 2,
                                      "scaling.max_failures": 2}})
TOY = REAL = SweepConfig(
    name="soak", base=BASE, num_trials={trials}, retain_floor=0.6, seed={seed},
    space={{"optim.lr": ("log", 1e-5, 300.0), "loss.retain_coef": ("log", 1e-3, 10.0),
            "eval.time_limit_s": ("choice", (0.05, 1800.0, 1800.0, 1800.0))}},
    attack_suite="short")

if __name__ == "__main__":
    sys.exit(sweep_main(REAL, TOY))
"""
"""A toy sweep whose space reaches the per-trial faults: a learning rate up to 300 (a NaN loss:
stopped early, diverged), a retain coefficient down to 1e-3 (a collapsed model) and an
evaluation limit of 0.05 s on a quarter of the draws (failed with the reason); the short attack
suite on every trial; checkpoints every 2 steps, so a killed worker resumes."""

KINDS = ("kill_worker", "kill_driver", "mlflow_down", "postgres_restart")
"""The faults injected from outside the trials."""

HF_CANARY = "hf_CANARYhuggingface0123456789"


def plan(rng: random.Random, span: float) -> list[tuple[float, str]]:
    """Every kind once and three more drawn at random, at random times over ``span`` s."""
    kinds = [*KINDS, *rng.choices(KINDS, k=3)]
    return sorted((rng.uniform(150, span), kind) for kind in kinds)


def run_with_faults(drivers: list, start_driver: Callable, plan: list[tuple[float, str]],
                    inject: Callable[[dict, list], bool], *, finished: Callable,
                    log_to: Path | None = None, max_drivers: int = 12) -> tuple[list, float]:
    """Run a sweep to its end, injecting ``plan``'s faults at their times.

    ``start_driver()`` starts a driver (a ``Popen``), appended to ``drivers`` (the caller's
    list, so that it can stop them after a failure); ``inject(event, drivers)`` injects
    ``event["kind"]`` (it may start a new driver itself, appending it to ``drivers``) and
    returns False when there was nothing to hit (no Train worker right now: tried again in
    5 s); ``finished(driver)`` says whether an ended driver finished the sweep. A driver that
    ends without finishing it (MLflow was down as it started) is started again, as its operator
    would. Returns (the faults injected, the seconds it took)."""
    drivers.append(start_driver())
    injected: list[dict] = []
    start = time.monotonic()
    while drivers[-1].poll() is None or plan:
        now = time.monotonic() - start
        if drivers[-1].poll() is not None:
            if finished(drivers[-1]) or len(drivers) > max_drivers:
                break
            injected.append({"kind": "driver_ended", "code": drivers[-1].returncode,
                             "at_s": round(now)})
            drivers.append(start_driver())
        if plan and now >= plan[0][0]:
            event = {"kind": plan.pop(0)[1], "at_s": round(now)}
            if inject(event, drivers):
                injected.append(event)
                if log_to is not None:  # to follow a soak while it runs
                    with open(log_to, "a") as f:
                        f.write(json.dumps(event) + "\n")
            else:
                plan.insert(0, (now + 5, event["kind"]))
        time.sleep(1)
    while not finished(drivers[-1]) and len(drivers) <= max_drivers:
        drivers.append(start_driver())  # ended while MLflow was down: the rerun writes it all
        drivers[-1].wait(3600)
    return injected, time.monotonic() - start


def records(client, study, name: str = SWEEP_NAME) -> dict:
    """What MLflow (``client``) and the Optuna ``study`` hold of sweep ``name``, as plain data
    (JSON, so a node can print it): one row per MLflow trial run, the Tune trials the study
    holds an outcome for (their latest finished Optuna trial, less the FAILs a killed driver left:
    a rerun adds a trial), those whose outcome failed, the front MLflow tags, the one
    recomputed from the surviving trials and Optuna's ``best_trials``."""
    from raylens.pareto import pareto_front
    from raylens.tracking import objectives_of, trial_rows

    parent, rows = trial_rows(client, name)
    keys = objectives_of(parent)
    outcome = {}  # a Tune trial's outcome: its latest finished Optuna trial (a rerun adds one)
    for t in study.trials:
        if t.state.is_finished() and t.user_attrs.get("failed_because") != "driver crashed":
            outcome[t.user_attrs.get("tune_trial_id")] = t
    return {
        "rows": [{"trial_id": r["trial_id"], "status": r["status"],
                  "run_status": client.get_run(r["run_id"]).info.status,
                  "reason": r["tags"].get("reason", ""),
                  "failure_reason": r["tags"].get("failure_reason", ""),
                  "attack_acc": r["attack_acc"], "resumed_from": r["metrics"].get("resumed_from"),
                  "nodes": r["tags"].get("nodes", "")} for r in rows],
        "optuna_counted": sorted(outcome),
        "optuna_failed": sorted(k for k, t in outcome.items() if t.state.name == "FAIL"),
        "optuna_driver_crashed": sum(t.user_attrs.get("failed_because") == "driver crashed"
                                     for t in study.trials),
        "tagged_front": sorted(r["trial_id"] for r in rows if r["pareto"]),
        "recomputed_front": sorted(r["trial_id"] for r in pareto_front(
            [r for r in rows if r["status"] != "failed"], keys)),
        "optuna_front": sorted(t.user_attrs["tune_trial_id"] for t in study.best_trials),
    }


def check(found: dict, trials: int, on_disk: set[str] | None = None) -> dict[str, int]:
    """Assert what ``records`` found: every trial once in MLflow and with one outcome in the
    study, the same (failed in both or in neither), each with a final status and its reason,
    the attacks recorded where a trial was scored, the three fronts equal and not empty;
    ``on_disk`` (trial folders) all accounted for. Returns the trials by status."""
    rows = found["rows"]
    ids = [r["trial_id"] for r in rows]
    assert len(rows) == trials and len(set(ids)) == trials, ids
    assert found["optuna_counted"] == sorted(ids), (found["optuna_counted"], ids)
    failed = sorted(r["trial_id"] for r in rows if r["status"] == "failed")
    assert found["optuna_failed"] == failed, (found["optuna_failed"], failed)  # same outcome
    if on_disk is not None:
        assert on_disk <= set(ids), on_disk - set(ids)
    statuses: dict[str, int] = {}
    for row in rows:
        status = row["status"]
        assert status in ("ok", "collapsed", "diverged", "failed"), row
        assert row["run_status"] in ("FINISHED", "FAILED"), row
        if status == "failed":
            assert row["failure_reason"], row
        elif status != "ok":
            assert row["reason"].startswith(status), row
        if status in ("ok", "collapsed"):
            assert row["attack_acc"] is not None, row  # the attacks ran and were recorded
        statuses[status] = statuses.get(status, 0) + 1
    tagged, recomputed, best = (found["tagged_front"], found["recomputed_front"],
                                found["optuna_front"])
    assert tagged == recomputed == best and tagged, (tagged, recomputed, best)
    return statuses


def leaks(places: list[Path], secrets: dict[str, str],
          skip: Callable[[Path], bool] = lambda _: False) -> tuple[int, list[str]]:
    """How many files under ``places`` were searched and which hold one of ``secrets``' values
    (files ``skip`` names, the ones meant to hold a credential, are not searched)."""
    searched, found = 0, []
    for place in places:
        for path in place.rglob("*"):
            if not path.is_file() or path.is_symlink() or skip(path):
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            searched += 1
            found += [f"{path}: {k}" for k, v in secrets.items() if v.encode() in data]
    return searched, found
