"""Ray Train workers: LoRA under DDP keeps every rank identical and equals one process."""

import json

import pytest
import torch
from safetensors.torch import load_file

from raylens.ray_train import fit_on_ray
from raylens.recipes import recipe
from raylens.train import encoded_questions, save_run, train

pytestmark = pytest.mark.integration  # Ray Train worker groups: make test-integration


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _first(encoded: dict, n: int) -> dict:
    """The first ``n`` questions of every task of ``train.encoded_questions``'s sets."""
    return {key: {task: qs[:n] for task, qs in sets.items()} for key, sets in encoded.items()}


def test_lora_ddp_two_workers_agree_and_match_one_process(world, ray_local, tmp_path):
    """Two DDP workers keep identical adapters equal to one process's, and score the questions
    the driver handed them (here the first 20 of each task) without loading the tasks again."""
    overrides = {"data.num_examples": 64, "batch.epochs": 1, "batch.per_device_batch": 8,
                 "mode.lora_dropout": 0.0}
    two = recipe("lora_adamw", {**overrides, "scaling.num_workers": 2})
    report = fit_on_ray(two, out=tmp_path / "two", storage_path=tmp_path / "ray",
                        toyworld=world.root,
                        questions=_first(encoded_questions(two, world.root), 20))
    assert len(report["rank_digests"]) == 2 and len(set(report["rank_digests"])) == 1
    assert {task: s["n"] for task, s in report["eval"].items()} == {"toy_wmdp": 20,
                                                                   "toy_mmlu": 20}

    one = recipe("lora_adamw", overrides)
    result = train(one, toyworld=world.root, log=lambda *_: None)
    assert report["num_steps"] == len(result.history) == 2
    lines = (tmp_path / "two" / "history.jsonl").read_text().splitlines()
    two_history = [json.loads(line) for line in lines]
    for a, b in zip(two_history, result.history):
        for key in ("retain_loss", "forget_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    save_run(result, one, tmp_path / "one")
    a = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    # Adam can flip float-noise-sized elements by +-lr; compare the whole adapter
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])
    diff = (flat(a) - flat(b)).norm() / flat(b).norm()
    print(f"adapter relative difference 2 workers vs 1 process: {diff.item():.2e}")
    assert diff.item() < 1e-3


# AdamW: only the float summation order differs (Adam can flip noise-sized elements, hence a
# whole-update comparison). Muon: torch.optim.Muon runs Newton-Schulz in bf16 and pushes every
# singular value towards 1, including the noise-level directions where sharded and unsharded
# gradients differ, so its updates agree only to ~7% (measured 6.6e-2); losses agree to 2e-3.
@pytest.mark.parametrize("name, loss_rel, update_rel", [("sft_adamw", 1e-5, 1e-3),
                                                        ("sft_muon", 2e-3, 0.1)])
def test_fsdp2_two_workers_match_one_process(world, ray_local, tmp_path, name, loss_rel,
                                             update_rel):
    overrides = {"data.num_examples": 64, "batch.epochs": 1, "batch.per_device_batch": 8}
    report = fit_on_ray(recipe(name, {**overrides, "scaling.num_workers": 2}),
                        out=tmp_path / "two", storage_path=tmp_path / "ray", toyworld=world.root)
    one = recipe(name, overrides)
    result = train(one, toyworld=world.root, log=lambda *_: None)
    lines = (tmp_path / "two" / "history.jsonl").read_text().splitlines()
    for a, b in zip([json.loads(line) for line in lines], result.history):
        for key in ("retain_loss", "forget_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=loss_rel, abs=1e-7), key
    assert report["num_steps"] == len(result.history) == 2
    start = load_file(world.model / "model.safetensors")
    two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    save_run(result, one, tmp_path / "one")
    single = load_file(tmp_path / "one" / "model" / "model.safetensors")
    delta = lambda d: torch.cat([(d[k] - start[k]).flatten() for k in sorted(start)])
    diff = (delta(two) - delta(single)).norm() / delta(single).norm()
    print(f"{name}: update relative difference 2 FSDP2 workers vs 1 process: {diff.item():.2e}")
    assert delta(single).norm() > 0 and diff.item() < update_rel


def _train_worker_pids(ray) -> list[int]:
    import psutil

    actors = ray._private.state.actors().values()  # the GCS actor table; no dashboard needed
    return [a["Pid"] for a in actors
            if a["ActorClassName"] == "RayTrainWorker" and psutil.pid_exists(a["Pid"])]


def _registered_checkpoints(run_folder) -> int:
    """Checkpoints Ray's checkpoint manager has registered (files alone are not enough: a kill
    between upload and registration restarts from the previous one)."""
    snapshot = run_folder / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _fit_and_kill_a_worker(config, world, ray, storage, name) -> dict:
    """Run ``fit_on_ray`` in a thread; SIGKILL one worker once a checkpoint is registered.
    Returns ``{"killed": pid, "report": ...}`` or ``{"killed": pid, "error": exc}``."""
    import os
    import signal
    import threading
    import time

    outcome = {"killed": None}

    def run():
        try:
            outcome["report"] = fit_on_ray(config, out=storage / f"{name}-out",
                                           storage_path=storage, toyworld=world.root, name=name)
        except Exception as exc:  # noqa: BLE001  (the test inspects it)
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    while outcome["killed"] is None and time.monotonic() < deadline and thread.is_alive():
        if _registered_checkpoints(storage / name):
            pids = _train_worker_pids(ray)
            if len(pids) == 2:
                outcome["killed"] = max(pids)
                os.kill(outcome["killed"], signal.SIGKILL)
        time.sleep(0.1)
    thread.join(timeout=600)
    assert outcome["killed"] is not None, "the run ended before a checkpoint was registered"
    return outcome


KILL_OVERRIDES = {"data.num_examples": 64, "batch.epochs": 6, "batch.per_device_batch": 8,
                  "scaling.num_workers": 2, "scaling.checkpoint_every": 3}


@pytest.fixture(scope="module")
def uninterrupted(world, ray_local, tmp_path_factory):
    """The 12-step 2-worker FSDP2 run the interrupted ones must reproduce."""
    storage = tmp_path_factory.mktemp("uninterrupted")
    report = fit_on_ray(recipe("sft_adamw", KILL_OVERRIDES), out=storage / "out",
                        storage_path=storage, toyworld=world.root, name="whole")
    assert report["resumed_from"] == 0 and report["num_steps"] == 12
    return {"weights": load_file(storage / "out" / "model" / "model.safetensors"),
            "report": report, "folder": storage / "out" / "model"}


def _assert_same_weights(folder, expected):
    got = load_file(folder / "model" / "model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.any_world
def test_killed_worker_is_replaced_and_the_run_finishes_from_its_checkpoint(
        world, ray_local, uninterrupted, tmp_path):
    """SIGKILL one of two FSDP2 workers after Ray registered a checkpoint: Ray Train restarts the
    worker group (FailureConfig max_failures=1) from it, and the run ends bit-identical to one
    that was never interrupted, with every step in its history once."""
    config = recipe("sft_adamw", {**KILL_OVERRIDES, "scaling.max_failures": 1})
    outcome = _fit_and_kill_a_worker(config, world, ray_local, tmp_path, "killed")
    assert "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    print(f"worker {outcome['killed']} killed; resumed from step {report['resumed_from']}")
    assert report["resumed_from"] in (3, 6, 9) and report["num_steps"] == 12
    assert outcome["killed"] not in _train_worker_pids(ray_local)
    history = [json.loads(line) for line in
               (tmp_path / "killed-out" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == list(range(1, 13))
    _assert_same_weights(tmp_path / "killed-out", uninterrupted["weights"])


@pytest.mark.any_world
def test_failed_run_resumes_when_started_again_with_its_name(world, ray_local, uninterrupted,
                                                           tmp_path):
    """With no retries left the kill fails the run; the same call again (same name and storage)
    continues from the last registered checkpoint and ends bit-identical."""
    from ray.train import TrainingFailedError

    config = recipe("sft_adamw", {**KILL_OVERRIDES, "scaling.max_failures": 0})
    outcome = _fit_and_kill_a_worker(config, world, ray_local, tmp_path, "again")
    assert isinstance(outcome.get("error"), TrainingFailedError), outcome
    report = fit_on_ray(config, out=tmp_path / "again-out", storage_path=tmp_path,
                        toyworld=world.root, name="again")
    print(f"rerun resumed from step {report['resumed_from']}")
    assert report["resumed_from"] in (3, 6, 9) and report["num_steps"] == 12
    _assert_same_weights(tmp_path / "again-out", uninterrupted["weights"])


def test_in_trial_eval_of_sharded_model_equals_lm_eval_of_the_export(world, uninterrupted):
    """The fast scorer on the live FSDP2-sharded model (questions split over both ranks) gives
    lm-eval's accuracy and per-question predictions on the exported folder, in one process."""
    from raylens.config import ModelConfig
    from raylens.evaluate import hf_lm, lm_eval_0shot, task_manager
    from raylens.model import load_model

    live = uninterrupted["report"]["eval"]
    assert uninterrupted["report"]["eval_error"] is None and set(live) == {"toy_wmdp", "toy_mmlu"}
    model, tokenizer = load_model(ModelConfig(name_or_path=str(uninterrupted["folder"])))
    out = lm_eval_0shot(hf_lm(model, tokenizer), tuple(live),
                        task_manager(tuple(live), world.root), log_samples=True)
    for task, scores in live.items():
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        expected = [max(range(4), key=lambda j: (s["filtered_resps"][j][0], -j)) for s in samples]
        print(f"{task}: in-trial acc {scores['acc']:.4f}, lm-eval on export "
              f"{out['results'][task]['acc,none']:.4f}")
        assert scores["n"] == len(samples) == 192
        assert scores["predictions"] == expected
        assert scores["acc"] == out["results"][task]["acc,none"]
