"""Bad input is refused before any compute: every malformed config, sweep file and command line
below exits with status 2 and one line naming the field, the value and what is allowed; no
model is loaded, Ray is not started, and nothing is left behind (the working directory and the
output folder stay as they were). Each case goes through the real ``raylens`` entry point."""

import socket
from pathlib import Path

import pytest

from raylens import cli

SWEEP = str(Path(__file__).resolve().parent.parent / "sweeps" / "sft_adamw.py")
OUT = ["--out", "out"]

SWEEP_FILES = {
    "syntax.py": "from raylens.recipes import recipe\nREAL = (\n",
    "empty.py": "X = 1\n",
    "empty_range.py": "from raylens.config import SweepConfig\nfrom raylens.recipes import recipe\n"
                      "REAL = TOY = SweepConfig(name='r', base=recipe('sft_adamw'), "
                      "space={'optim.lr': ('log', 1e-3, 1e-5)})\n",
    "unknown_key.py": "from raylens.config import SweepConfig\nfrom raylens.recipes import recipe\n"
                      "REAL = TOY = SweepConfig(name='r', base=recipe('sft_adamw'), "
                      "space={'optim.learning_rate': ('log', 1e-5, 1e-3)})\n",
    "unknown_dist.py": "from raylens.config import SweepConfig\nfrom raylens.recipes import recipe\n"
                       "REAL = TOY = SweepConfig(name='r', base=recipe('sft_adamw'), "
                       "space={'optim.lr': ('normal', 1e-5, 1e-3)})\n",
    "empty_choice.py": "from raylens.config import SweepConfig\nfrom raylens.recipes import recipe\n"
                       "REAL = TOY = SweepConfig(name='r', base=recipe('sft_adamw'), "
                       "space={'loss.retain_loss': ('choice', ())})\n",
}
CORPORA = {"empty.jsonl": "", "broken.jsonl": '{"text": "a"}\n{"text": \n',
           "nocolumn.jsonl": '{"body": "a document"}\n' * 8}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [
    # raylens unlearn: recipe, types, ranges, unknown keys
    (["unlearn", "--recipe", "nope", *OUT], ["recipe='nope'", "allowed one of", "sft_adamw"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "data.num_examples=abc", *OUT],
     ["data.num_examples", "abc", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "data.num_examples=0", *OUT],
     ["data.num_examples=0", "allowed a positive integer"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "loss.retain_coef=-1", *OUT],
     ["loss.retain_coef=-1", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "loss.retain_start=1.5", *OUT],
     ["loss.retain_start=1.5", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "optim.lr=0", *OUT],
     ["optim.lr=0", "allowed a positive number"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "optim.name=sgd", *OUT],
     ["optim.name='sgd'", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "model.dtype=float8", *OUT],
     ["model.dtype='float8'", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "mode.kind=half", *OUT],
     ["mode.kind='half'", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "batch.per_device_batch=0", *OUT],
     ["batch.per_device_batch=0", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "batch.global_batch=24", "--set",
      "batch.per_device_batch=16", *OUT], ["batch.global_batch=24", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "batch.global_batch=6", "--workers", "4",
      *OUT], ["batch.global_batch=6", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "loss.target_layers=[99]", *OUT],
     ["loss.target_layers=(99,)", "allowed layers 0..5"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "loss.target_layers=[]", *OUT],
     ["loss.target_layers", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "nope.key=1", *OUT], ["nope.key", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "noequals", *OUT],
     ["--set 'noequals'", "allowed key=value"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "model.name_or_path=/nonexistent/model",
      *OUT], ["model.name_or_path", "/nonexistent/model"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "lens.name_or_path=lens_other", *OUT],
     ["lens.name_or_path='lens_other'", "made for 3 layers of width 8", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "lens.name_or_path=lens_half", *OUT],
     ["lens.name_or_path='lens_half'", "params.pt"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "data.forget=/nonexistent.jsonl", *OUT],
     ["data.forget", "/nonexistent.jsonl"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "data.forget=empty.jsonl", *OUT],
     ["data.forget", "empty.jsonl"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "data.forget=broken.jsonl", *OUT],
     ["data.forget", "broken.jsonl", "line 2"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "data.forget=nocolumn.jsonl", *OUT],
     ["data.forget", "nocolumn.jsonl", "text"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "data.retain=nocolumn.jsonl", "--set",
      "data.retain_field=page", *OUT], ["data.retain", "nocolumn.jsonl", "text"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "eval.tasks=[nope]", *OUT],
     ["eval.tasks", "nope", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "eval.time_limit_s=0", *OUT],
     ["eval.time_limit_s=0", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--workers", "0", *OUT],
     ["scaling.num_workers=0", "allowed a positive integer"]),
    (["unlearn", "--recipe", "sft_adamw", "--set", "batch.global_batch=64", "--gpus", "8", *OUT],
     ["--gpus=8", "has 0 GPUs", "allowed at most 0"], "ray"),
    (["unlearn", "--recipe", "sft_adamw", "--set", "batch.global_batch=512", "--workers", "64",
      *OUT], ["--workers=64", "CPUs", "allowed at most"], "ray"),
    (["unlearn", "--recipe", "sft_adamw", "--out", "full"], ["--out='full'", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set",
      f"tracking.tracking_uri=http://127.0.0.1:{_closed_port()}", *OUT],
     ["tracking.tracking_uri", "unreachable", "allowed"]),
    (["unlearn", "--recipe", "sft_adamw", "--set",
      "tracking.tracking_uri=http://user:hunter2@127.0.0.1:5000", *OUT],
     ["tracking.tracking_uri", "***", "use http://user:***@"]),
    # raylens attack
    (["attack", "toy", "--suite", "nope"], ["suite='nope'", "seed, short, long"]),
    (["attack", "toy", "--lr", "-1"], ["attack.lr=-1.0", "allowed a positive number"]),
    (["attack", "toy", "--mode", "half"], ["--mode", "half", "full", "lora"]),
    (["attack", "toy", "--examples", "0"], ["attack.num_examples=0", "allowed"]),
    (["attack", "toy", "--level", "2"], ["attack.level=2.0", "allowed"]),
    (["attack", "toy", "--batch", "7", "--workers", "2"], ["7", "2", "allowed"]),
    (["attack", "/nonexistent/run"], ["MODEL_DIR='/nonexistent/run'", "allowed"]),
    (["attack", "toy", "--steps", "0"], ["attack.max_steps=0", "allowed"]),
    # sweep files and sweep settings
    (["sweep", SWEEP, "--toy", "--set", "sweep.name=../x"], ["sweep.name='../x'", "allowed"]),
    (["sweep", SWEEP, "--toy", "--set", "sweep.name=a/b"], ["sweep.name='a/b'", "allowed"]),
    (["sweep", SWEEP, "--toy", "--set", "sweep.num_trials=0"],
     ["sweep.num_trials=0", "allowed a positive integer"]),
    (["sweep", SWEEP, "--toy", "--trials", "-3"], ["sweep.num_trials=-3", "allowed"]),
    (["sweep", SWEEP, "--toy", "--set", "sweep.sampler=grid"], ["sweep.sampler='grid'", "tpe"]),
    (["sweep", SWEEP, "--toy", "--set", "sweep.attack_suite=nope"],
     ["sweep.attack_suite='nope'", "allowed"]),
    (["sweep", SWEEP, "--toy", "--set", "sweep.attack_objective=both"],
     ["sweep.attack_objective='both'", "allowed"]),
    (["sweep", SWEEP, "--toy", "--set", "sweep.retain_floor=2"],
     ["sweep.retain_floor=2", "allowed"]),
    (["sweep", SWEEP, "--toy", "--set", "sweep.max_concurrent=-1"],
     ["sweep.max_concurrent=-1", "allowed"]),
    (["sweep", SWEEP, "--toy", "--set", "sweep.keep_exports=some"],
     ["sweep.keep_exports='some'", "allowed"]),
    (["sweep", SWEEP, "--toy", "--set", "sweep.space={}"], ["space", "allowed"]),
    (["sweep", SWEEP, "--toy", "--study-url", "postgresql://u:hunter2@db/optuna"],
     ["study_url", "***", "pgpass"]),
    (["sweep", SWEEP, "--toy", "--set", "loss.target_layers=[40]"],
     ["loss.target_layers=(40,)", "allowed layers 0..5"]),
    (["sweep", SWEEP, "--toy", "--set", f"tracking.tracking_uri=http://127.0.0.1:"
                                        f"{_closed_port()}"],
     ["tracking.tracking_uri", "unreachable"]),
    (["sweep", "/nonexistent.py", "--toy"], ["/nonexistent.py", "does not exist"]),
    (["sweep", "syntax.py", "--toy"], ["syntax.py", "line", "SyntaxError", "allowed"]),
    (["sweep", "empty.py", "--toy"], ["empty.py", "REAL and TOY"]),
    (["sweep", "empty_range.py", "--toy"], ["optim.lr", "0.001", "1e-05", "allowed"]),
    (["sweep", "unknown_key.py", "--toy"], ["optim.learning_rate", "allowed"]),
    (["sweep", "unknown_dist.py", "--toy"], ["optim.lr", "normal", "allowed"]),
    (["sweep", "empty_choice.py", "--toy"], ["loss.retain_loss", "allowed"]),
    # the demo and the evaluator
    (["demo", "--trials", "0"], ["num_trials=0", "allowed"]),
    (["demo", "--set", "sweep.sampler=grid"], ["sweep.sampler='grid'", "allowed"]),
    (["eval", "--model", "toy", "--tasks", "nope"], ["nope", "allowed"]),
    (["eval", "--model", "/nonexistent"], ["--model='/nonexistent'", "allowed"]),
]


@pytest.fixture
def place(tmp_path, monkeypatch, world):
    """A working directory holding the bad corpora, sweep files and lenses the cases name, a
    non-empty folder ``full``; model loading and ``ray.init`` fail the test if reached."""
    import json
    import shutil

    import ray
    import transformers

    for name, text in {**SWEEP_FILES, **CORPORA}.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("a finished run")
    other = tmp_path / "lens_other"
    shutil.copytree(world.root / "lens", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "d_model": 8,
                                                   "num_hidden_layers": 3}))
    (tmp_path / "lens_half").mkdir()
    shutil.copy(world.root / "lens" / "config.json", tmp_path / "lens_half")

    def reached(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} was reached before the input was refused")
        return fail

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(reached("model loading")))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        reached("model construction"))
    monkeypatch.setattr(ray, "init", reached("ray.init"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_one_line_exit_2_before_any_compute_and_leaves_nothing(place, capsys,
                                                                             monkeypatch, case):
    """Cases marked ``ray`` need the cluster's size: Ray starts (nothing else does)."""
    import ray

    argv, expected, *needs = case
    if needs:
        monkeypatch.undo()  # model loading is still checked below, by what is left behind
        monkeypatch.chdir(place)
    before = _listing(place)
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    finally:
        if needs:
            ray.shutdown()
    # progress bars of a library imported before the CLI could silence it (this process's)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and "%|" not in line]
    assert code == 2, err
    assert len(err) == 1, err
    for fragment in expected:
        assert fragment in err[0], (fragment, err[0])
    assert _listing(place) == before


def test_there_are_at_least_40_bad_inputs():
    assert len(CASES) >= 40
