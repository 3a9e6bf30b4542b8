"""Faults injected for real in one process: a damaged or partial checkpoint, a full file system
while checkpointing and exporting (a tmpfs mounted for the test, as root), a loss that turns
NaN, an MLflow server that does not answer. The faults that need Ray, a sweep or a server
(killed workers and drivers, an evaluation that overruns, MLflow and PostgreSQL stopped mid-sweep,
the soak) are in ``test_soak.py`` and the integration tests; ``docs/reliability.md`` lists all."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from raylens.checkpoint import CheckpointWriteError, FolderCheckpoints, checkpoint_problem
from raylens.config import ConfigError, SweepConfig
from raylens.recipes import recipe
from raylens.search import objectives
from raylens.train import ExportError, run, save_run, train

QUIET = dict(log=lambda *_: None)
CONFIG = {"data.num_examples": 64, "batch.epochs": 3, "batch.per_device_batch": 16,
          "scaling.checkpoint_every": 2}


class _Stop(Exception):
    pass


def _stop_after(step):
    def on_step(record):
        if record["step"] == step:
            raise _Stop
    return on_step


@pytest.fixture(scope="module")
def whole(world):
    """The 6-step LoRA run the resumed ones must reproduce."""
    return train(recipe("lora_adamw", CONFIG), toyworld=world.root, **QUIET)


@pytest.fixture(scope="module")
def stopped(world, tmp_path_factory):
    """The checkpoints (steps 2 and 4) of the same run stopped after step 5."""
    folder = tmp_path_factory.mktemp("stopped")
    with pytest.raises(_Stop):
        train(recipe("lora_adamw", CONFIG), toyworld=world.root,
              checkpoints=FolderCheckpoints(folder, keep=2), on_step=_stop_after(5), **QUIET)
    return folder


def _same_weights(a, b):
    for (key, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), key


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "delete_shard"])
def test_a_damaged_checkpoint_is_detected_and_the_one_before_it_is_used(world, whole, stopped,
                                                                        tmp_path, damage):
    """Checkpoints at steps 2 and 4, stop after 5, damage step 4 (a truncated or changed shard,
    a rank that never finished its manifest, a lost file): the resume says which file is wrong,
    continues from step 2 and ends bit-identical to the run that was never stopped."""
    config = recipe("lora_adamw", CONFIG)
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    store = FolderCheckpoints(tmp_path, keep=2)
    newest = tmp_path / "step_000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000004"]
    assert checkpoint_problem(newest) is None
    shard = next(newest.glob("*.distcp"))
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (newest / "manifest_rank0.json").unlink()
    else:
        shard.unlink()
    problem = checkpoint_problem(newest)
    assert problem is not None and (shard.name in problem or "manifest_rank0" in problem)
    lines = []
    resumed = train(config, toyworld=world.root, checkpoints=store, log=lines.append)
    assert any(f"checkpoint {newest} is damaged" in line for line in lines), lines[:3]
    assert any("resumed from" in line and "step 2/6" in line for line in lines), lines[:3]
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]
    _same_weights(resumed, whole)


@contextlib.contextmanager
def _small_disk(path: Path, size_kb: int):
    """A tmpfs of ``size_kb`` KiB mounted at ``path`` (root only); yields a function that
    resizes it."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {exc}")
    try:
        yield lambda kb: subprocess.run(["mount", "-o", f"remount,size={kb}k", str(path)],
                                        check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _checkpoint_kb(world, tmp_path) -> int:
    store = FolderCheckpoints(tmp_path / "measure", keep=1)
    with pytest.raises(_Stop):  # one checkpoint, at step 2
        train(recipe("lora_adamw", CONFIG), toyworld=world.root, checkpoints=store,
              on_step=_stop_after(3), **QUIET)
    folder = next((tmp_path / "measure").iterdir())
    return sum(f.stat().st_size for f in folder.iterdir()) // 1024 + 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_a_full_disk_while_checkpointing_names_the_folder_and_keeps_the_previous_one(
        world, whole, tmp_path):
    """The checkpoint folder is a tmpfs with room for one checkpoint and a half: the second
    fails with the folder and 'No space left on device' named, no partial folder is left, the
    first is whole; with room again (remount) the run resumes from it and ends bit-identical."""
    size = _checkpoint_kb(world, tmp_path)
    config = recipe("lora_adamw", CONFIG)
    with _small_disk(tmp_path / "disk", int(size * 1.5)) as resize:
        store = FolderCheckpoints(tmp_path / "disk", keep=2)
        with pytest.raises(CheckpointWriteError) as failed:
            train(config, toyworld=world.root, checkpoints=store, **QUIET)
        message = str(failed.value)
        print(message)
        assert str(tmp_path / "disk" / "step_000004.tmp") in message
        assert "No space left on device" in message
        assert f"previous checkpoint {tmp_path / 'disk' / 'step_000002'} is intact" in message
        assert [p.name for p in (tmp_path / "disk").iterdir()] == ["step_000002"]
        assert checkpoint_problem(tmp_path / "disk" / "step_000002") is None
        resize(size * 4)
        lines = []
        resumed = train(config, toyworld=world.root, checkpoints=store, log=lines.append)
        assert any("step 2/6" in line for line in lines)
        _same_weights(resumed, whole)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_a_full_disk_while_exporting_names_the_folder(world, whole, tmp_path):
    """The export folder is a 64 KiB tmpfs: ``save_run`` fails with ``ExportError`` naming it
    and the cause."""
    with _small_disk(tmp_path / "disk", 64):
        with pytest.raises(ExportError) as failed:
            save_run(whole, recipe("lora_adamw", CONFIG), tmp_path / "disk" / "run")
    assert str(tmp_path / "disk" / "run") in str(failed.value)
    assert "No space left on device" in str(failed.value)


def test_a_nan_loss_stops_the_run_and_is_recorded_diverged(world, tmp_path):
    """lr 100: the loss is NaN within 6 of 12 steps. The run stops there, is
    neither scored nor exported, and the sweep's objectives call it diverged, infeasible, with
    the step in the reason."""
    config = recipe("sft_adamw", {"data.num_examples": 64, "batch.epochs": 6, "optim.lr": 100.0})
    lines = []
    report = run(config, tmp_path / "out", toyworld=world.root, log=lines.append)
    steps = report["num_steps"]
    assert steps < 6 and report["diverged"] == f"diverged: loss nan at step {steps}"
    assert any(f"({12 - steps} steps not taken)" in line for line in lines), lines
    assert report["eval"] is None and not (tmp_path / "out" / "model").exists()
    assert json.loads((tmp_path / "out" / "train_report.json").read_text())["diverged"]
    assert len((tmp_path / "out" / "history.jsonl").read_text().splitlines()) == steps
    sweep = SweepConfig(name="t", base=config, space={"optim.lr": ("log", 1.0, 100.0)})
    scored = objectives(report, sweep)
    assert scored["infeasible"] == "diverged" and not scored["feasible"]
    assert scored["constraint"] > 0 and f"step {steps}" in scored["reason"]


def test_an_mlflow_server_that_does_not_answer_is_an_error_before_any_trial():
    """A port nothing listens on: preflight's check names the field and what is allowed."""
    from raylens.tracking import check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    with pytest.raises(ConfigError, match=rf"tracking.tracking_uri='http://127.0.0.1:{port}' "
                                          r"is unreachable .*allowed a running MLflow server"):
        check_reachable(f"http://127.0.0.1:{port}")
    assert check_reachable("sqlite:////tmp/x.db").startswith("MLflow: local store")


def _frozen_eval(rank, world, root, flags):
    """Score once unlimited (the time it takes), then the questions repeated to last at least
    3 s, with a limit of twice that, while the parent freezes rank 1 (SIGSTOP) for longer than
    the limit. The repetition makes the freeze land inside the timed evaluation: one pass over
    the toy world's questions can end before the parent's signal (0.2 s on CI)."""
    import math
    import time

    import torch.distributed as dist

    from raylens.config import EvalConfig, ModelConfig
    from raylens.evaluate import EvalError, eval_questions, evaluate_live
    from raylens.model import load_model

    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, tokenizer = load_model(ModelConfig(), toyworld=root)
    questions = eval_questions(EvalConfig(), tokenizer, root, model.config)
    start = time.monotonic()
    evaluate_live(model, tokenizer, EvalConfig(batch_size=4), root, questions=questions)
    from raylens.collectives import all_gather

    once = max(all_gather(time.monotonic() - start))  # one figure, so one limit, for both
    reps = math.ceil(3.0 / once)
    timed = {task: qs * reps for task, qs in questions.items()}
    limit = 2 * reps * once
    Path(flags, f"rank{rank}").write_text(json.dumps({"pid": os.getpid(), "limit": limit}))
    start = time.monotonic()
    try:
        evaluate_live(model, tokenizer, EvalConfig(batch_size=4, time_limit_s=limit), root,
                      questions=timed)
        return ("scored", time.monotonic() - start, limit)
    except EvalError as exc:
        return (str(exc), time.monotonic() - start, limit)


@pytest.mark.faults
def test_a_frozen_rank_stops_the_evaluation_on_every_rank_together(world, tmp_path):
    """Rank 1 is frozen (SIGSTOP) just after the timed evaluation starts, for the limit plus
    4 s: when it wakes, both ranks find the deadline passed and raise the same time-limit error
    at the same batch, seconds after the freeze ends, not after a process-group timeout."""
    import signal
    import threading
    import time

    from ranks import run_ranks

    def freeze():
        flag = tmp_path / "rank1"
        while not flag.exists():
            time.sleep(0.05)
        time.sleep(0.2)
        info = json.loads(flag.read_text())
        os.kill(info["pid"], signal.SIGSTOP)
        time.sleep(info["limit"] + 4)
        os.kill(info["pid"], signal.SIGCONT)

    thread = threading.Thread(target=freeze)
    thread.start()
    results = run_ranks(_frozen_eval, 2, str(world.root), str(tmp_path), timeout=240)
    thread.join()
    print(results)
    (m0, t0, limit), (m1, t1, _) = results
    assert "exceeded its time limit" in m0 and m0 == m1, results
    assert limit + 4 <= min(t0, t1) and max(t0, t1) < limit + 4 + 20, results
