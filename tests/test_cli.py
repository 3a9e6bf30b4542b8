"""The raylens command from a directory unrelated to the repository: real subprocesses for runs
and for the exit status a shell sees; the argument checks (which end before any compute) in this
process, through the same ``main``."""

import json
import os
import subprocess
import sys

import pytest


def raylens(*args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return subprocess.run([sys.executable, "-m", "raylens.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def here(capsys, monkeypatch):
    """``raylens ARGS`` run by ``raylens.cli.main`` in this process, from ``cwd``: what a
    subprocess returns (status, stdout, stderr) without a new interpreter's imports per check."""
    from raylens import cli

    def run(*args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return run


def test_eval_from_any_directory_reproduces_the_baseline(world, tmp_path):
    # raylens sets the offline environment itself: the HF_* variables were removed above
    out = raylens("eval", "--model", str(world.control), "--toyworld", str(world.root), "--json",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout[out.stdout.index("{"):])
    assert results["toy_wmdp"]["acc"] == world.baseline["control"]["toy_wmdp"]
    assert results["toy_mmlu"]["acc"] == world.baseline["control"]["toy_mmlu"]
    assert results["toy_wmdp"]["n"] == 4 * world.config.num_entities


def test_toyworld_build_prints_the_baseline_table(world, tmp_path):
    out = raylens("toyworld", "build", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded from cache" in out.stdout
    main = world.baseline["main"]
    assert f"| main (both corpora) | {main['toy_wmdp']:.4f} | {main['toy_mmlu']:.4f} |" in out.stdout


@pytest.mark.parametrize(
    "args, field",
    [
        (["eval", "--tasks", "toy_wmdp", "hellaswag"], "eval.tasks"),
        (["eval", "--batch-size", "0"], "eval.batch_size"),
        (["eval", "--model", "/nonexistent/model"], "--model"),
        (["eval", "--toyworld", "/nonexistent"], "--toyworld"),
        (["demo", "--trials", "0"], "sweep.num_trials"),
        (["demo", "--name", "my sweep"], "sweep.name"),
    ],
)
def test_bad_arguments_fail_fast_naming_the_field(args, field, here, tmp_path):
    out = here(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert field in out.stderr and "allowed" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.integration
def test_unlearn_runs_evaluates_and_exports(world, tmp_path):
    out = raylens("unlearn", "--recipe", "sft_muon", "--set", "data.num_examples=64",
                  "--set", "loss.retain_coef=2", "--set", "batch.epochs=1",
                  "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step    2/2 retain" in out.stdout and "tok/s" in out.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["before"]["toy_wmdp"]["acc"] == world.baseline["main"]["toy_wmdp"]
    assert set(results["after"]) == {"toy_wmdp", "toy_mmlu"}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["loss.retain_coef"] == 2.0 and config["optim.name"] == "muon"
    assert (tmp_path / "run" / "model" / "config.json").exists()
    assert "| toy_wmdp |" in out.stdout
    # recorded in MLflow in the working directory: params, the step curve, evals, the model
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'raylens-mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raylens").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["optim.name"] == "muon" and run.data.params["loss.retain_coef"] == "2.0"
    history = client.get_metric_history(run.info.run_id, "train/retain_loss")
    records = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").open()]
    assert [(m.step, m.value) for m in history] == [(r["step"], r["retain_loss"]) for r in records]
    assert run.data.metrics["after/toy_wmdp"] == results["after"]["toy_wmdp"]["acc"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "config.json", "history.jsonl", "model"} <= artifacts


@pytest.mark.parametrize(
    "args, message",
    [
        (["--recipe", "lora_muon"], "recipe='lora_muon' is invalid"),
        (["--recipe", "lora_adamw", "--set", "loss.retain_coef=-1"], "loss.retain_coef=-1.0"),
        (["--recipe", "lora_adamw", "--set", "optim.name=muon"], "optim.name='muon'"),
        (["--recipe", "lora_adamw", "--set", "loss.target_layers=[1,9]"], "loss.target_layers=(1, 9)"),
        (["--recipe", "lora_adamw", "--set", "retain_coef"], "--set 'retain_coef' is invalid"),
        (["--recipe", "lora_adamw", "--set", "data.num_examples=5000"], "data.num_examples=5000"),
    ],
)
def test_unlearn_rejects_bad_settings_before_training(args, message, here, tmp_path):
    out = here("unlearn", *args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    assert "step " not in out.stdout


def test_builtin_task_without_its_dataset_fails_naming_the_task(tmp_path):
    """Offline and uncached, lm-eval cannot load wmdp_bio: an error, never a silent 0.25."""
    out = raylens("eval", "--model", "toy", "--tasks", "wmdp_bio", cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "evaluation failed" in out.stderr and "wmdp_bio" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.integration
@pytest.mark.any_world
def test_unlearn_with_two_ray_workers(world, tmp_path):
    out = raylens("unlearn", "--recipe", "lora_adamw", "--workers", "2",
                  "--set", "data.num_examples=64", "--set", "batch.epochs=1",
                  "--set", "batch.per_device_batch=8", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trained 2 steps on 2 worker(s)" in out.stdout
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert len(set(report["rank_digests"])) == 1
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["workers"] == 2 and set(results["after"]) == {"toy_wmdp", "toy_mmlu"}


def test_workers_that_do_not_divide_the_batch_are_rejected(tmp_path):
    out = raylens("unlearn", "--recipe", "lora_adamw", "--workers", "2", "--out",
                  str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 2
    assert "batch.global_batch=32 is invalid: allowed a multiple of per_device_batch x " \
           "scaling.num_workers = 64" in out.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "2", "--gpus", "2"], "--gpus=2 is invalid with --workers=2"),
        (["--gpus", "1"], "--gpus=1 is invalid: the Ray cluster has 0 GPUs"),
    ],
)
def test_gpu_requests_are_checked_before_training(args, message, tmp_path):
    out = raylens("unlearn", "--recipe", "lora_adamw", *args, "--out", str(tmp_path / "run"),
                  cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "step " not in out.stdout


def test_out_folder_rules_for_new_and_resumed_runs(here, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history.jsonl").write_text("")
    out = here("unlearn", "--recipe", "lora_adamw", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 2 and "or --resume to continue" in out.stderr
    (tmp_path / "run" / "results.json").write_text("{}")
    out = here("unlearn", "--recipe", "lora_adamw", "--out", str(tmp_path / "run"), "--resume",
               cwd=tmp_path)
    assert out.returncode == 2 and "holds a finished run" in out.stderr


@pytest.mark.integration
def test_eval_fast_scorer_matches_lm_eval_from_the_command_line(world, tmp_path):
    fast = raylens("eval", "--model", "toy-control", "--scorer", "fast", "--json", cwd=tmp_path)
    slow = raylens("eval", "--model", "toy-control", "--json", cwd=tmp_path)
    assert fast.returncode == 0 and slow.returncode == 0, fast.stderr[-2000:] + slow.stderr[-2000:]
    fast, slow = json.loads(fast.stdout), json.loads(slow.stdout)
    for task in ("toy_wmdp", "toy_mmlu"):
        assert fast[task]["acc"] == slow[task]["acc"] == world.baseline["control"][task]
    out = raylens("eval", "--model", "toy", "--subset", "0.5", cwd=tmp_path)
    assert out.returncode == 2 and "--subset=0.5 is invalid with --scorer lm-eval" in out.stderr
