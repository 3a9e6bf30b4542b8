"""The toy lens: better than the logit lens everywhere, and in tuned-lens's own file format."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from tuned_lens.nn import TunedLens

from raylens import toyworld as tw
from raylens.config import ConfigError, ToyWorldConfig
from raylens.lens import lens_kl_report, load_lens


@pytest.fixture(scope="module")
def loaded(world):
    model = AutoModelForCausalLM.from_pretrained(world.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(world.model)
    return model, tokenizer, load_lens(model, str(world.lens))


def test_tuned_lens_beats_logit_lens_at_every_layer_on_fresh_text(world, loaded):
    model, tokenizer, lens = loaded
    facts = tw.make_facts(world.config)
    rng = random.Random(12345)  # documents never seen in training: new renderings of the facts
    texts = tw.render_docs(facts["hazard"], "pathogen", 32, rng)
    texts += tw.render_docs(facts["general"], "village", 32, rng)
    report = lens_kl_report(model, lens, tokenizer, texts)
    assert len(report["tuned"]) == model.config.num_hidden_layers
    for layer, (tuned, logit) in enumerate(zip(report["tuned"], report["logit"])):
        assert tuned < logit, f"layer {layer}: tuned {tuned} >= logit {logit}"
    saved = __import__("json").loads((world.lens / "kl_report.json").read_text())
    assert all(t < l for t, l in zip(saved["tuned"], saved["logit"]))


def test_saved_lens_reloads_with_tuned_lens_identically(world, loaded):
    model, _, lens = loaded
    theirs = TunedLens.from_model_and_pretrained(model, str(world.lens))
    h = torch.randn(3, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in range(len(lens)):
        assert torch.equal(theirs(h, layer), lens(h, layer))
    assert any(t.weight.abs().sum() > 0 for t in lens.layer_translators)  # not the zero init
    assert not any(p.requires_grad for p in lens.parameters())


def test_lens_for_another_model_is_rejected(world):
    other = tw.new_model(ToyWorldConfig(num_layers=3), vocab_size=100, eos_id=0)
    with pytest.raises(ConfigError, match=r"lens\.name_or_path=.*3 layers"):
        load_lens(other, str(world.lens))


def test_folder_without_params_is_rejected(tmp_path, loaded):
    model, _, _ = loaded
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"lacks \['params.pt'\]"):
        load_lens(model, str(tmp_path))
