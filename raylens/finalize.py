"""Finish a sweep the way a paper needs it: its finalists re-scored on the full evaluation sets
and attacked with the long suite, their MLflow runs updated, the front recomputed.

Trials score a subset of each task during search (on the real model ±3 pp on 217 WMDP-Robust
questions), so a point on the search's front may be a noise winner. The finalists are the
front and every trial within one binomial standard error of it: a trial whose objectives,
each moved one standard error in its favour, no other trial would dominate. Each finalist's
export is scored with the fast scorer on every question (``final/<task>``, with its standard
error and count) and attacked with the long suite (``final/attack/...``, ``record_attack``);
the final front over the finalists is tagged ``final_pareto`` and plotted, with error bars, on
the sweep's run under ``final/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

from raylens.config import ScalingConfig, UnlearnConfig, from_flat, uses_toyworld
from raylens.evaluate import score_folder
from raylens.pareto import MAXIMISED, dominates, pareto_levels
from raylens.ray_train import run_attacks
from raylens.recipes import suite
from raylens.report import binomial_se, markdown_table, plot_front_png
from raylens.tracking import objectives_of, record_attack, record_final, trial_rows

_METRIC = {"forget_acc": "forget", "retain_acc": "retain", "attack_acc": "forget"}
"""Which task's question count gives an objective's standard error."""


def finalists(rows: list[dict], keys: tuple[str, ...], tasks: dict[str, str]) -> list[dict]:
    """The feasible rows that no other feasible row dominates once each of their objectives is
    moved one binomial standard error in their favour (the front is always among them)."""
    feasible = [r for r in rows if r["feasible"] and all(r.get(k) is not None for k in keys)]

    def hopeful(row: dict) -> dict:
        moved = dict(row)
        for k in keys:
            se = binomial_se(row[k], row, tasks[_METRIC[k]])
            moved[k] = row[k] + se if k in MAXIMISED else row[k] - se
        return moved

    return [r for r in feasible
            if not any(dominates(o, hopeful(r), keys) for o in feasible if o is not r)]


def _sweep_base(client, parent: dict) -> UnlearnConfig:
    """The sweep's base config, from the ``sweep.json`` its parent run holds."""
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(parent["run_id"], "sweep.json", tmp)
        return from_flat(UnlearnConfig, json.loads(Path(path).read_text())["base"])


def finalize(client, experiment: str, *, suite_name: str = "long",
             toyworld: Path | None = None, scaling: ScalingConfig | None = None,
             log=print) -> list[dict]:
    """Re-score and attack the finalists of sweep ``experiment``, update their runs, tag and
    plot the final front; returns one row per finalist with its search and final values
    (``final_forget_acc``, ``final_retain_acc``, ``final_attack_acc``, ``final_pareto``).
    ``scaling``: the attacks as Ray Train workers (Ray connected); None: in this process."""
    parent, rows = trial_rows(client, experiment)
    keys = objectives_of(parent)
    tasks = {"forget": parent["tags"]["forget_task"], "retain": parent["tags"]["retain_task"]}
    base = _sweep_base(client, parent)
    if uses_toyworld(base) and toyworld is None:
        raise ValueError(f"sweep {experiment!r} runs on the toy world: pass its folder")
    done = [r for r in rows if r["status"] == "ok"]
    chosen = finalists(done, keys, tasks)
    attacks, guard = suite(suite_name, real=not uses_toyworld(base))
    full_eval = dataclasses.replace(base.eval, subset=None,
                                    tasks=(tasks["forget"], tasks["retain"]))
    log(f"finalize {experiment}: {len(chosen)} finalists of {len(done)} finished trials "
        f"(the front and every trial within one standard error of it)")
    out = []
    for row in chosen:
        folder = Path(row["tags"].get("model_path", "")) / "model"
        if not (folder / "config.json").exists():
            log(f"{row['trial_id']}: no export at {folder} (deleted?): skipped")
            continue
        scores = score_folder(folder, full_eval, toyworld)
        attacked = run_attacks(folder, attacks, folder.parent / f"final-{suite_name}",
                               data=base.data, eval_config=full_eval,
                               tasks=(tasks["forget"], tasks["retain"]),
                               scaling=scaling or ScalingConfig(), on_ray=scaling is not None,
                               toyworld=toyworld, retain_guard=guard)
        record_final(client, row["run_id"], scores)
        record_attack(client, row["run_id"], attacked, suite_name, prefix="final/attack")
        out.append({**row, "final_forget_acc": scores[tasks["forget"]]["acc"],
                    "final_retain_acc": scores[tasks["retain"]]["acc"],
                    "final_attack_acc": attacked["worst"],
                    "final_attack": attacked["worst_attack"],
                    "final_n": {t: s["n"] for t, s in scores.items()}})
    _final_front(client, parent, out, keys, tasks)
    return out


def _final_front(client, parent: dict, rows: list[dict], keys: tuple[str, ...],
                 tasks: dict[str, str]) -> None:
    """Tag the finalists' front on their final values and plot it on the sweep's run."""
    final = [{**r, "forget_acc": r["final_forget_acc"], "retain_acc": r["final_retain_acc"],
              "attack_acc": r["final_attack_acc"],
              "metrics": {f"eval/{t}/n": n for t, n in r["final_n"].items()}} for r in rows]
    levels = pareto_levels(final, keys)
    for row, target, level in zip(rows, final, levels):
        row["final_pareto"] = target["pareto"] = level == 1
        client.set_tag(row["run_id"], "final_pareto", str(level == 1).lower())
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "front.png"
        plot_front_png(final, parent, png)
        client.log_artifact(parent["run_id"], str(png), "final")


def final_table(rows: list[dict], keys: tuple[str, ...], tasks: dict[str, str]) -> str:
    """The finalists: search (subset) and final (every question, ± one standard error)
    accuracies, the long suite's worst case and its attack, the final front marked."""
    def pm(acc: float, n: int) -> str:
        return f"{acc:.4f} ± {math.sqrt(acc * (1 - acc) / n):.4f}" if n else f"{acc:.4f}"

    cells = []
    for r in sorted(rows, key=lambda r: (not r["final_pareto"], r["final_" + keys[0]])):
        n_f, n_r = r["final_n"][tasks["forget"]], r["final_n"][tasks["retain"]]
        cells.append(["*" if r["final_pareto"] else "", r["trial_id"],
                      f"{r['forget_acc']:.4f}", pm(r["final_forget_acc"], n_f),
                      f"{r['retain_acc']:.4f}", pm(r["final_retain_acc"], n_r),
                      f"{r['final_attack_acc']:.4f}", r["final_attack"]])
    return markdown_table(["final front", "trial", f"{tasks['forget']} (search)",
                           f"{tasks['forget']} (all questions)", f"{tasks['retain']} (search)",
                           f"{tasks['retain']} (all questions)",
                           f"{tasks['forget']} after attacks", "worst attack"], cells)
