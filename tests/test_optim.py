"""Optimizer groups: Muon gets exactly the hidden matrices; the AdamW half is plain AdamW."""

import copy

import pytest
import torch
from tiny import tiny_neox

from raylens.config import OptimConfig
from raylens.optim import build_optimizers, param_groups


def test_muon_receives_exactly_the_hidden_matrices():
    model = tiny_neox(layers=3)
    groups = param_groups(model, OptimConfig(name="muon"))
    expected = {
        f"gpt_neox.layers.{i}.{m}.weight"
        for i in range(3)
        for m in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                  "mlp.dense_4h_to_h")
    }
    assert {n for n, _ in groups["muon"]} == expected
    assert {n for n, _ in groups["decay"]} == {"gpt_neox.embed_in.weight", "lm_head.weight"}
    assert all(p.ndim == 1 for _, p in groups["no_decay"])  # norms and biases
    total = sum(len(g) for g in groups.values())
    assert total == len(list(model.parameters()))
    muon, adamw = build_optimizers(model, OptimConfig(name="muon", muon_lr=0.02, adam_lr=3e-4))
    assert isinstance(muon, torch.optim.Muon) and muon.param_groups[0]["lr"] == 0.02
    assert isinstance(adamw, torch.optim.AdamW)
    assert {g["lr"] for g in adamw.param_groups} == {3e-4}


def test_adamw_mode_has_no_muon_group():
    model = tiny_neox()
    optimizers = build_optimizers(model, OptimConfig(name="adamw", lr=1e-3))
    assert [type(o) for o in optimizers] == [torch.optim.AdamW]
    assert not param_groups(model, OptimConfig(name="adamw"))["muon"]


def test_adamw_half_matches_torch_adamw():
    ours = tiny_neox()
    ref = copy.deepcopy(ours)
    config = OptimConfig(name="muon", muon_lr=0.02, adam_lr=1e-3, weight_decay=0.01)
    optimizers = build_optimizers(ours, config)
    hidden = {n for n, _ in param_groups(ref, config)["muon"]}
    named = dict(ref.named_parameters())
    adam_ref = torch.optim.AdamW(
        [
            {"params": [p for n, p in named.items() if n not in hidden and p.ndim >= 2],
             "weight_decay": 0.01},
            {"params": [p for n, p in named.items() if n not in hidden and p.ndim < 2],
             "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    muon_ref = torch.optim.Muon([named[n] for n in hidden], lr=0.02, weight_decay=0.01)
    ids = torch.randint(50, (4, 10), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, opts in ((ours, optimizers), (ref, [muon_ref, adam_ref])):
            model(input_ids=ids, labels=ids).loss.backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    # the update moved every parameter group
    assert not torch.equal(ours.gpt_neox.embed_in.weight, tiny_neox().gpt_neox.embed_in.weight)


def test_seed_muon_convention_scales_each_matrix_step_by_its_shape():
    """``match_rms_adamw`` multiplies a matrix's step by 0.2 * sqrt(max(A, B)), ``original`` by
    sqrt(max(1, A/B)): at the same muon_lr the two updates differ by exactly that ratio (6.4 on
    a 1024x1024 matrix, 12.8x-25.6x on GPT-NeoX-6.9B's); the AdamW half gets the betas."""
    for rows, cols in ((64, 64), (192, 64), (64, 256)):
        updates = {}
        for rule in ("original", "match_rms_adamw"):
            torch.manual_seed(0)
            weight = torch.nn.Parameter(torch.randn(rows, cols) * 0.02)
            start = weight.detach().clone()
            opt = torch.optim.Muon([weight], lr=1e-3, weight_decay=0.0, adjust_lr_fn=rule)
            weight.grad = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
            opt.step()
            updates[rule] = (weight.detach() - start).norm()
        expected = 0.2 * max(rows, cols) ** 0.5 / max(1, rows / cols) ** 0.5
        assert float(updates["match_rms_adamw"] / updates["original"]) == \
            pytest.approx(expected, rel=1e-4)
    model = tiny_neox()
    config = OptimConfig(name="muon", muon_adjust_lr="match_rms_adamw", adam_betas=(0.9, 0.95))
    muon, adamw = build_optimizers(model, config)
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert {g["betas"] for g in adamw.param_groups} == {(0.9, 0.95)}


def test_muon_recipes_use_the_seed_optimizer():
    from raylens.recipes import recipe

    optim = recipe("sft_muon").optim
    assert optim.muon_adjust_lr == "match_rms_adamw" and optim.adam_betas == (0.9, 0.95)


def test_muon_runs_log_muons_lr_and_adamws_beside_it(world):
    from raylens.recipes import recipe
    from raylens.train import train

    config = recipe("sft_muon", {"data.num_examples": 64, "batch.epochs": 1,
                                 "optim.warmup_ratio": 0.0})
    record = train(config, toyworld=world.root, log=lambda *_: None).history[0]
    assert record["lr"] == config.optim.muon_lr and record["adam_lr"] == config.optim.adam_lr
