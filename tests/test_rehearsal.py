"""The rehearsal of the real setting: every hub id the real sweeps name, loaded offline from a
cache in the libraries' own layout (``raylens rehearsal build``), and the four real sweep files
run unmodified on it. The sweeps take minutes each: marked ``rehearsal``, run by
``make test-rehearsal`` (CI runs it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCALE = ["--set", "scaling.use_gpu=false", "--set", "scaling.num_workers=2",
         "--set", "data.num_examples=32", "--set", "batch.per_device_batch=16",
         "--set", "data.max_length=64", "--set", "sweep.retain_floor=0", "--trials", "1"]
"""CPU scale of a real sweep: 2 CPU workers, one step, short documents, one trial (the sweep's
base point; the stand-in model is random, so no trial clears the real retain floor of 0.30).
CI runs three of the four here, one trial each (sft_muon.py runs in its cluster rehearsal)."""


@pytest.fixture(scope="module")
def cache(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rehearsal") / "hf"
    run = subprocess.run([sys.executable, "-m", "raylens.cli", "rehearsal", "build",
                          str(folder)], capture_output=True, text=True, env=_env(None))
    assert run.returncode == 0, run.stderr[-2000:]
    return folder


def _env(hf_home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    return env


def _python(code: str, hf_home, cwd) -> dict:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(hf_home), cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


LOAD_EVERYTHING = """
import json, raylens, datasets, torch
from raylens.config import DataConfig, EvalConfig, ModelConfig
from raylens.data import load_texts
from raylens.lens import load_lens
from raylens.model import checkpoint_dtype, load_model, load_model_config
from raylens.evaluate import eval_questions
model_config = ModelConfig(name_or_path="EleutherAI/deep-ignorance-unfiltered")
model, tokenizer = load_model(model_config)
lens = load_lens(model, "EleutherAI/deep-ignorance-unfiltered-lens")
forget, retain = load_texts(DataConfig(forget="Unlearning/WMDP-Bio-Remove-Dataset",
                                       retain="EleutherAI/wikitext_document_level",
                                       num_examples=16))
shuffled = datasets.load_dataset("EleutherAI/wikitext_document_level", "wikitext-103-raw-v1",
                                 split="train").shuffle(seed=42)["page"][:16]
plain = datasets.load_dataset("EleutherAI/wikitext_document_level", "wikitext-103-raw-v1",
                              split="train")["page"][:16]
questions = eval_questions(EvalConfig(tasks=("wmdp_bio_robust", "wmdp_bio", "mmlu")),
                            tokenizer, None, model.config)
robust = datasets.load_dataset("EleutherAI/wmdp_bio_robust_mcqa", "dual_use_virology")
print(json.dumps({
    "layers": model.config.num_hidden_layers, "vocab": model.get_output_embeddings().out_features,
    "stored": str(checkpoint_dtype(load_model_config(model_config))),
    "translators": len(lens.layer_translators),
    "forget0": forget[0][:40], "retain": retain, "shuffled": shuffled, "plain": plain,
    "questions": {k: len(v) for k, v in questions.items()},
    "subtasks": {k: len({q.subtask for q in v}) for k, v in questions.items()},
    "robust_splits": sorted(robust), "robust_answer": str(robust["robust"].features["answer"]),
}))
"""


@pytest.mark.integration
def test_every_real_hub_id_loads_offline_from_the_rehearsal_cache(cache, tmp_path):
    out = _python(LOAD_EVERYTHING, cache, tmp_path)
    assert (out["layers"], out["vocab"], out["translators"]) == (32, 50304, 32)
    assert out["stored"] == "torch.bfloat16"
    assert out["retain"] == out["shuffled"] != out["plain"]  # Dataset.shuffle(seed=42) order
    assert out["subtasks"] == {"wmdp_bio_robust": 6, "wmdp_bio": 1, "mmlu": 57}
    assert out["questions"]["wmdp_bio_robust"] > 0 and out["questions"]["mmlu"] >= 57
    assert out["robust_splits"] == ["robust", "shortcut"]
    assert out["robust_answer"] == "Value('int64')"


def test_a_sweep_file_refuses_bad_input_with_one_line_and_exit_2(tmp_path):
    for args, field in ((["--toy", "--trials", "-3"], "sweep.num_trials=-3"),
                        (["--set", "loss.retain_coef=-1"], "loss.retain_coef=-1.0"),
                        (["--set", "sweep.retain_floor=2"], "sweep.retain_floor=2.0")):
        run = subprocess.run([sys.executable, str(REPO / "sweeps" / "sft_adamw.py"), *args],
                             capture_output=True, text=True, env=_env(None), cwd=tmp_path)
        assert run.returncode == 2, (args, run.stderr[-2000:])
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and field in lines[0] and "is invalid: allowed" in lines[0]


def test_a_real_sweep_without_its_cache_fails_before_compute_naming_the_model(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "sweeps" / "lora_adamw.py")],
                         capture_output=True, text=True, env=_env(tmp_path / "empty-hf"),
                         cwd=tmp_path)
    assert run.returncode == 2
    assert "model.name_or_path='EleutherAI/deep-ignorance-unfiltered'" in run.stderr
    assert not (tmp_path / "raylens-mlflow.db").exists()


@pytest.mark.rehearsal
@pytest.mark.parametrize("name", ["lora_adamw", "sft_adamw", "sft_muon", "fsdp2_muon"])
def test_real_sweep_file_runs_unmodified_on_the_rehearsal_cache(name, cache, tmp_path):
    import mlflow

    run = subprocess.run([sys.executable, str(REPO / "sweeps" / f"{name}.py"), *SCALE,
                          "--storage", str(tmp_path / "runs")], capture_output=True, text=True,
                         env=_env(cache), cwd=tmp_path, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| pareto | wmdp_bio_robust | mmlu |" in run.stdout
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'raylens-mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 1 and all(r.info.status == "FINISHED" for r in trials)
    for trial in trials:
        assert trial.data.params["model.name_or_path"] == "EleutherAI/deep-ignorance-unfiltered"
        assert trial.data.params["model.dtype"] == "bfloat16"
        assert "wmdp_bio_robust" in " ".join(trial.data.metrics)


def _preflight(hf_home, cwd, *extra):
    return subprocess.run([sys.executable, "-m", "raylens.cli", "preflight",
                           str(REPO / "sweeps" / "sft_muon.py"), *extra],
                          capture_output=True, text=True, env=_env(hf_home), cwd=cwd)


@pytest.mark.rehearsal  # three preflights of the real sweep (~90 s): with the sweeps, in CI
def test_preflight_finds_every_asset_and_names_the_first_one_missing(cache, tmp_path):
    """``raylens preflight`` (every sweep runs it first) on the full cache, then on copies
    missing the model's weights or the lens's parameters: each missing piece is one error line
    naming its field, exit 2, before Ray or any trial starts."""
    import shutil

    ok = _preflight(cache, tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "preflight: sweep sft_muon can run offline here" in ok.stdout
    assert "weights in" in ok.stdout and "lens EleutherAI/deep-ignorance-unfiltered-lens" in \
        ok.stdout
    for removed, field in (("models--EleutherAI--deep-ignorance-unfiltered", "model.name_or_path"),
                           ("models--EleutherAI--deep-ignorance-unfiltered-lens",
                            "lens.name_or_path")):
        broken = tmp_path / removed / "hf"
        shutil.copytree(cache, broken, symlinks=True)
        snapshot = next((broken / "hub" / removed / "snapshots").iterdir())
        target = "model.safetensors" if field == "model.name_or_path" else "params.pt"
        (snapshot / target).unlink()
        run = _preflight(broken, tmp_path)
        assert run.returncode == 2, (run.stdout + run.stderr)[-2000:]
        line = run.stderr.strip().splitlines()[-1]  # (datasets logs its cache hits above it)
        assert line.startswith("raylens: error: " + field), line
        assert "Traceback" not in run.stderr
        assert not (tmp_path / "raylens-mlflow.db").exists()
