"""MLflow, both sides, and the Pareto front.

Write side: one experiment per sweep; a parent run for the sweep (its settings, search space,
package versions, git commit, the base model's accuracies) and one nested run per trial (the flat
trial config as params, step curves from rank 0, eval metrics per task, status and failure reason
as tags, config / history / eval results / the exported model as artifacts). After every finished
trial the front over the finished feasible trials is recomputed from MLflow, its runs tagged
``pareto=true`` with their ``pareto_rank`` (non-dominated sorting level), and a plot (PNG and an
HTML page) is logged on the parent run.

Read side: ``trial_rows`` and ``report`` rebuild the seed runs' tables from MLflow alone.

MLflow has no Pareto view of its own (stack facts), hence the tags and the plot. Nothing here
imports torch or Ray: it runs in the sweep driver, in trials and on rank 0 of a Train run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from raylens.config import SweepConfig, TrackingConfig, UnlearnConfig, to_flat
from raylens.pareto import pareto_levels
from raylens.report import (
    REPORT_FORMATS,
    plot_attack_curves,
    plot_front_html,
    plot_front_png,
    render_attacks,
    render_report,
)

DEFAULT_URI = "sqlite:///raylens-mlflow.db"
STEP_METRICS = ("retain_loss", "forget_loss", "retain_weight", "forget_weight", "loss", "lr",
                "adam_lr", "grad_norm", "tokens_per_s")
"""Per-step records logged as ``train/<name>`` curves (the keys of ``train.train``'s records;
``lr`` is Muon's in Muon runs, ``adam_lr`` the AdamW half's and only there)."""
PACKAGES = ("raylens", "torch", "ray", "transformers", "peft", "tuned-lens", "lm-eval", "optuna",
            "mlflow")


def resolve_uri(tracking: TrackingConfig) -> str:
    """The tracking URI a run records to: the config's, else ``$MLFLOW_TRACKING_URI``, else a
    sqlite file in the working directory. Local paths are made absolute, because trials and Train
    workers run in other working directories."""
    uri = tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    database = sqlite_path(uri)
    if database is not None:
        uri = "sqlite:///" + str(database.resolve())
    elif "://" not in uri:  # a plain folder: MLflow's file store
        uri = Path(uri).resolve().as_uri()
    return uri


def check_reachable(uri: str, timeout: float = 10.0) -> str:
    """An MLflow server's ``/health`` answers, before a sweep starts its first trial (a local
    store needs no server); one line saying so, else ``ConfigError`` naming the field."""
    import urllib.request

    from raylens.config import ConfigError, redact_url

    if not uri.startswith(("http://", "https://")):
        return f"MLflow: local store {uri}"
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as answer:
            answer.read()
    except OSError as exc:
        raise ConfigError(
            f"tracking.tracking_uri={redact_url(uri)!r} is unreachable ({exc}): allowed a "
            "running MLflow server (see `raylens ui`), a sqlite:/// file or a folder, or "
            "tracking.enabled=false") from None
    return f"MLflow: server {redact_url(uri)} answers"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative or absolute), else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:"))


@dataclass(frozen=True)
class Tracker:
    """Where a sweep records: the tracking URI, the experiment and the sweep's parent run.
    It pickles, so it travels to trials and workers; each process opens its own client."""

    uri: str
    experiment_id: str
    parent_run_id: str

    @property
    def client(self) -> MlflowClient:
        """An MLflow client of this tracker's server."""
        return MlflowClient(self.uri)


def _experiment(tracking: TrackingConfig, name: str) -> tuple[str, MlflowClient, str]:
    """``(uri, client, experiment id)`` of experiment ``name``, created if missing (in a local
    store with its artifacts under ``tracking.artifact_location/<name>``)."""
    uri = resolve_uri(tracking)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return uri, client, found.experiment_id
    artifacts = (str(Path(tracking.artifact_location).resolve() / name)
                 if _is_local(uri) else None)
    # without this tag MLflow 3's UI opens the experiment as a GenAI (traces) page, not runs
    return uri, client, client.create_experiment(
        name, artifact_location=artifacts,
        tags={"mlflow.experimentKind": "custom_model_development"})


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _git_commit() -> tuple[str, bool]:
    """The commit of the raylens checkout this runs from and whether it has uncommitted changes
    (``("unknown", False)`` outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."],
                               check=True, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return commit, bool(dirty.strip())


def _provenance() -> dict[str, str]:
    """Tags that say what code made a run: git commit (and whether the checkout had uncommitted
    changes) and package versions."""
    commit, dirty = _git_commit()
    return {"mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower(),
            **{f"version.{k}": v for k, v in _versions().items()}}


def _log_text(client: MlflowClient, run_id: str, path: str, text: str) -> None:
    """Write ``text`` as the artifact ``path`` (folders allowed), replacing an older version."""
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / Path(path).name
        file.write_text(text)
        folder = str(Path(path).parent)
        client.log_artifact(run_id, str(file), None if folder == "." else folder)


def _param_value(value) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def _find_run(client: MlflowClient, experiment: str, query: str, **kwargs):
    """The first run of ``experiment`` that ``query`` (an MLflow filter) matches, or None."""
    found = client.search_runs([experiment], query, max_results=1, **kwargs)
    return found[0] if found else None


def _reopen(client: MlflowClient, run_id: str, *, status_tag: bool = True) -> str:
    """Mark a run found again (a resumed sweep, a rerun trial, ``--resume``) RUNNING."""
    client.update_run(run_id, status="RUNNING")
    if status_tag:
        client.set_tag(run_id, "status", "running")
    return run_id


def start_sweep(sweep: SweepConfig, baseline: dict | None = None) -> Tracker:
    """Find or create the sweep's experiment (named after the sweep) and its parent run; a
    resumed sweep reuses both. ``baseline``: the unmodified model's ``{task: {"acc", "chance",
    ...}}``, logged as ``baseline/<task>`` and ``chance/<task>``."""
    uri, client, exp = _experiment(sweep.base.tracking, sweep.name)
    parent = _find_run(client, exp, "tags.role = 'sweep'", order_by=["attributes.start_time ASC"])
    if parent:
        run_id = _reopen(client, parent.info.run_id, status_tag=False)
        if any(k.startswith("baseline/") for k in parent.data.metrics):
            baseline = None  # logged when the sweep started
    else:
        tags = {"role": "sweep", "sweep": sweep.name, "forget_task": sweep.forget_task,
                "retain_task": sweep.retain_task, "objectives": ",".join(sweep.objectives),
                "attack_suite": sweep.attack_suite or "", **_provenance()}
        run_id = client.create_run(exp, run_name=sweep.name, tags=tags).info.run_id
        params = {"num_trials": sweep.num_trials, "forget_task": sweep.forget_task,
                  "retain_task": sweep.retain_task, "retain_floor": sweep.retain_floor,
                  "sampler": sweep.sampler, "seed": sweep.seed,
                  "evaluate_base_first": sweep.evaluate_base_first,
                  "max_concurrent": sweep.max_concurrent, "storage": sweep.storage,
                  "eval_tasks": list(sweep.base.eval.tasks),
                  **{f"space.{k}": list(v) for k, v in sweep.space.items()}}
        client.log_batch(run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])
        _log_text(client, run_id, "sweep.json", json.dumps(
            {**{k: v for k, v in params.items() if not k.startswith("space.")},
             "space": {k: list(v) for k, v in sweep.space.items()},
             "base": to_flat(sweep.base)}, indent=1, default=str))
    if baseline:
        now = int(time.time() * 1000)
        metrics = [Metric(f"{kind}/{task}", float(scores[kind if kind == "chance" else "acc"]),
                          now, 0)
                   for task, scores in baseline.items() for kind in ("baseline", "chance")]
        client.log_batch(run_id, metrics=metrics)
    return Tracker(uri, exp, run_id)


def finish_sweep(tracker: Tracker, status: str = "FINISHED") -> None:
    """Close the parent run (a later resume reopens it)."""
    tracker.client.set_terminated(tracker.parent_run_id, status)


def trial_run(tracker: Tracker, trial_id: str, config: UnlearnConfig,
              hand_tuned: bool = False) -> str:
    """The nested run of Tune trial ``trial_id``: found by its ``trial_id`` tag (a trial rerun
    after a crash continues its run) or created with the flat trial config as params;
    ``hand_tuned`` tags the sweep's base point (the recipe the search must beat)."""
    client = tracker.client
    found = _trial_run(tracker, trial_id)
    if found:
        return _reopen(client, found.info.run_id)
    return _new_run(client, tracker.experiment_id, trial_id, config, {
        "mlflow.parentRunId": tracker.parent_run_id, "role": "trial", "trial_id": trial_id,
        "hand_tuned": str(hand_tuned).lower()})


def trial_recorded(tracker: Tracker, trial_id: str) -> bool:
    """Whether the run of Tune trial ``trial_id`` exists and was ended (its record complete)."""
    found = _trial_run(tracker, trial_id)
    return found is not None and found.info.status in ("FINISHED", "FAILED")


def _trial_run(tracker: Tracker, trial_id: str):
    """The MLflow run of Tune trial ``trial_id``, or None."""
    return _find_run(tracker.client, tracker.experiment_id,
                     f"tags.trial_id = '{trial_id}' and tags.role = 'trial'")


def _new_run(client: MlflowClient, experiment: str, name: str, config: UnlearnConfig,
             tags: dict[str, str]) -> str:
    run = client.create_run(experiment, run_name=name, tags={**tags, "status": "running"})
    client.log_batch(run.info.run_id, params=[Param(k, _param_value(v))
                                              for k, v in to_flat(config).items()])
    return run.info.run_id


def unlearn_run(config: UnlearnConfig, out: Path) -> tuple[Tracker, str]:
    """The run of one ``raylens unlearn`` (experiment ``tracking.experiment``, named after its
    output folder): found by its ``out_dir`` tag when ``--resume`` continues it, else created
    with the flat config as params, the git commit and package versions as tags."""
    uri, client, exp = _experiment(config.tracking, config.tracking.experiment)
    folder = str(Path(out).resolve())
    found = _find_run(client, exp, f"tags.out_dir = '{folder}'")
    if found:
        run_id = _reopen(client, found.info.run_id)
    else:
        run_id = _new_run(client, exp, Path(folder).name, config,
                          {"role": "run", "out_dir": folder, **_provenance()})
    return Tracker(uri, exp, run_id), run_id


def record_unlearn(tracker: Tracker, run_id: str, summary: dict, out: Path,
                   max_model_mb: float) -> None:
    """Log a finished ``raylens unlearn``: lm-eval accuracy per task before and after, the
    in-run fast scorer's, training time; its files and model as artifacts; end the run."""
    client = tracker.client
    now = int(time.time() * 1000)
    metrics = [Metric(f"{stage}/{task}", float(scores["acc"]), now, 0)
               for stage in ("before", "after", "in_trial")
               for task, scores in summary[stage].items()]
    metrics.append(Metric("train_s", float(summary["train_s"]), now, 0))
    client.log_batch(run_id, metrics=metrics, tags=[RunTag("status", "ok"),
                                                    RunTag("model_path", str(out))])
    _log_outputs(client, run_id, out, ("results.json", "config.json", "history.jsonl"),
                 max_model_mb)
    client.set_terminated(run_id, "FINISHED")


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def _log_outputs(client: MlflowClient, run_id: str, out: Path, files: tuple[str, ...],
                 max_model_mb: float) -> None:
    """A run's files, and its exported model or adapter folder when it is small enough."""
    for name in files:
        if (out / name).exists():
            client.log_artifact(run_id, str(out / name))
    for kind in ("model", "adapter"):
        folder = out / kind
        if folder.is_dir():
            size = _folder_mb(folder)
            client.set_tag(run_id, "model_mb", f"{size:.1f}")
            if size <= max_model_mb:
                client.log_artifacts(run_id, str(folder), kind)
            else:
                client.set_tag(run_id, "model_copied", "false")


class StepLogger:
    """``train(on_step=...)`` callback for rank 0: buffers each step's record and logs it as
    ``train/<name>`` curves every ``every_s`` seconds and on ``flush``. Steps already in the run
    (logged before a worker crash, retrained from a checkpoint) are not logged twice. An MLflow
    server that does not answer never stops training: the buffer is kept and tried again at the
    next flush, and whatever is still missing at the end is logged from ``history.jsonl`` when
    the trial is recorded (``log_curves``)."""

    def __init__(self, uri: str, run_id: str, every_s: float = 5.0):
        self.client, self.run_id, self.every_s = MlflowClient(uri), run_id, every_s
        try:
            history = self.client.get_metric_history(run_id, "train/loss")
        except Exception:  # the server is down: log from step 1, the store drops no duplicate
            history = []
        self.logged = max((m.step for m in history), default=0)
        self.buffer: list[Metric] = []
        self.last = time.monotonic()

    def __call__(self, record: dict) -> None:
        """Buffer a step's record (one already logged before a restart is skipped)."""
        if record["step"] <= self.logged:
            return
        self.buffer += _step_metrics(record)
        self.logged = record["step"]
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Log the buffered records (also called at the end of a run and after a crash); what
        MLflow does not take stays buffered."""
        self.last = time.monotonic()
        try:
            while self.buffer:
                self.client.log_batch(self.run_id, metrics=self.buffer[:1000])  # MLflow's limit
                self.buffer = self.buffer[1000:]
        except Exception as exc:
            print(f"MLflow did not take {len(self.buffer)} curve points ({type(exc).__name__}); "
                  "kept for the next try")


def _step_metrics(record: dict) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(f"train/{k}", float(record[k]), now, record["step"])
            for k in STEP_METRICS if k in record]


def log_curves(client: MlflowClient, run_id: str, history: list[dict]) -> int:
    """Log the steps of ``history`` that run ``run_id`` lacks (a server that was down while
    the trial trained); returns how many steps were logged."""
    have = {m.step for m in client.get_metric_history(run_id, "train/loss")}
    metrics = [m for record in history if record["step"] not in have
               for m in _step_metrics(record)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    return len({m.step for m in metrics})


def record_trial(tracker: Tracker, run_id: str, *, report: dict, result: dict, out: Path,
                 max_model_mb: float) -> None:
    """Log a finished trial: eval metrics per task, the objectives and constraint, status tags
    (``ok`` / ``collapsed`` / ``diverged``), artifacts (config, history, eval results per task,
    the exported model or adapter, or its path when larger than ``max_model_mb``); end the run."""
    client = tracker.client
    now = int(time.time() * 1000)
    step = int(report.get("num_steps", 0))
    values = {"wmdp": result["wmdp"], "mmlu": result["mmlu"],
              "constraint": result["constraint"], "num_steps": step,
              "resumed_from": report.get("resumed_from", 0)}
    for task, scores in (report.get("eval") or {}).items():
        values[f"eval/{task}"] = scores["acc"]
        values[f"eval/{task}/stderr"] = scores["acc_stderr"]
        values[f"eval/{task}/n"] = scores["n"]
    metrics = [Metric(k, float(v), now, step) for k, v in values.items()
               if isinstance(v, (int, float))]
    status = result["infeasible"] or "ok"
    tags = {"status": status, "feasible": str(result["feasible"]).lower(),
            "infeasible": result["infeasible"], "model_path": str(out)}
    if result.get("reason"):
        tags["reason"] = result["reason"]
    if report.get("node_per_rank"):  # the nodes' addresses, rank order
        tags["nodes"] = ",".join(report["node_per_rank"])
    client.log_batch(run_id, metrics=metrics,
                     tags=[RunTag(k, v) for k, v in tags.items()])
    for task, scores in (report.get("eval") or {}).items():
        _log_text(client, run_id, f"eval/{task}.json", json.dumps(scores, indent=1))
    history = out / "history.jsonl"
    if history.exists():
        log_curves(client, run_id, [json.loads(line) for line in history.open()])
    _log_outputs(client, run_id, out, ("config.json", "history.jsonl", "train_report.json"),
                 max_model_mb)
    client.set_terminated(run_id, "FINISHED")


def record_failure(tracker: Tracker, run_id: str, error: BaseException | str) -> None:
    """Mark a run failed with the reason (tag ``failure_reason``, the traceback as
    ``error.txt``) and end it."""
    client = tracker.client
    if isinstance(error, BaseException):
        text = "".join(traceback.format_exception(error))
        reason = f"{type(error).__name__}: {error}"
    else:
        text = reason = str(error)
    client.set_tag(run_id, "status", "failed")
    client.set_tag(run_id, "failure_reason", reason.strip()[:4000] or "unknown")
    _log_text(client, run_id, "error.txt", text)
    client.set_terminated(run_id, "FAILED")


def fail_open_trial(tracker: Tracker, trial_id: str, reason: str) -> bool:
    """Mark the run of a trial that died without recording (its process killed) as failed;
    returns whether there was such a run."""
    found = _trial_run(tracker, trial_id)
    if found is None or found.data.tags.get("status") != "running":
        return False
    record_failure(tracker, found.info.run_id, reason)
    return True


def _float(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def trial_rows(client: MlflowClient, experiment: str) -> tuple[dict, list[dict]]:
    """From MLflow alone: the sweep's parent run (``{"run_id", "params", "metrics", "tags"}``)
    and one row per trial run (``trial_id``, ``run_id``, ``status``, ``forget_acc`` and
    ``retain_acc`` (the ``wmdp`` and ``mmlu`` metrics), ``feasible``, ``pareto``,
    ``pareto_rank``, ``params``, ``metrics``, ``tags``), oldest first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"experiment {experiment!r} is not in {client.tracking_uri}: it has "
                         f"{names}")
    parents = client.search_runs([exp.experiment_id], "tags.role = 'sweep'", max_results=1)
    if not parents:
        raise ValueError(f"experiment {experiment!r} has no sweep run (tag role=sweep)")
    parent = parents[0]
    runs = client.search_runs([exp.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                              max_results=50000, order_by=["attributes.start_time ASC"])
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        rows.append({
            "trial_id": tags.get("trial_id", run.info.run_name), "run_id": run.info.run_id,
            "status": tags.get("status", "unknown"), "forget_acc": _float(metrics, "wmdp"),
            "retain_acc": _float(metrics, "mmlu"), "attack_acc": _float(metrics, "attack/worst"),
            "feasible": tags.get("feasible") == "true",
            "pareto": tags.get("pareto") == "true",
            "pareto_rank": int(tags["pareto_rank"]) if tags.get("pareto_rank") else None,
            "params": dict(run.data.params), "metrics": dict(metrics), "tags": dict(tags)})
    info = {"run_id": parent.info.run_id, "params": dict(parent.data.params),
            "metrics": dict(parent.data.metrics), "tags": dict(parent.data.tags),
            "experiment_id": exp.experiment_id}
    return info, rows


def update_front(tracker: Tracker) -> list[dict]:
    """Recompute the front over the finished trials recorded so far, tag every finished run
    (``pareto``, ``pareto_rank``) and log the plot on the parent run; returns the front."""
    client = tracker.client
    experiment = client.get_experiment(tracker.experiment_id).name
    parent, rows = trial_rows(client, experiment)
    done = [r for r in rows if r["status"] not in ("running", "unknown")]
    keys = objectives_of(parent)
    scored = [r for r in done if all(r[k] is not None for k in keys)]
    levels = pareto_levels(scored, keys)
    rank_of = {id(r): level for r, level in zip(scored, levels)}
    for row in done:
        level = rank_of.get(id(row))
        row["pareto"], row["pareto_rank"] = level == 1, level
        tags = {"pareto": str(level == 1).lower(), "pareto_rank": str(level) if level else ""}
        changed = [RunTag(k, v) for k, v in tags.items() if row["tags"].get(k) != v]
        if changed:
            client.log_batch(row["run_id"], tags=changed)
    front = [r for r in done if r["pareto"]]
    front.sort(key=lambda r: (r["forget_acc"], -r["retain_acc"]))
    with tempfile.TemporaryDirectory() as tmp:
        png, page = Path(tmp) / "front.png", Path(tmp) / "front.html"
        plot_front_png(done, parent, png)
        page.write_text(plot_front_html(done, parent))
        (Path(tmp) / "front.json").write_text(json.dumps(
            [{k: r[k] for k in ("trial_id", "run_id", "forget_acc", "retain_acc", "pareto_rank")}
             for r in front], indent=1))
        for file in ("front.png", "front.html", "front.json"):
            client.log_artifact(tracker.parent_run_id, str(Path(tmp) / file), "pareto")
    client.log_metric(tracker.parent_run_id, "pareto/size", len(front))
    client.log_metric(tracker.parent_run_id, "trials/finished", len(done))
    return front


def objectives_of(parent: dict) -> tuple[str, ...]:
    """The row objectives a sweep's parent run names (tag ``objectives``)."""
    return tuple((parent["tags"].get("objectives") or "forget_acc,retain_acc").split(","))


def report(client: MlflowClient, experiment: str, fmt: str = "md") -> str:
    """The experiment's table from MLflow alone (``report.render_report``: ``md``, ``csv`` or
    ``json``), with the tamper table of every run that was attacked: a sweep's trials, or the
    ``raylens attack`` runs of an experiment without a sweep."""
    if fmt not in REPORT_FORMATS:
        raise ValueError(f"format={fmt!r} is invalid: allowed one of {', '.join(REPORT_FORMATS)}")
    try:
        parent, rows = trial_rows(client, experiment)
    except ValueError:
        attacked = attack_runs(client, experiment)
        if not attacked:
            raise
        return render_attacks(experiment, attacked, fmt)
    attacked = [attack_results(client, r["run_id"], r["trial_id"]) for r in rows
                if r["tags"].get("attack_suite")]
    return render_report(experiment, parent, rows, fmt, attacks=attacked)


# --- fine-tuning attacks ----------------------------------------------------------------------

def record_attack(client: MlflowClient, run_id: str, suite: dict, suite_name: str, *,
                  prefix: str = "attack") -> None:
    """Log an attack suite's result on run ``run_id``: every attack's settings as params
    (``attack.<name>.<field>``), its curves as metrics by step (``attack/<name>/forget_acc``,
    ``.../retain_acc``), its start, worst, recovery and steps to its level; the suite's worst
    case (``attack/worst``, tags ``attack_worst``, ``attack_suite``, ``attack_names``);
    ``attack/suite.json`` and the curves' plot. ``prefix`` replaces ``attack`` (a finalist's
    long suite: ``final/attack``)."""
    now = int(time.time() * 1000)
    params, metrics = [], []
    for result in suite["results"]:
        name = result["attack"]
        params += [Param(f"{prefix}.{name}.{k}".replace("/", "."), _param_value(v))
                   for k, v in result["config"].items() if k != "name"]
        for point in result["curve"]:
            metrics += [Metric(f"{prefix}/{name}/{k}", float(point[k]), now, int(point["step"]))
                        for k in ("forget_acc", "retain_acc")]
        values = {k: result[k] for k in ("start", "worst", "worst_step", "recovery",
                                         "retain_end", "steps_to_level", "train_s")}
        metrics += [Metric(f"{prefix}/{name}/{k}", float(v), now, 0) for k, v in values.items()
                    if v is not None]
    metrics += [Metric(f"{prefix}/{k}", float(suite[k]), now, 0)
                for k in ("worst", "recovery", "train_s", "eval_s")]
    tags = [RunTag(f"{prefix}_suite", suite_name), RunTag(f"{prefix}_worst", suite["worst_attack"]),
            RunTag(f"{prefix}_names", ",".join(suite["attacks"]))]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_batch(run_id, tags=tags)
    _log_text(client, run_id, f"{prefix}/suite.json", json.dumps(suite, indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "curves.png"
        plot_attack_curves(suite["results"], suite["tasks"], png)
        client.log_artifact(run_id, str(png), prefix)


def record_final(client: MlflowClient, run_id: str, scores: dict[str, dict]) -> None:
    """A finalist's scores on every question: ``final/<task>``, ``.../stderr`` and ``.../n``."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[
        Metric(f"final/{task}{suffix}", float(s[key]), now, 0) for task, s in scores.items()
        for suffix, key in (("", "acc"), ("/stderr", "acc_stderr"), ("/n", "n"))])


def attack_run(tracking: TrackingConfig, model_dir: Path, suite_name: str) -> tuple[str, str]:
    """A new run for one ``raylens attack`` (experiment ``tracking.experiment``, named after the
    attacked folder, tags ``role=attack`` and ``model_path``); ``(uri, run id)``."""
    uri, client, exp = _experiment(tracking, tracking.experiment)
    folder = str(Path(model_dir).resolve())
    run = client.create_run(exp, run_name=f"attack {Path(folder).parent.name}/"
                            f"{Path(folder).name}", tags={"role": "attack", "model_path": folder,
                                                          "attack_suite": suite_name,
                                                          **_provenance()})
    return uri, run.info.run_id


def attack_results(client: MlflowClient, run_id: str, label: str, *,
                   prefix: str = "attack") -> dict:
    """An attacked run's suite read back from MLflow (``record_attack``'s ``prefix``):
    ``{"label", "run_id", "worst_attack", "results": [{"attack", "config", "curve", "worst",
    "worst_step", "recovery", "retain_end", ...}]}``."""
    run = client.get_run(run_id)
    metrics, params = run.data.metrics, run.data.params
    key = prefix.replace("/", ".")
    results = []
    for name in filter(None, run.data.tags.get(f"{prefix}_names", "").split(",")):
        history = {k: {m.step: m.value for m in client.get_metric_history(
            run_id, f"{prefix}/{name}/{k}")} for k in ("forget_acc", "retain_acc")}
        curve = [{"step": step, "forget_acc": acc, "retain_acc": history["retain_acc"].get(step)}
                 for step, acc in sorted(history["forget_acc"].items())]
        config = {k[len(f"{key}.{name}."):]: v for k, v in params.items()
                  if k.startswith(f"{key}.{name}.")}
        results.append({"attack": name, "config": config, "curve": curve,
                        **{k: metrics.get(f"{prefix}/{name}/{k}") for k in (
                            "start", "worst", "worst_step", "recovery", "retain_end",
                            "steps_to_level")}})
    return {"label": label, "run_id": run_id, "results": results,
            "worst_attack": run.data.tags.get(f"{prefix}_worst")}


def attack_runs(client: MlflowClient, experiment: str) -> list[dict]:
    """Every ``raylens attack`` run of ``experiment``, oldest first, read back."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], "tags.role = 'attack'", max_results=5000,
                              order_by=["attributes.start_time ASC"])
    return [attack_results(client, r.info.run_id, r.data.tags.get("model_path", r.info.run_name))
            for r in runs]
