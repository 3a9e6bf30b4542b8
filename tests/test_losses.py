"""The method's math, pinned: layer convention, forget/retain losses, padding, schedules."""

import json
import math

import pytest
import torch
from tiny import tiny_neox
from transformers import AutoModelForCausalLM, AutoTokenizer
from tuned_lens.nn import TunedLens

from raylens.data import collate
from raylens.lens import load_lens
from raylens.losses import (
    batch_targets,
    example_targets,
    forget_token_loss,
    lens_logits,
    loss_weights,
    retain_kl_token_loss,
    retain_l2_token_loss,
)
from raylens.optim import lr_factor


def tiny_model(seed=0):
    return tiny_neox(vocab=11, hidden=8, layers=3, seed=seed, intermediate=16,
                     positions=64).eval()


@pytest.fixture(scope="module")
def toy(world):
    model = AutoModelForCausalLM.from_pretrained(world.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(world.model)
    control = AutoModelForCausalLM.from_pretrained(world.control).eval()
    return model, tokenizer, load_lens(model, str(world.lens)), control


def _kl(p_logits, q_logits):
    p = p_logits.log_softmax(-1)
    return (p.exp() * (p - q_logits.log_softmax(-1))).sum(-1).mean().item()


def test_translator_l_fits_the_stream_entering_block_l(toy, world):
    """For every stream hidden_states[s], translator s is the best-fitting translator. The seed's
    rewrite (hooking block outputs, hidden_states[l+1], under lens index l) breaks this."""
    model, tokenizer, lens, _ = toy
    texts = [json.loads(line)["text"] for line in world.retain.read_text().splitlines()[:20]]
    n = model.config.num_hidden_layers
    kl = torch.zeros(n, n)
    with torch.no_grad():
        for text in texts:
            out = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True)
            for stream in range(n):
                for translator in range(n):
                    kl[stream, translator] += _kl(out.logits[0], lens(out.hidden_states[stream],
                                                                      translator)[0])
            layer = 3
            assert torch.equal(lens_logits(lens, out.hidden_states[layer], layer),
                               lens(out.hidden_states[layer].float(), layer))
    assert kl.argmin(dim=1).tolist() == list(range(n)), kl / len(texts)


def test_forget_loss_equals_hand_computation():
    model = tiny_model()
    lens = TunedLens.from_model(model)
    gen = torch.Generator().manual_seed(1)
    for t in lens.layer_translators:  # non-trivial translators
        t.weight.data = torch.randn(t.weight.shape, generator=gen) * 0.3
        t.bias.data = torch.randn(t.bias.shape, generator=gen) * 0.3
    hidden = tuple(torch.randn(2, 4, 8, generator=gen) for _ in range(4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    layers = (1, 2)
    targets = batch_targets([example_targets(0, 0, i, 2, n, 11) for i, n in enumerate((3, 2))], 4)
    got = forget_token_loss(lens, hidden, layers, mask, targets).sum() / mask.sum()

    norm, unembed = model.gpt_neox.final_layer_norm, model.get_output_embeddings()
    expected_layers = []
    for k, layer in enumerate(layers):
        translator = lens.layer_translators[layer]
        total, count = 0.0, 0
        for b in range(2):
            for s in range(4):
                if not mask[b, s]:
                    continue
                h = hidden[layer][b, s].double()
                h = h + translator.weight.double() @ h + translator.bias.double()
                mu, var = h.mean(), h.var(unbiased=False)
                h = (h - mu) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()
                logits = unembed.weight.double() @ h
                total += -(logits.log_softmax(-1)[targets[k, b, s]]).item()
                count += 1
        expected_layers.append(total / count / math.log(11))
    assert got.item() == pytest.approx(sum(expected_layers) / 2, rel=1e-5)


def test_forget_loss_is_one_for_a_uniform_lens():
    model = tiny_model()
    lens = TunedLens.from_model(model)
    lens.unembed.unembedding.weight.data.zero_()  # every token equally likely
    hidden = tuple(torch.randn(3, 5, 8) for _ in range(4))
    mask = torch.ones(3, 5, dtype=torch.long)
    targets = batch_targets([example_targets(0, 0, i, 3, 5, 11) for i in range(3)], 5)
    loss = forget_token_loss(lens, hidden, (0, 1, 2), mask, targets).sum() / mask.sum()
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """``fn()``'s result and the bytes autograd keeps for its backward (after the forward)."""
    kept: dict[int, int] = {}

    def pack(t):
        kept[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


def test_chunked_forget_loss_has_the_same_loss_and_gradients_in_less_memory():
    """Chunking the lens logits (``loss.lens_chunk_tokens``) changes neither the loss nor any
    gradient, and the backward no longer keeps ``[batch, seq, vocab]`` logits: a vocabulary of
    4,096 over 2 x 24 tokens, 3 layers, chunks of 10 tokens (the last one short)."""
    model = tiny_neox(vocab=4096, hidden=16, layers=4, seed=3, positions=32).eval()
    lens = TunedLens.from_model(model)
    gen = torch.Generator().manual_seed(2)
    for t in lens.layer_translators:
        t.weight.data = torch.randn(t.weight.shape, generator=gen) * 0.3
    ids = torch.randint(4096, (2, 24), generator=gen)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0
    layers = (1, 2, 3)
    targets = batch_targets([example_targets(0, 0, i, 3, 24, 4096) for i in range(2)], 24)
    results = {}
    for chunk in (0, 10):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = tuple(h.detach().requires_grad_() for h in out.hidden_states)
        loss, saved = _saved_bytes(lambda: forget_token_loss(
            lens, hidden, layers, mask, targets, chunk).sum() / mask.sum())
        loss.backward()
        results[chunk] = loss.item(), [hidden[l].grad for l in layers], saved
    (whole, whole_grads, whole_saved), (chunked, chunked_grads, chunked_saved) = results.values()
    assert chunked == pytest.approx(whole, rel=1e-6)
    for a, b in zip(whole_grads, chunked_grads):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), (a - b).abs().max() / a.abs().max()
    logits_bytes = 2 * 24 * 4096 * 4
    assert whole_saved > 3 * logits_bytes  # each layer's fp32 logits (and their softmax)
    assert chunked_saved < logits_bytes / 4  # only the chunks' inputs


def test_targets_depend_on_the_example_not_its_batch():
    a = example_targets(3, 1, 17, 6, 40, 50_000)
    assert torch.equal(a, example_targets(3, 1, 17, 6, 40, 50_000))
    assert not torch.equal(a, example_targets(3, 2, 17, 6, 40, 50_000))
    assert not torch.equal(a, example_targets(3, 1, 18, 6, 40, 50_000))
    assert a.min() >= 0 and a.max() < 50_000


def _losses(model, ref, lens, tokenizer, texts, pad_id, extra_pad):
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    batch = collate(seqs, pad_id)
    ids = torch.cat([batch.input_ids, torch.full((len(seqs), extra_pad), pad_id)], 1)
    mask = torch.cat([batch.attention_mask, torch.zeros((len(seqs), extra_pad), dtype=torch.long)], 1)
    layers = (1, 3, 5)
    targets = batch_targets([example_targets(0, 0, i, 3, len(s), len(tokenizer)) for i, s in
                             enumerate(seqs)], ids.shape[1])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        r = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    n = mask.sum()
    return (
        (forget_token_loss(lens, out.hidden_states, layers, mask, targets).sum() / n).item(),
        (retain_l2_token_loss(out.hidden_states, r.hidden_states, layers, mask).sum() / n).item(),
        (retain_kl_token_loss(out.logits, r.logits, mask).sum() / n).item(),
    )


def test_losses_ignore_pad_ids_and_pad_length(toy, world):
    model, tokenizer, lens, control = toy
    texts = [json.loads(l)["text"] for l in world.forget.read_text().splitlines()[:6]]
    base = _losses(model, control, lens, tokenizer, texts, tokenizer.eos_token_id, 0)
    assert all(v > 0 for v in base)
    for pad_id, extra in ((tokenizer.eos_token_id, 23), (5, 0), (700, 9)):
        assert _losses(model, control, lens, tokenizer, texts, pad_id, extra) == pytest.approx(
            base, rel=1e-5)


def test_kl_retain_does_not_grow_with_length_or_batch(toy, world):
    model, tokenizer, lens, control = toy
    texts = [json.loads(l)["text"] for l in world.retain.read_text().splitlines()[:4]]
    one = _losses(model, control, lens, tokenizer, texts, tokenizer.eos_token_id, 0)[2]
    twice = _losses(model, control, lens, tokenizer, texts * 2, tokenizer.eos_token_id, 40)[2]
    assert one > 0 and twice == pytest.approx(one, rel=1e-5)


def test_retain_l2_is_zero_against_itself_and_positive_otherwise(toy, world):
    model, tokenizer, lens, control = toy
    texts = [json.loads(l)["text"] for l in world.retain.read_text().splitlines()[:3]]
    assert _losses(model, model, lens, tokenizer, texts, 0, 3)[1:] == (0.0, 0.0)
    assert _losses(model, control, lens, tokenizer, texts, 0, 3)[1] > 0.1


def test_schedule_weights_at_start_middle_end():
    kw = dict(retain_coef=4.0, remove_coef=2.0, retain_start=0.25)
    assert loss_weights(0, 100, **kw) == (1.0, 2.0)
    assert loss_weights(50, 100, **kw) == pytest.approx((2.5, 1.75))
    assert loss_weights(100, 100, **kw) == pytest.approx((4.0, 1.5))
    # a ramp over half the run saturates at the middle
    assert loss_weights(50, 100, ramp_fraction=0.5, **kw) == pytest.approx((4.0, 1.5))


def test_lr_warmup_then_linear_decay_to_zero():
    factors = [lr_factor(s, 10, 0.5) for s in range(11)]
    assert factors[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    assert factors[5] == 1.0 and factors[10] == 0.0
    assert all(a > b for a, b in zip(factors[5:], factors[6:]))
    assert lr_factor(0, 10, 0.0) == 1.0


def _padded_pair(max_length=12, seed=0):
    """A model and a perturbed copy on two right-padded sequences (lengths 5 and 9) padded to
    ``max_length``, as the seed padded every document to 2048."""
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    gen = torch.Generator().manual_seed(seed)
    batch = collate([torch.randint(11, (5,), generator=gen).tolist(),
                     torch.randint(11, (9,), generator=gen).tolist()], pad_id=0)
    ids = torch.zeros(2, max_length, dtype=torch.long)
    mask = torch.zeros(2, max_length, dtype=torch.long)
    ids[:, :batch.input_ids.shape[1]], mask[:, :batch.input_ids.shape[1]] = \
        batch.input_ids, batch.attention_mask
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ref = other(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out, ref, mask


def test_seed_lora_retain_l2_all_states_pads_counted_equals_the_seeds_formula():
    """loss.retain_layers=all + retain_reduction=padded_position is the seed's LoRA retain loss:
    the L2 distance of every hidden state (embeddings and final normed state included), pads
    zeroed, averaged over all padded positions with ``nanmean``."""
    from raylens.losses import retain_denominator

    out, ref, mask = _padded_pair(max_length=12)
    every = tuple(range(len(out.hidden_states)))
    assert len(every) == 4  # 3 blocks + embeddings
    ours = retain_l2_token_loss(out.hidden_states, ref.hidden_states, every, mask).sum() / \
        retain_denominator("padded_position", tokens=int(mask.sum()), sequences=2, max_length=12)
    lora_hs = torch.stack(out.hidden_states) * mask[None, :, :, None]
    ref_hs = torch.stack(ref.hidden_states) * mask[None, :, :, None]
    seed = torch.norm(lora_hs - ref_hs, dim=-1, p=2, dtype=torch.float).nanmean()
    assert float(ours) == pytest.approx(float(seed), rel=1e-6)
    # raylens's default differs by the share of real tokens and the layers compared
    per_token = retain_l2_token_loss(out.hidden_states, ref.hidden_states, every, mask).sum() / \
        retain_denominator("token", tokens=int(mask.sum()), sequences=2, max_length=12)
    assert float(per_token) == pytest.approx(float(seed) * 24 / 14, rel=1e-6)


def test_seed_kl_batchmean_equals_torch_kl_div_batchmean():
    """loss.retain_loss=kl + retain_reduction=sequence is ``F.kl_div(log p, p_ref,
    reduction="batchmean")``: summed over positions and vocabulary, divided by sequences."""
    from raylens.losses import retain_denominator

    out, ref, mask = _padded_pair()
    ours = retain_kl_token_loss(out.logits, ref.logits, mask).sum() / retain_denominator(
        "sequence", tokens=int(mask.sum()), sequences=2, max_length=12)
    real = mask.bool()
    seed = torch.nn.functional.kl_div(out.logits[real].log_softmax(-1)[None],
                                      ref.logits[real].softmax(-1)[None],
                                      reduction="sum") / 2
    assert float(ours) == pytest.approx(float(seed), rel=1e-5)
