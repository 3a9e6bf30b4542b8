"""MLflow tracking: the sweep and trial runs, step curves, failures, the Pareto tags and plot, the
report rebuilt from MLflow alone, `raylens ui`, and the Grafana dashboard's metric names.

The first tests record trials with hand-made training reports (what ``fit_on_ray`` returns) into a
real sqlite MLflow store: the tracking logic is checked without training. Real sweeps through Ray
are checked in tests/test_search.py (the killed-driver sweep) and below (a sweep whose trials
fail)."""

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ranks import free_port

from raylens import tracking
from raylens.config import replace
from raylens.recipes import demo_sweep
from raylens.search import objectives

REPO = Path(__file__).resolve().parents[1]
POINTS = {  # trial id -> (toy_wmdp, toy_mmlu); the demo's retain floor is 0.6
    "front_a": (0.30, 0.90), "front_b": (0.50, 0.95),
    "second": (0.40, 0.80),     # dominated by front_a: front 2
    "collapsed": (0.20, 0.50),  # lowest wmdp, but below the floor: never on the front
}


def _report(wmdp, mmlu, steps=4):
    scores = lambda acc: {"acc": acc, "acc_stderr": 0.01, "n": 96, "subset": None,
                          "chance": 0.25, "predictions": [0, 1, 2]}
    return {"num_steps": steps, "resumed_from": 0, "retain_loss": 1.5, "forget_loss": 2.5,
            "eval": {"toy_wmdp": scores(wmdp), "toy_mmlu": scores(mmlu)}, "eval_error": None}


def _record(tracker, sweep, trial_id, point, out):
    config = replace(sweep.base, {"loss.retain_coef": 0.1 + len(trial_id) / 100})
    run_id = tracking.trial_run(tracker, trial_id, config)
    logger = tracking.StepLogger(tracker.uri, run_id, every_s=3600)
    for step in range(1, 5):
        logger({"step": step, "retain_loss": 2.0 / step, "forget_loss": 1.0 + step,
                "retain_weight": 0.1, "forget_weight": 1.0, "loss": 3.0, "lr": 1e-3,
                "grad_norm": 0.5, "tokens_per_s": 1000.0})
    logger.flush()
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_bytes(b"\0" * 2048)
    (out / "config.json").write_text("{}")
    report = _report(*point)
    tracking.record_trial(tracker, run_id, report=report, result=objectives(report, sweep),
                          out=out, max_model_mb=1.0)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sweep recorded in MLflow: four scored trials, one failed with an error, one whose
    process died (marked failed from Tune's error), the front updated."""
    root = tmp_path_factory.mktemp("tracking")
    sweep = demo_sweep(storage=str(root / "runs"), name="tracked", num_trials=6, overrides={
        "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "tracking.artifact_location": str(root / "artifacts")})
    baseline = {"toy_wmdp": {"acc": 1.0, "chance": 0.25}, "toy_mmlu": {"acc": 1.0, "chance": 0.25}}
    tracker = tracking.start_sweep(sweep, baseline)
    runs = {tid: _record(tracker, sweep, tid, point, root / "trials" / tid)
            for tid, point in POINTS.items()}
    runs["failed"] = tracking.trial_run(tracker, "failed", sweep.base)
    try:
        raise RuntimeError("evaluation failed: toy_wmdp: time limit of 0.001 s reached")
    except RuntimeError as exc:
        tracking.record_failure(tracker, runs["failed"], exc)
    runs["killed"] = tracking.trial_run(tracker, "killed", sweep.base)
    assert tracking.fail_open_trial(tracker, "killed", "The actor died unexpectedly (SIGKILL)")
    assert not tracking.fail_open_trial(tracker, "failed", "not again")  # already recorded
    front = tracking.update_front(tracker)
    tracking.finish_sweep(tracker)
    return {"sweep": sweep, "tracker": tracker, "runs": runs, "front": front,
            "client": MlflowClient(tracker.uri), "root": root}


def test_trial_runs_carry_params_curves_evals_artifacts_and_failure_reasons(store):
    client, runs = store["client"], store["runs"]
    run = client.get_run(runs["front_a"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == store["tracker"].parent_run_id
    assert run.data.params["loss.retain_coef"] == str(0.1 + len("front_a") / 100)
    assert run.data.params["optim.name"] == "adamw" and run.data.params["mode.kind"] == "full"
    curve = client.get_metric_history(runs["front_a"], "train/retain_loss")
    assert [(m.step, m.value) for m in curve] == [(s, 2.0 / s) for s in range(1, 5)]
    assert run.data.metrics["eval/toy_wmdp"] == 0.30 and run.data.metrics["mmlu"] == 0.90
    assert run.data.tags["status"] == "ok" and run.data.tags["feasible"] == "true"
    artifacts = {a.path for a in client.list_artifacts(runs["front_a"])}
    assert {"config.json", "eval", "model"} <= artifacts
    evals = {a.path for a in client.list_artifacts(runs["front_a"], "eval")}
    assert evals == {"eval/toy_wmdp.json", "eval/toy_mmlu.json"}
    collapsed = client.get_run(runs["collapsed"])
    assert collapsed.data.tags["status"] == "collapsed"
    assert collapsed.data.tags["feasible"] == "false"

    failed = client.get_run(runs["failed"])
    assert failed.info.status == "FAILED" and failed.data.tags["status"] == "failed"
    assert "time limit of 0.001 s" in failed.data.tags["failure_reason"]
    assert {a.path for a in client.list_artifacts(runs["failed"])} == {"error.txt"}
    killed = client.get_run(runs["killed"])
    assert killed.info.status == "FAILED"
    assert "actor died" in killed.data.tags["failure_reason"]
    # a trial rerun after a crash continues its run instead of adding one
    assert tracking.trial_run(store["tracker"], "front_a", store["sweep"].base) == runs["front_a"]
    client.set_terminated(runs["front_a"], "FINISHED")
    client.set_tag(runs["front_a"], "status", "ok")


def test_pareto_tags_ranks_and_plot_on_the_parent_run(store):
    client, runs = store["client"], store["runs"]
    tags = {tid: client.get_run(run_id).data.tags for tid, run_id in runs.items()}
    assert {tid for tid, t in tags.items() if t["pareto"] == "true"} == {"front_a", "front_b"}
    assert [r["trial_id"] for r in store["front"]] == ["front_a", "front_b"]
    assert {tid: t["pareto_rank"] for tid, t in tags.items()} == {
        "front_a": "1", "front_b": "1", "second": "2", "collapsed": "", "failed": "",
        "killed": ""}
    parent = store["tracker"].parent_run_id
    folder = Path(client.download_artifacts(parent, "pareto", str(store["root"] / "dl")))
    assert (folder / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (folder / "front.html").read_text()
    assert page.count("<circle") == 3 and page.count("<path d=") == 1  # collapsed: a cross
    assert all(tid in page for tid in POINTS) and "unmodified model: 1.0000" in page
    assert [r["trial_id"] for r in json.loads((folder / "front.json").read_text())] == [
        "front_a", "front_b"]
    metrics = client.get_run(parent).data.metrics
    assert metrics["baseline/toy_wmdp"] == 1.0 and metrics["chance/toy_mmlu"] == 0.25
    assert metrics["pareto/size"] == 2 and metrics["trials/finished"] == 6


def test_report_regenerates_the_seed_log_table_from_mlflow(store):
    client = store["client"]
    md = tracking.report(client, "tracked", "md").splitlines()
    assert md[0] == ("| examples | epochs | steps | retain_coef | remove_coef | lr | batch | "
                     "LoRA rank | retain_loss | forget_loss | toy_wmdp (↓) | toy_mmlu | notes |")
    assert len(md) == 2 + 1 + 6
    assert md[2].startswith("| - |") and "100.00% | 100.00% | Baseline" in md[2]
    assert "| second; front 2 |" in next(line for line in md if "second" in line)
    front_a = next(line for line in md if "front_a" in line)
    assert "| 1024 | 2 | 4 | 0.17 | 5 | 0.003 | 32 | - | 0.5 | 5 | **30.00%** | **90.00%** |" \
        in front_a and "Pareto front" in front_a
    failed = next(line for line in md if "| failed;" in line)
    assert "time limit of 0.001 s" in failed and "| - | - |" in failed
    text = tracking.report(client, "tracked", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(text.splitlines()) == 1 + 7 and rows[0]["notes"].startswith("Baseline")
    assert next(r for r in rows if "front_a" in r["notes"])["steps"] == "4"
    data = json.loads(tracking.report(client, "tracked", "json"))
    assert [r["pareto"] for r in data["rows"]] == [False, True, True, False, False, False, False]
    with pytest.raises(ValueError, match="format='xlsx' is invalid"):
        tracking.report(client, "tracked", "xlsx")
    with pytest.raises(ValueError, match="'nope' is not in"):
        tracking.report(client, "nope")


def test_step_logger_does_not_log_a_step_twice_after_a_restart(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    record = lambda s: {"step": s, "loss": float(s), "lr": 0.1}
    first = tracking.StepLogger(client.tracking_uri, run_id, every_s=3600)
    for step in range(1, 6):
        first(record(step))
    first.flush()
    again = tracking.StepLogger(client.tracking_uri, run_id)  # the worker, restarted at step 3
    for step in range(3, 9):
        again(record(step))
    again.flush()
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, 9))


@pytest.mark.integration
def test_raylens_report_and_ui_serve_the_experiment(store):
    uri = store["tracker"].uri
    out = subprocess.run([sys.executable, "-m", "raylens.cli", "report", "tracked", "--uri", uri,
                          "--format", "csv"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("examples,epochs,steps,")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "raylens.cli", "ui", "--uri", uri,
                               "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        query = urllib.parse.urlencode({"experiment_name": "tracked"})
        with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name?"
                                    f"{query}", timeout=30) as response:
            exp = json.loads(response.read())["experiment"]
        assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == \
            "custom_model_development"  # the UI opens it on its runs, not as a GenAI app
        body = json.dumps({"experiment_ids": [exp["experiment_id"]],
                           "filter": "tags.pareto = 'true'"}).encode()
        request = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/runs/search", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            runs = json.loads(response.read())["runs"]
        assert sorted(r["info"]["run_name"] for r in runs) == ["front_a", "front_b"]
        query = urllib.parse.urlencode({"path": "pareto/front.png",
                                        "run_uuid": store["tracker"].parent_run_id})
        with urllib.request.urlopen(f"{base}/get-artifact?{query}", timeout=30) as response:
            assert response.read()[:4] == b"\x89PNG"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.slow
def test_ui_screenshot_in_headless_chromium(store, tmp_path):
    """scripts/ui_screenshot.py: the runs table and the wmdp-vs-mmlu chart of the sweep, driven
    in Debian's Chromium by Playwright (needs `apt-get install chromium` and `.[ui-test]`)."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "ui_screenshot.py"), "tracked",
                          str(tmp_path), "--uri", store["tracker"].uri],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    for name in ("runs.png", "charts.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def _ray_metric_names() -> set[str]:
    """Every ``ray_*`` name in Ray's own Grafana panel definitions (the metrics Ray exports)."""
    import ray.dashboard.modules.metrics.dashboards as panels

    names = set()
    for file in Path(panels.__file__).parent.glob("*_panels.py"):
        names |= set(re.findall(r"\b(ray_[a-z0-9_]+)\{", file.read_text()))
    return names


def _dashboard_metrics(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]
              if isinstance(v.get("query"), dict)]
    functions = {"sum", "by", "rate", "label_values", "max", "avg", "on", "or", "vector"}
    return {name for e in exprs for name in re.findall(r"\b([a-z_][a-z0-9_]*)\s*\{", e)
            if name not in functions} | {
        name for e in exprs for name in re.findall(r"label_values\(([a-z0-9_]+)", e)}


def test_grafana_dashboard_is_valid_and_names_only_exported_metrics():
    from raylens.ray_train import RayStepMetrics

    dashboard = json.loads((REPO / "dashboards" / "grafana-raylens.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["type"] in ("row", "timeseries") and set(panel["gridPos"]) == {"h", "w",
                                                                                   "x", "y"}
        for target in panel.get("targets", []):
            assert target["expr"].count("(") == target["expr"].count(")")
            assert target["expr"].count("{") == target["expr"].count("}")
    used = _dashboard_metrics(dashboard)
    ours = {f"ray_raylens_{name}" for name in RayStepMetrics.NAMES}
    assert ours <= used  # every training metric raylens exports is plotted
    unknown = used - ours - _ray_metric_names()
    assert not unknown, f"metrics neither raylens nor Ray exports: {unknown}"


PROBE = """
import json, socket, sys, time, urllib.request
import ray
from raylens.ray_train import RayStepMetrics
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
ray.init(num_cpus=1, _metrics_export_port=port, include_dashboard=True, log_to_driver=False)

@ray.remote
def step():
    RayStepMetrics("probe-trial")({"step": 3, "retain_loss": 0.5, "forget_loss": 2.0,
        "retain_weight": 0.1, "forget_weight": 1.0, "loss": 2.05, "lr": 1e-3,
        "adam_lr": 3e-4, "grad_norm": 0.7, "tokens_per_s": 1234.0})
    time.sleep(15)  # the process must live until the agent has exported

ref = step.remote()
found = {}
for _ in range(60):
    time.sleep(1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {l.split("{")[0]: float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
             if l.startswith("ray_raylens_") and 'run="probe-trial"' in l}
    if len(found) == len(RayStepMetrics.NAMES):
        break
print(json.dumps(found))
"""


@pytest.mark.integration
def test_ray_exports_the_training_metrics_under_the_dashboards_names():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    from raylens.ray_train import RayStepMetrics

    assert set(found) == {f"ray_raylens_{name}" for name in RayStepMetrics.NAMES}
    assert found["ray_raylens_step"] == 3 and found["ray_raylens_tokens_per_s"] == 1234.0


@pytest.mark.integration
@pytest.mark.any_world
def test_a_sweep_whose_trials_fail_records_each_failure_with_its_reason(world, tmp_path):
    """Every trial's evaluation runs out of time (eval.time_limit_s=0.001): the trials are
    MLflow runs marked FAILED with the EvalError as reason; the baseline evaluation fails the
    same way and the sweep goes on without it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RAY_ADDRESS",
                                                                      "MLFLOW_"))}
    out = subprocess.run([sys.executable, "-m", "raylens.cli", "demo", "--name", "failing",
                          "--trials", "2", "--storage", str(tmp_path / "runs"),
                          "--set", "data.num_examples=64", "--set", "eval.time_limit_s=0.001"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 1, (out.stdout + out.stderr)[-3000:]  # no front: exit 1
    assert "baseline evaluation failed" in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'raylens-mlflow.db'}")
    parent, rows = tracking.trial_rows(client, "failing")
    assert len(rows) == 2
    for row in rows:
        run = client.get_run(row["run_id"])
        assert run.info.status == "FAILED" and row["status"] == "failed"
        assert "time limit" in row["tags"]["failure_reason"]
        assert row["tags"]["pareto"] == "false"
    assert "baseline/toy_wmdp" not in parent["metrics"]
    assert client.get_run(parent["run_id"]).info.status == "FINISHED"
