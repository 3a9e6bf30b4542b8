"""Sweeps: Ray Tune drives trials, Optuna chooses their settings against two objectives at once.

A trial is a Tune function: it applies the sampled settings to the sweep's base config, runs the
training as a Ray Train job (``train.fit_on_ray``: DDP or FSDP2 workers, checkpoints, in-trial
evaluation on the live model) and reports ``wmdp`` (forget-task accuracy, minimised) and ``mmlu``
(retain-task accuracy, maximised). Optuna's multi-objective sampler (Gaussian process by
default; TPE, NSGA-II or random) reads them through ``OptunaSearch``; its study lives in an RDB
(sqlite beside the sweep by default) so the Pareto front survives the driver. Diverged
(non-finite loss or accuracy) and collapsed (retain accuracy below the sweep's floor) trials are
recorded with the reason and carry a violated Optuna constraint, so they never count as Pareto
points. Rerunning a sweep with the same name restores Tune's experiment: finished trials are
kept, trials the crash left running in Optuna are marked failed, and the remaining budget runs.
With ``attack_suite`` the trial's workers attack its export after scoring it
(``raylens.attack``); the suite's worst post-attack forget accuracy (``attack_wmdp``) is
recorded, or searched ``instead`` of or ``beside`` ``wmdp``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import optuna
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from raylens.attack import check
from raylens.config import (
    ConfigError,
    SweepConfig,
    redact_url,
    replace,
    to_flat,
    uses_toyworld,
)
from raylens.evaluate import evaluate_base
from raylens.pareto import beaten_by, pareto_front
from raylens.preflight import preflight
from raylens.ray_train import DRIVER_RESOURCE, check_placeable, connect_ray, fit_on_ray
from raylens.recipes import suite
from raylens.report import markdown_table
from raylens.tracking import (
    Tracker,
    fail_open_trial,
    finish_sweep,
    record_attack,
    record_failure,
    record_trial,
    resolve_uri,
    start_sweep,
    trial_recorded,
    trial_run,
    update_front,
)
from raylens.train import encoded_questions


@dataclass(frozen=True)
class SweepPaths:
    """Where a sweep keeps its state, all under ``<storage>/<name>/``."""

    root: Path

    @property
    def tune(self) -> Path:
        """Tune's experiment storage (the experiment folder is ``tune/<name>``)."""
        return self.root / "tune"

    @property
    def train(self) -> Path:
        """Ray Train storage: each trial's checkpoints, under ``train/<trial id>``."""
        return self.root / "train"

    @property
    def trials(self) -> Path:
        """Each trial's export (``model/``, ``adapter/``), history and report."""
        return self.root / "trials"

    @property
    def study_url(self) -> str:
        """The Optuna storage URL (sqlite in the sweep folder)."""
        return f"sqlite:///{(self.root / 'optuna.db').resolve()}"


def paths(sweep: SweepConfig) -> SweepPaths:
    """Where the sweep ``sweep`` keeps its trials, study and Ray storage."""
    return SweepPaths(Path(sweep.storage).resolve() / sweep.name)


def base_point(sweep: SweepConfig) -> dict:
    """The base config's values of the searched settings: the hand-tuned point."""
    base = to_flat(sweep.base)
    return {k: base[k] for k in sweep.space}


def objectives(report: dict, sweep: SweepConfig) -> dict:
    """The values a trial reports to Tune from its training report: ``wmdp``, ``mmlu``,
    ``feasible``, ``infeasible`` (``diverged``, ``collapsed`` or ``""``), ``reason`` (the
    sentence: the step and loss, or the accuracy and floor) and ``constraint`` (Optuna's: <= 0
    is feasible)."""
    scores = report["eval"] or {}  # None: the run diverged and stopped before scoring
    wmdp = scores.get(sweep.forget_task, {}).get("acc")
    mmlu = scores.get(sweep.retain_task, {}).get("acc")
    losses = [report.get("retain_loss"), report.get("forget_loss")]
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    if not all(finite(v) for v in [*losses, wmdp, mmlu]):
        reason, constraint = "diverged", 1.0
        why = report.get("diverged") or "diverged: " + ", ".join(
            f"{k} {v}" for k, v in zip(("retain_loss", "forget_loss", sweep.forget_task,
                                        sweep.retain_task), [*losses, wmdp, mmlu])
            if not finite(v))
    elif mmlu < sweep.retain_floor:
        reason, constraint = "collapsed", sweep.retain_floor - mmlu
        why = (f"collapsed: {sweep.retain_task} {mmlu:.4f} is below sweep.retain_floor="
               f"{sweep.retain_floor:g}")
    else:
        reason, constraint, why = "", sweep.retain_floor - mmlu, ""
    return {"wmdp": wmdp if finite(wmdp) else 1.0, "mmlu": mmlu if finite(mmlu) else 0.0,
            "feasible": not reason, "infeasible": reason, "reason": why,
            "constraint": constraint}


METRICS = {"forget_acc": ("wmdp", "min"), "attack_acc": ("attack_wmdp", "min"),
           "retain_acc": ("mmlu", "max")}
"""Each row objective's Tune metric and direction."""


def attack_spec(sweep: SweepConfig) -> dict | None:
    """The sweep's attack suite as ``fit_on_ray`` takes it (toy- or real-scaled by the base
    config), or None without one."""
    if sweep.attack_suite is None:
        return None
    attacks, guard = suite(sweep.attack_suite, real=not uses_toyworld(sweep.base))
    return {"attacks": [to_flat(a) for a in attacks], "retain_guard": guard,
            "tasks": [sweep.forget_task, sweep.retain_task]}


def _trial(params: dict, *, sweep: SweepConfig, toyworld: str | None,
           tracker: Tracker | None = None, questions=None) -> None:
    """One trial (a Tune function trainable): base config + sampled settings -> Ray Train run ->
    objectives. Every value reported is also written to ``trials/<id>/result.json``; with a
    ``tracker`` the trial is a nested MLflow run (step curves from rank 0, eval metrics,
    artifacts), marked failed with the reason if anything raises. ``questions``: the evaluation
    questions the driver encoded (``train.encoded_questions``), for the trial's workers."""
    import ray.tune

    config = replace(sweep.base, params)
    trial_id = ray.tune.get_context().get_trial_id()
    where = paths(sweep)
    out = where.trials / trial_id
    keep = _kept(sweep, trial_id, params)
    earlier = _finished_earlier(out, keep, sweep, tracker)
    if earlier is not None:  # finished before the driver crashed: report, not rerun
        _drop_checkpoints(where, trial_id)
        ray.tune.report(earlier)
        return
    hand_tuned = keep["hand_tuned"]
    run_id = ""
    if tracker:
        try:
            run_id = trial_run(tracker, trial_id, config, hand_tuned)
        except Exception as exc:  # MLflow down: train anyway, record once it is back
            print(f"MLflow did not answer ({type(exc).__name__}: {exc}); trial {trial_id} runs "
                  "and is recorded when the server is back")
    try:
        report = fit_on_ray(config, out=out, storage_path=where.train, name=trial_id,
                            toyworld=Path(toyworld) if toyworld else None,
                            mlflow_run=(tracker.uri, run_id) if tracker and run_id else None,
                            attack=attack_spec(sweep), questions=questions)
        if report["eval_error"]:
            raise RuntimeError(f"evaluation failed: {report['eval_error']}")
        result = {**objectives(report, sweep), **{f"param/{k}": v for k, v in params.items()},
                  "retain_loss": report["retain_loss"], "forget_loss": report["forget_loss"],
                  "num_steps": report["num_steps"], "trial_dir": str(out),
                  **{f"acc/{task}": s["acc"] for task, s in (report["eval"] or {}).items()}}
        if report.get("diverged"):
            result["diverged"] = report["diverged"]
        if sweep.attack_suite and not report.get("diverged"):  # by the trial's workers
            suite = json.loads((out / "attack" / "suite.json").read_text())
            result |= {"attack_wmdp": suite["worst"], "attack_worst": suite["worst_attack"],
                       "attack_recovery": suite["recovery"]}
    except Exception as exc:
        if tracker:
            failure = f"{type(exc).__name__}: {exc}"
            _record_or_keep(lambda error=exc: record_failure(
                tracker, run_id or trial_run(tracker, trial_id, config, hand_tuned), error),
                out, {**keep, "failure": failure})
        raise
    (out / "result.json").write_text(json.dumps(result, indent=1))
    if tracker:
        _record_or_keep(lambda: _record_finished(tracker, out, keep, sweep, run_id), out, keep)
    _drop_checkpoints(where, trial_id)  # recorded (or kept for MLflow): it will never resume
    ray.tune.report(result)


PENDING = "mlflow_pending.json"
"""In a trial's folder: what MLflow has not taken yet (the server was down), for ``sync_pending``."""


def _kept(sweep: SweepConfig, trial_id: str, params: dict) -> dict:
    """What a trial's MLflow record needs beside its folder: its id, whether it is the
    hand-tuned point, and its flat config."""
    return {"trial_id": trial_id, "hand_tuned": params == base_point(sweep),
            "config": to_flat(replace(sweep.base, params))}


def _finished_earlier(out: Path, keep: dict, sweep: SweepConfig,
                      tracker: Tracker | None) -> dict | None:
    """The result of a trial that finished before the driver crashed (its ``result.json``, for
    these settings), or None when it must run. The crash can land between that file and the end
    of its MLflow record (the trial's process dies with the driver): a run not yet ended is
    recorded again from the folder, else it would stay RUNNING with half its record."""
    done = out / "result.json"
    if not done.exists():
        return None
    result = json.loads(done.read_text())
    if any(result.get(f"param/{k}") != keep["config"][k] for k in sweep.space):
        return None
    if tracker:
        def record() -> None:
            if not trial_recorded(tracker, keep["trial_id"]):
                _record_finished(tracker, out, keep, sweep)

        _record_or_keep(record, out, keep)
    return result


def _record_or_keep(record, out: Path, keep: dict) -> None:
    """``record()``; if MLflow does not take it, ``out/mlflow_pending.json`` keeps what is
    needed to write it later: the trial's result is never lost with the server."""
    try:
        record()
    except Exception as exc:
        out.mkdir(parents=True, exist_ok=True)
        (out / PENDING).write_text(json.dumps({**keep, "error": f"{type(exc).__name__}: {exc}"}))
        print(f"MLflow did not take trial {keep['trial_id']} ({type(exc).__name__}: {exc}); "
              f"kept in {out / PENDING} until the server is back")


def _record_finished(tracker: Tracker, out: Path, keep: dict, sweep: SweepConfig,
                     run_id: str = "") -> None:
    """A finished trial's MLflow record, from its folder alone: its run (created if MLflow was
    down when it started), curves, attack suite, scores, tags and artifacts."""
    from raylens.config import UnlearnConfig, from_flat

    config = from_flat(UnlearnConfig, keep["config"])
    run_id = run_id or trial_run(tracker, keep["trial_id"], config, keep["hand_tuned"])
    if (out / "attack" / "suite.json").exists():
        record_attack(tracker.client, run_id, json.loads((out / "attack" / "suite.json")
                                                         .read_text()), str(sweep.attack_suite))
    record_trial(tracker, run_id, report=json.loads((out / "train_report.json").read_text()),
                 result=json.loads((out / "result.json").read_text()), out=out,
                 max_model_mb=config.tracking.max_model_mb)


def sync_pending(tracker: Tracker, sweep: SweepConfig) -> list[Path]:
    """Write to MLflow every trial kept in ``mlflow_pending.json`` while it was down; returns
    the trial folders still waiting (the server is still down)."""
    from raylens.config import UnlearnConfig, from_flat

    waiting = []
    for marker in sorted(paths(sweep).trials.glob(f"*/{PENDING}")):
        keep, out = json.loads(marker.read_text()), marker.parent
        try:
            if "failure" in keep:
                config = from_flat(UnlearnConfig, keep["config"])
                record_failure(tracker, trial_run(tracker, keep["trial_id"], config,
                                                  keep["hand_tuned"]), keep["failure"])
            else:
                _record_finished(tracker, out, keep, sweep)
        except Exception:
            waiting.append(out)
            continue
        marker.unlink()
    return waiting


class _FrontCallback(Callback):
    """Tune callback on the driver: after each finished trial, write what MLflow missed while
    it was down (``sync_pending``), re-tag the Pareto front and redraw its plot; a trial whose
    process died before it could record is marked failed with Tune's error. MLflow being down
    never stops the sweep: what it misses waits in the trials' folders."""

    def __init__(self, tracker: Tracker, sweep: SweepConfig):
        self.tracker, self.sweep = tracker, sweep

    def _front(self) -> None:
        try:
            sync_pending(self.tracker, self.sweep)
            update_front(self.tracker)
        except Exception as exc:
            print(f"MLflow did not answer ({type(exc).__name__}); the front is tagged when it "
                  "is back")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._front()

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = str(trial.get_error() or "trial errored")
        try:
            fail_open_trial(self.tracker, trial.trial_id, reason)
        except Exception:
            out = paths(self.sweep).trials / trial.trial_id
            out.mkdir(parents=True, exist_ok=True)
            keep = _kept(self.sweep, trial.trial_id, dict(trial.config or {}))
            (out / PENDING).write_text(json.dumps({**keep, "failure": reason[:4000]}))
        self._front()


def baseline(sweep: SweepConfig, toyworld: Path | None = None) -> dict:
    """The unmodified model's scores on the sweep's eval tasks (``train.evaluate_base`` in a Ray
    task, on a GPU when trials use GPUs), computed once and kept in ``<sweep>/baseline.json``."""
    import ray

    path = paths(sweep).root / "baseline.json"
    if path.exists():
        return json.loads(path.read_text())
    task = ray.remote(num_cpus=1, num_gpus=1 if sweep.base.scaling.use_gpu else 0)(evaluate_base)
    scores = ray.get(task.remote(sweep.base, toyworld))
    path.write_text(json.dumps(scores, indent=1))
    return scores


def study_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna study's storage. Pooled connections are tested before use (Optuna does so
    only for MySQL): a PostgreSQL server restarted mid-sweep would otherwise hand the searcher a
    dead connection and end the sweep."""
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def _tune_space(space: dict[str, tuple]) -> dict:
    from ray import tune

    make = {"log": lambda lo, hi: tune.loguniform(lo, hi),
            "uniform": lambda lo, hi: tune.uniform(lo, hi),
            "int": lambda lo, hi: tune.randint(int(lo), int(hi) + 1)}
    return {k: tune.choice(list(s[1])) if s[0] == "choice" else make[s[0]](*s[1:])
            for k, s in space.items()}


def make_sampler(name: str, seed: int, num_trials: int):
    """The Optuna sampler ``sweep.sampler`` names, seeded and sized for a budget of
    ``num_trials`` (``bench/sweep_efficiency.py`` compares the same ones). Every one reads the
    retain-floor constraint from the trials (``Trial.set_constraint``). The model-based samplers
    start from a quarter of the budget in random trials (4 to Optuna's 10): on the toy surface a
    16-trial sweep's GP reaches random search's 48-trial hypervolume in 8 trials, against 11
    with 10 (docs/results.md). NSGA-II's population is a third of the budget (at least 4), so
    a small sweep sees a few generations."""
    startup = min(10, max(4, num_trials // 4))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, num_trials // 3))
    return optuna.samplers.RandomSampler(seed=seed)


def _searcher(sweep: SweepConfig, study_url: str):
    """``OptunaSearch`` on both objectives with a persistent study; each finished trial's
    feasibility becomes an Optuna constraint before Optuna is told its values."""
    sampler = make_sampler(sweep.sampler, sweep.seed, sweep.num_trials)
    first = [base_point(sweep)] if sweep.evaluate_base_first else None
    return _ConstrainedOptunaSearch(
        space=OptunaSearch.convert_search_space(_tune_space(sweep.space)),
        metric=[METRICS[k][0] for k in sweep.objectives],
        mode=[METRICS[k][1] for k in sweep.objectives],
        points_to_evaluate=first, sampler=sampler, study_name=sweep.name,
        storage=study_storage(study_url))


class _ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that records, on the Optuna trial, the Tune trial id, the infeasibility reason
    and the retain-floor constraint before the values are told (samplers read constraints then)."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return super().on_trial_complete(trial_id, result=result, error=error)
        attrs: dict[str, str | float] = {"tune_trial_id": trial_id}
        if result and "constraint" in result:
            attrs |= {"constraint": float(result["constraint"]),
                      "infeasible": result.get("infeasible", "")}
        frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
        if frozen.state == optuna.trial.TrialState.COMPLETE:  # told before the crash
            self._completed_trials.add(trial_id)
            return None
        if frozen.state.is_finished():
            # FAIL: a trial the crashed driver left running (marked so on resume), or one that
            # errored and that the resume retried; Tune reran it. Its outcome becomes a new
            # Optuna trial with the same settings, a failed rerun too (else the study would keep
            # only the earlier FAIL and lose the outcome): the latest trial of a Tune trial id is
            # its outcome
            self._completed_trials.add(trial_id)
            if result and all(result.get(m) is not None for m in self.metric):
                self._ot_study.add_trial(optuna.trial.create_trial(
                    params=frozen.params, distributions=frozen.distributions,
                    values=[result[m] for m in self.metric], user_attrs=attrs,
                    constraints={"retain_floor": attrs.get("constraint", 0.0)}))
            else:
                self._ot_study.add_trial(optuna.trial.create_trial(
                    params=frozen.params, distributions=frozen.distributions,
                    user_attrs=attrs, state=optuna.trial.TrialState.FAIL))
            return None
        for key, value in attrs.items():
            ot_trial.set_user_attr(key, value)
        if "constraint" in attrs:  # <= 0 feasible; samplers and best_trials read it
            ot_trial.set_constraint("retain_floor", attrs["constraint"])
        return super().on_trial_complete(trial_id, result=result, error=error)


def fail_orphaned_trials(study_url: str, study_name: str) -> int:
    """Mark Optuna trials a crashed driver left RUNNING as FAIL (their Tune trials rerun or are
    dropped by ``Tuner.restore``); returns how many."""
    storage = study_storage(study_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    orphans = [t for t in storage.get_all_trials(study_id, deepcopy=False)
               if t.state == optuna.trial.TrialState.RUNNING]
    for trial in orphans:
        storage.set_trial_user_attr(trial._trial_id, "failed_because", "driver crashed")
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return len(orphans)


def _drop_checkpoints(where: SweepPaths, trial_id: str) -> int:
    """Delete a finished trial's Ray Train checkpoints (its export, history and report stay):
    on the real model each is tens of GB. Returns how many were deleted."""
    run = where.train / trial_id
    dropped = 0
    for folder in sorted(run.glob("checkpoint_*")) if run.is_dir() else []:
        if folder.is_dir():  # not Ray's checkpoint_manager_snapshot.json: the record of them
            shutil.rmtree(folder, ignore_errors=True)
            dropped += 1
    return dropped


def _drop_dominated_exports(rows: list[dict], where: SweepPaths) -> list[str]:
    """``keep_exports="front"``: delete the exported model of every finished trial off the
    front; returns their trial ids."""
    dropped = []
    for row in rows:
        if row["pareto"] or not row.get("trial_dir"):
            continue
        folder = Path(row["trial_dir"])
        if folder.resolve().parent != where.trials.resolve():
            continue  # only what this sweep wrote
        for export in ("model", "adapter"):
            if (folder / export).is_dir():
                shutil.rmtree(folder / export)
                dropped.append(row["trial_id"])
    return sorted(set(dropped))


def _start_tracking(sweep: SweepConfig, toyworld: Path | None, log) -> Tracker | None:
    """The sweep's MLflow parent run (with the unmodified model's scores, when asked for and
    they can be had), or None when tracking is off."""
    if not sweep.base.tracking.enabled:
        return None
    scores = None
    if sweep.evaluate_baseline:
        try:
            scores = baseline(sweep, toyworld)
        except Exception as exc:  # the sweep still runs; reports show no baseline row values
            log(f"baseline evaluation failed, continuing without it: {exc}")
    try:
        tracker = start_sweep(sweep, scores)
    except Exception as exc:  # MLflow went away after preflight: nothing has run yet
        raise ConfigError(
            f"tracking.tracking_uri={redact_url(resolve_uri(sweep.base.tracking))!r} did not "
            f"answer when the sweep started ({type(exc).__name__}); no trial ran: allowed a "
            "running MLflow server (rerun the sweep once it is back)") from None
    log(f"MLflow: experiment {sweep.name} at {redact_url(tracker.uri)} (sweep run "
        f"{tracker.parent_run_id})")
    return tracker


def _tuner(sweep: SweepConfig, where: SweepPaths, trainable, tracker: Tracker | None,
           slots: float, log):
    """A new Tuner for ``sweep``, or the interrupted one restored from its storage."""
    from ray import tune

    study_url = sweep.study_url or where.study_url
    experiment = where.tune / sweep.name
    if tune.Tuner.can_restore(str(experiment)):
        failed = fail_orphaned_trials(study_url, sweep.name)
        log(f"resuming sweep {sweep.name} from {experiment} ({failed} orphaned Optuna trials "
            "marked failed)")
        # the callbacks come back with the experiment (the same parent run, reopened above)
        return tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    # Tune's cap: the sweep's max_concurrent, else none. Each trial holds one TRAIN_DRIVER
    # slot, so the slots bound it as Tune schedules, and a node that joins later adds its own
    # (with a searcher Tune keeps one trial pending, so nothing is sampled before a slot frees)
    concurrency = sweep.max_concurrent
    at_once = (f"up to {concurrency}" if concurrency else
               f"as many as the {DRIVER_RESOURCE} slots ({slots:g} now)")
    log(f"sweep {sweep.name}: {sweep.num_trials} trials, {at_once} at once, "
        f"study {redact_url(study_url)}")
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=_searcher(sweep, study_url),
                                    num_samples=sweep.num_trials,
                                    max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=sweep.name, storage_path=str(where.tune),
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[_FrontCallback(tracker, sweep)] if tracker else [],
                                  verbose=0),
    )


def _rows(grid, keys: tuple[str, ...]) -> list[dict]:
    """One row per trial of Tune's results, ``pareto`` marked on the objectives ``keys``."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        rows.append({
            "trial_id": metrics.get("trial_id") or Path(result.path).name,
            "forget_acc": metrics.get("wmdp"), "retain_acc": metrics.get("mmlu"),
            "attack_acc": metrics.get("attack_wmdp"), "attack_worst": metrics.get("attack_worst"),
            "feasible": bool(metrics.get("feasible")),
            "infeasible": metrics.get("infeasible", "error" if result.error else ""),
            "params": dict(result.config or {}),
            "error": str(result.error)[:500] if result.error else None,
            "trial_dir": metrics.get("trial_dir"),
        })
    front = {id(r) for r in pareto_front(rows, keys)}
    for row in rows:
        row["pareto"] = id(row) in front
    return rows


def run_sweep(sweep: SweepConfig, *, toyworld: Path | None = None, log=print,
              checked: bool = False) -> list[dict]:
    """Run (or resume) ``sweep`` on the connected Ray cluster; returns one row per trial (its
    objectives, feasibility, sampled settings, Tune status and error) with ``pareto`` marked.
    The base config passes ``preflight`` first (``checked``: the caller has just run it)."""
    import ray
    from ray import tune

    if not checked:
        preflight(sweep.base, toyworld)
    if sweep.attack_suite:  # the suite against the trials' workers and corpora, before any trial
        attacks, _ = suite(sweep.attack_suite, real=not uses_toyworld(sweep.base))
        check(attacks, None, data=sweep.base.data, eval_config=sweep.base.eval,
              scaling=sweep.base.scaling, toyworld=toyworld)
    sweep = dataclasses.replace(sweep, storage=str(Path(sweep.storage).resolve()))
    where = paths(sweep)
    where.root.mkdir(parents=True, exist_ok=True)
    check_placeable(sweep.base.scaling)  # one trial's workers, at least
    slots = ray.cluster_resources().get(DRIVER_RESOURCE, 0)
    if not slots:
        raise RuntimeError(f"the Ray cluster offers no {DRIVER_RESOURCE} resource: start it with "
                           f"--resources='{{\"{DRIVER_RESOURCE}\": N}}' (N trials at once)")
    tracker = _start_tracking(sweep, toyworld, log)
    # every trial scores the questions preflight encoded here (Tune keeps one copy in the
    # object store), where each trial's workers would otherwise load the tasks again
    questions = encoded_questions(sweep.base, toyworld)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, sweep=sweep, toyworld=str(toyworld) if toyworld else None,
                             tracker=tracker, questions=questions),
        {DRIVER_RESOURCE: 1})
    tuner = _tuner(sweep, where, trainable, tracker, slots, log)
    try:
        grid = tuner.fit()
    except BaseException:
        if tracker:
            with contextlib.suppress(Exception):  # MLflow down: the error below matters more
                finish_sweep(tracker, "FAILED")
        raise
    if tracker:
        waiting = sync_pending(tracker, sweep)
        if waiting:
            raise RuntimeError(
                f"MLflow at {redact_url(tracker.uri)} did not take {len(waiting)} trial(s): "
                f"their results are kept in {', '.join(str(w) for w in waiting[:3])}"
                f"{' ...' if len(waiting) > 3 else ''} ({PENDING}); rerun the sweep with the "
                "same name once the server is back and they are written")
        update_front(tracker)
        finish_sweep(tracker)
    rows = _rows(grid, sweep.objectives)
    if sweep.keep_exports == "front":
        dropped = _drop_dominated_exports(rows, where)
        log(f"keep_exports=front: deleted the exports of {len(dropped)} dominated trials")
    return rows


def optuna_front(sweep: SweepConfig) -> list[str]:
    """Tune trial ids of the Optuna study's Pareto front (``best_trials``, feasible only)."""
    study = optuna.load_study(study_name=sweep.name,
                              storage=study_storage(sweep.study_url
                                                                 or paths(sweep).study_url))
    return sorted(t.user_attrs["tune_trial_id"] for t in study.best_trials)


def front_table(rows: list[dict], sweep: SweepConfig) -> str:
    """A markdown table of every trial, Pareto points first, marked."""
    keys = list(sweep.space)
    first = sweep.objectives[0]
    order = sorted(rows, key=lambda r: (not r["pareto"], r[first] if r[first]
                                        is not None else 2, -(r["retain_acc"] or 0)))
    acc = lambda v: f"{v:.4f}" if v is not None else "-"
    attacked = sweep.attack_suite is not None
    cells = [["*" if r["pareto"] else "", acc(r["forget_acc"]),
              *([acc(r["attack_acc"]), r["attack_worst"] or "-"] if attacked else []),
              acc(r["retain_acc"]), r["infeasible"] or ("error" if r["error"] else "ok"),
              *[f"{r['params'][k]:.3g}" if isinstance(r["params"].get(k), float)
                else str(r["params"].get(k, "-")) for k in keys], r["trial_id"]] for r in order]
    after = [f"{sweep.forget_task} after {sweep.attack_suite} attacks", "worst attack"]
    return markdown_table(["pareto", sweep.forget_task, *(after if attacked else []),
                           sweep.retain_task, "status", *keys, "trial"], cells)


def connect_or_start(sweep: SweepConfig) -> None:
    """Reach Ray for ``sweep`` (``ray_train.connect_ray``): a local instance it has to start
    offers as many trial-driver slots as its CPUs (or GPUs) fit trials."""
    import os

    import torch

    scaling = sweep.base.scaling
    have = torch.cuda.device_count() if scaling.use_gpu else os.cpu_count() or 1
    connect_ray(driver_slots=sweep.max_concurrent or max(1, have // scaling.num_workers))


def compare_to_base(rows: list[dict], sweep: SweepConfig) -> str:
    """One line: the base (hand-tuned) trial's objectives and the trials that beat it on one
    objective without losing on the other."""
    base = base_point(sweep)
    first = next((r for r in rows if r["params"] == base
                  and all(r[k] is not None for k in sweep.objectives)), None)
    if first is None:
        return "the base config was not among the finished trials"
    better = beaten_by(first, rows, sweep.objectives)
    head = (f"hand-tuned base ({', '.join(f'{k}={v:g}' for k, v in base.items())}): "
            f"{sweep.forget_task} {first['forget_acc']:.4f}, {sweep.retain_task} {first['retain_acc']:.4f}")
    if not better:
        return head + "; no trial beats it on one objective without losing on the other"
    return head + "; beaten by " + ", ".join(
        f"{r['trial_id']} ({r['forget_acc']:.4f}, {r['retain_acc']:.4f})" for r in better)
