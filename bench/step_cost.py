"""One unlearning step against its unavoidable parts and against a plain fine-tuning step,
measured side by side on the same batch; and the memory the forget loss keeps for its backward
with and without chunked lens logits.

The parts of a step, each timed alone on the step's own batch:
- ``reference``: the frozen reference's forward on the retain batch (no grad);
- ``forget body``: the model's forward on the forget batch to its hidden states and the
  backward from the target layers (a loss that costs nothing by itself);
- ``lens heads``: the forget loss on those hidden states (the lens at each target layer, its
  cross-entropy against the random targets) and its backward to them;
- ``retain pass``: the forward on the retain batch, the L2 retain loss against the reference's
  hidden states, and the backward;
- ``optimizer``: clipping, the optimizers' step, the schedules, clearing the gradients.

raylens's overhead is the step's time over the sum of the parts, less 1. The plain step is what a
user would run instead of unlearning: causal-LM fine-tuning (full logits, next-token loss) on the
same forget and retain tokens, with the same optimizer. Every figure is the median of
``--repeats`` rounds (4x as many on the toy world, whose steps take milliseconds), each round
timing every variant once in turn (so drifts of this noisy
machine hit all alike), with the spread (min-max) of the per-round ratio.

Models: the toy world's (LoRA and full) and a random GPT-NeoX at Pythia-160M's shape with the
real 50,304-token vocabulary (fp32 on the CPU). Memory: the bytes autograd keeps for the
backward of the forget loss (deterministic: a saved-tensors hook adds them up) on one
2,048-token sequence of the 160M model at 5 target layers, whole and in 1,024-token chunks, with
the loss and gradients compared.

    python bench/step_cost.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from fsdp_memory import write_model  # bench/: the random 160M GPT-NeoX with a lens

import raylens  # noqa: F401
from raylens import toyworld as tw
from raylens.losses import causal_lm_token_loss, forget_token_loss, retain_l2_token_loss
from raylens.recipes import recipe
from raylens.train import forget_targets, micro_batches, optimizer_step, setup, train_step


def variants(run) -> dict:
    """The step, its parts and the plain fine-tuning step, as callables on step 0's batch."""
    _, batches, indices = micro_batches(run, 0)
    assert len(batches) == 1, "one micro-batch per step: the parts are timed on it"
    (forget, retain), examples = batches[0], indices[0]
    targets = forget_targets(run, 0, examples, forget.input_ids.shape[1])
    layers, params = run.layers, run.params

    def body(batch):
        return run.forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           output_hidden_states=True, logits_to_keep=1)

    with torch.no_grad():
        hidden = [h.detach() for h in body(forget).hidden_states]
    ref = run.reference(retain.input_ids, retain.attention_mask, logits=False)

    def forget_body():
        out = body(forget)
        sum(out.hidden_states[layer].float().sum() * 0 for layer in layers).backward()

    def lens_heads():
        leaves = tuple(h.requires_grad_() if i in layers else h for i, h in enumerate(hidden))
        forget_token_loss(run.lens, leaves, layers, forget.attention_mask, targets,
                          run.config.loss.lens_chunk_tokens).sum().backward()
        for h in leaves:
            h.grad = None

    def retain_pass():
        out = body(retain)
        retain_l2_token_loss(out.hidden_states, ref.hidden_states, run.retain_layers,
                             retain.attention_mask).sum().backward()

    grads = [torch.zeros_like(p) for p in params]  # made once: allocating them is no part

    def optimizer():
        for p, g in zip(params, grads):  # the gradients a step leaves
            p.grad = g
        optimizer_step(run)

    def plain():
        for batch in (forget, retain):
            logits = run.forward(input_ids=batch.input_ids,
                                 attention_mask=batch.attention_mask).logits
            loss = causal_lm_token_loss(logits, batch.input_ids, batch.attention_mask)
            (loss.sum() / batch.attention_mask[:, 1:].sum()).backward()
        optimizer_step(run)

    return {"step": lambda: train_step(run, 0), "reference": lambda: run.reference(
        retain.input_ids, retain.attention_mask, logits=False), "forget body": forget_body,
        "lens heads": lens_heads, "retain pass": retain_pass, "optimizer": optimizer,
        "plain": plain}


def rounds(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each variant per round, every variant once per round, after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    return times


def summary(times: dict[str, list[float]]) -> dict:
    """Medians, the overhead over the parts and the ratio to the plain step, with spreads."""
    parts = [k for k in times if k not in ("step", "plain")]
    n = len(times["step"])
    over = [times["step"][i] / sum(times[k][i] for k in parts) - 1 for i in range(n)]
    plain = [times["step"][i] / times["plain"][i] for i in range(n)]
    return {"median_s": {k: statistics.median(v) for k, v in times.items()},
            "overhead": (statistics.median(over), min(over), max(over)),
            "vs_plain": (statistics.median(plain), min(plain), max(plain))}


def step_costs(name: str, config, toyworld, repeats: int) -> dict:
    """Set up ``config``'s run, time its variants and print one line."""
    torch.manual_seed(0)
    run = setup(config, toyworld)
    run.model.train()
    out = summary(rounds(variants(run), repeats))
    med = out["median_s"]
    parts = {k: v for k, v in med.items() if k not in ("step", "plain")}
    share = " ".join(f"{k} {v / sum(parts.values()):.0%}" for k, v in parts.items())
    o, p = out["overhead"], out["vs_plain"]
    print(f"{name:26s} step {med['step'] * 1e3:8.1f} ms  parts {sum(parts.values()) * 1e3:8.1f} "
          f"ms ({share})  overhead {o[0]:+.1%} [{o[1]:+.1%}, {o[2]:+.1%}]  "
          f"step/plain {p[0]:.2f} [{p[1]:.2f}, {p[2]:.2f}]")
    return out


def forget_loss_memory(folder: Path) -> dict:
    """Bytes kept for the backward of the forget loss on one 2,048-token sequence of the 160M
    model, whole and chunked; the loss and gradients of both."""
    from transformers import AutoModelForCausalLM

    from raylens.lens import load_lens

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lens = load_lens(model, str(folder / "lens"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(50304, (1, 2048), generator=gen)
    mask = torch.ones_like(ids)
    layers = (2, 4, 6, 8, 10)
    targets = torch.randint(50304, (len(layers), 1, 2048), generator=gen)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states
    out = {}
    for chunk in (0, 1024):
        kept: dict[int, int] = {}

        def pack(t, kept=kept):
            kept[id(t)] = t.numel() * t.element_size()
            return t

        leaves = tuple(h.detach().requires_grad_() for h in hidden)
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forget_token_loss(lens, leaves, layers, mask, targets, chunk).sum() / 2048
        loss.backward()
        out[chunk] = {"kept_mb": sum(kept.values()) / 2**20, "loss": loss.item(),
                      "seconds": time.perf_counter() - start,
                      "grads": [leaves[layer].grad for layer in layers]}
    whole, chunked = out[0], out[1024]
    grad_diff = max(((a - b).abs().max() / a.abs().max()).item()
                    for a, b in zip(whole["grads"], chunked["grads"]))
    print(f"forget loss, 1 x 2048 tokens, vocabulary 50,304, 5 layers: kept for the backward "
          f"{whole['kept_mb']:.0f} MiB whole, {chunked['kept_mb']:.0f} MiB in 1,024-token chunks "
          f"({whole['kept_mb'] / chunked['kept_mb']:.0f}x less); loss {whole['loss']:.7f} vs "
          f"{chunked['loss']:.7f}; largest gradient difference {grad_diff:.1e} of the largest "
          f"gradient; forward+backward {whole['seconds']:.1f} s vs {chunked['seconds']:.1f} s")
    return {"whole_mb": whole["kept_mb"], "chunked_mb": chunked["kept_mb"],
            "loss": (whole["loss"], chunked["loss"]), "grad_rel_diff": grad_diff,
            "seconds": (whole["seconds"], chunked["seconds"])}


def main() -> None:
    """The toy world's and the 160M model's step costs, then the forget loss's memory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    world = tw.load_or_build()
    one_batch = {"batch.global_batch": 8, "batch.per_device_batch": 8, "data.num_examples": 64,
                 "scaling.checkpoint_every": 0}
    figures = {}
    print(f"medians of {4 * args.repeats} rounds (toy) and {args.repeats} (160M); [min, max] of "
          "the per-round ratio")
    for name in ("lora_adamw", "sft_adamw"):
        figures[f"toy {name}"] = step_costs(f"toy {name}", recipe(name, one_batch), world.root,
                                            4 * args.repeats)  # a toy step is ms: more rounds
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        params = write_model(folder, world)
        big = {**one_batch, "model.name_or_path": str(folder),
               "lens.name_or_path": str(folder / "lens"), "loss.target_layers": (2, 4, 6, 8, 10),
               "batch.global_batch": 2, "batch.per_device_batch": 2, "data.max_length": 256}
        for name in ("lora_adamw", "sft_adamw"):
            label = f"{params / 1e6:.0f}M {name}"
            figures[label] = step_costs(label, recipe(name, big), world.root, args.repeats)
        figures["forget_loss_memory"] = forget_loss_memory(folder)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
