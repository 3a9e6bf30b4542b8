"""The training loop on the toy world: LoRA invariants, token averaging, export round trip."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from raylens.evaluate import evaluate_folder, hf_lm, run_lm_eval
from raylens.recipes import recipe
from raylens.train import save_run, train

QUIET = dict(log=lambda *_: None)


def test_lora_retain_loss_is_exactly_zero_at_step_0(world):
    config = recipe("lora_adamw", {"data.num_examples": 32, "batch.epochs": 1})
    result = train(config, toyworld=world.root, **QUIET)
    assert len(result.history) == 1
    assert result.history[0]["retain_loss"] == 0.0
    assert result.history[0]["forget_loss"] > 1.0


def test_lora_changes_only_the_adapter_and_the_reference_stays_identical(world):
    config = recipe("lora_adamw", {"data.num_examples": 64, "batch.epochs": 1})
    result = train(config, toyworld=world.root, **QUIET)
    model = result.model
    original = dict(AutoModelForCausalLM.from_pretrained(world.model).named_parameters())
    changed_lora = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            changed_lora += int(name.endswith("lora_B.default.weight") and param.abs().sum() > 0)
            continue
        base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(param, original[base_name]), name
        assert not param.requires_grad, name
    assert changed_lora > 0
    ids = torch.randint(100, 900, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(world.model).eval()
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_loss_is_a_mean_over_real_tokens_whatever_the_micro_batch_split(world):
    """Full fine-tuning (no dropout): 1 x 32 and 4 x 8 sequences give the same steps. Losses and
    gradient norms agree to 1e-5 relative (only the float summation order differs)."""
    runs = {}
    for per_device in (32, 8):
        config = recipe("sft_adamw", {"data.num_examples": 64, "batch.epochs": 1,
                                        "batch.per_device_batch": per_device})
        runs[per_device] = train(config, toyworld=world.root, **QUIET)
    for a, b in zip(runs[32].history, runs[8].history):
        for key in ("retain_loss", "forget_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    # Adam divides each gradient element by its own magnitude, so an element whose gradient is
    # at float-noise level can move by +-lr either way: compare whole updates, not elements.
    start = dict(AutoModelForCausalLM.from_pretrained(world.model).named_parameters())
    delta = lambda model: torch.cat([(p - start[n]).flatten() for n, p in model.named_parameters()])
    d32, d8 = delta(runs[32].model), delta(runs[8].model)
    assert d32.norm() > 0
    assert ((d32 - d8).norm() / d32.norm()).item() < 1e-3


@pytest.mark.parametrize("name", ["lora_adamw", "sft_muon"])
def test_export_reloads_and_reproduces_the_eval(world, tmp_path, name):
    config = recipe(name, {"data.num_examples": 64, "batch.epochs": 1})
    result = train(config, toyworld=world.root, **QUIET)
    folder = save_run(result, config, tmp_path)
    live = run_lm_eval(hf_lm(result.model, result.tokenizer), config.eval.tasks, toyworld=world.root)
    reloaded = evaluate_folder(folder, config.eval.tasks, toyworld=world.root)
    assert reloaded == live
    assert (tmp_path / "history.jsonl").read_text().count("\n") == 2
    if name == "lora_adamw":
        assert (tmp_path / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("name", ["lora_adamw", "sft_adamw"])
def test_gradient_checkpointing_gives_the_same_step(world, name):
    runs = [
        train(recipe(name, {"data.num_examples": 32, "batch.epochs": 1,
                            "model.gradient_checkpointing": flag, "mode.lora_dropout": 0.0}),
              toyworld=world.root, **QUIET)
        for flag in (False, True)
    ]
    base = lambda m: m.get_base_model() if hasattr(m, "get_base_model") else m
    assert [base(r.model).is_gradient_checkpointing for r in runs] == [False, True]
    plain, checkpointed = (r.history[0] for r in runs)
    for key in ("retain_loss", "forget_loss", "grad_norm"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key
    assert plain["grad_norm"] > 0


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("name", ["lora_adamw", "sft_muon"])
def test_interrupted_run_resumes_to_the_same_weights(world, tmp_path, name):
    """Stop after step 5 (checkpoint at 4), rerun: the resumed run repeats step 5 from the
    checkpoint's weights, optimizer state, schedule and RNG (LoRA dropout draws from it) and ends
    bit-identical to a run that was never stopped."""
    from raylens.checkpoint import FolderCheckpoints

    config = recipe(name, {"data.num_examples": 64, "batch.epochs": 3,
                           "batch.per_device_batch": 16, "scaling.checkpoint_every": 2,
                           "mode.lora_dropout": 0.1})
    whole = train(config, toyworld=world.root, **QUIET)
    assert len(whole.history) == 6

    def stop_after_5(record):
        if record["step"] == 5:
            raise _Interrupt

    store = FolderCheckpoints(tmp_path / "checkpoints", keep=1)
    with pytest.raises(_Interrupt):
        train(config, toyworld=world.root, checkpoints=store, on_step=stop_after_5, **QUIET)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000004"]
    lines = []
    resumed = train(config, toyworld=world.root, checkpoints=store, log=lines.append)
    assert lines[0].startswith("resumed from") and "step 4/6" in lines[0]
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed.history, whole.history):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"]
    for (key, a), (_, b) in zip(resumed.model.state_dict().items(),
                                whole.model.state_dict().items()):
        assert torch.equal(a, b), key

    changed = recipe(name, {"data.num_examples": 64, "batch.epochs": 3,
                            "batch.per_device_batch": 16, "scaling.checkpoint_every": 2,
                            "mode.lora_dropout": 0.1, "loss.remove_coef": 7.0})
    with pytest.raises(ValueError, match=r"loss.remove_coef=7.0 is invalid for resuming"):
        train(changed, toyworld=world.root, checkpoints=store, **QUIET)
