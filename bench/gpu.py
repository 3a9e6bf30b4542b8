"""``make test-gpu``: the real setting's shapes on one GPU, through raylens's own path.

Two runs through ``fit_on_ray`` (a Ray Train worker with one GPU, an NCCL process group, the
collectives N workers use), bf16 compute, sequences of 2,048 tokens:

- LoRA (``lora_adamw``) on a random GPT-NeoX of the 6.9B shape (deep-ignorance-unfiltered);
- full fine-tuning (``sft_adamw``) under FSDP2 on a random GPT-NeoX of the 2.8B shape (fp32
  master weights, bf16 compute, bf16 reference).

For each it prints the step's tokens/s, MFU against 989 TFLOP/s (H100/H200 dense bf16), peak GPU
memory, the fast scorer against lm-eval on the exported model (same questions, on the GPU:
agreement of predictions, on all and on decisive questions, the largest log-likelihood gap,
seconds each; the in-trial scores of the live model beside them), and that the export
reloads in the source dtype. Exit status 1 if a check fails. The weights are random: the figures
are speed, memory and agreement, not unlearning. ``--smoke`` runs the same script with tiny
shapes on CPU (gloo), to check the script itself where no GPU is at hand.

MFU counts model FLOPs per step: 6N per token trained with weight gradients (full), 4N per token
for LoRA (forward and activation gradients only), plus 2N per retain token for the reference's
forward; N excludes the embeddings; gradient-checkpointing recomputation is not counted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import raylens  # noqa: F401  (offline Hugging Face environment first)

PEAK_FLOPS = 989e12
DECISIVE = 0.1
"""A question is decisive when lm-eval's best choice leads the next by more than this (nats):
on those the two scorers must agree; near-ties may flip under bf16 batch-composition noise (a
random model has many)."""
SHAPES = {  # GPT-NeoX 6.9B (deep-ignorance-unfiltered, Pythia-6.9B) and 2.8B (Pythia-2.8B)
    "6.9b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 intermediate_size=16384),
    "2.8b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                 intermediate_size=10240),
}
SMOKE_SHAPE = dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4,
                   intermediate_size=256)


def write_model(folder: Path, shape: dict, tokenizer, device: str) -> int:
    """A random GPT-NeoX of ``shape`` saved in bf16 with the toy tokenizer; its non-embedding
    parameter count."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048,
                           tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
                           eos_token_id=tokenizer.eos_token_id, dtype="bfloat16", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    embed = model.get_input_embeddings().weight.numel() + \
        model.get_output_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters()) - embed
    from tuned_lens.nn import TunedLens

    from raylens.lens import save_lens

    save_lens(TunedLens.from_model(model.float()).cpu(), folder / "lens",
              base_model_name_or_path=str(folder))
    del model
    return n


def write_documents(path: Path, texts: list[str], tokenizer, tokens: int, count: int) -> None:
    """``count`` documents of at least ``tokens`` tokens, toy documents joined."""
    docs, current, length, i = [], [], 0, 0
    while len(docs) < count:
        text = texts[i % len(texts)]
        i += 1
        current.append(text)
        length += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        if length >= tokens:
            docs.append(" ".join(current))
            current, length = [], 0
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def lm_eval_agreement(folder: Path, world, device: str, tasks=("toy_wmdp", "toy_mmlu")) -> dict:
    """The exported model scored by the fast scorer and by lm-eval on the same questions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylens.evaluate import (
        choice_logliks,
        hf_lm,
        lm_eval_0shot,
        load_questions,
        predictions,
        task_manager,
    )

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = {"export_dtype": str(next(model.parameters()).dtype)}
    questions = load_questions(tasks, tokenizer, toyworld=world.root)
    start = time.perf_counter()
    fast = {t: choice_logliks(model, qs, batch_size=32) for t, qs in questions.items()}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    out["fast_s"] = time.perf_counter() - start
    start = time.perf_counter()
    result = lm_eval_0shot(hf_lm(model, tokenizer, 32), tasks, task_manager(tasks, world.root),
                           log_samples=True)
    out["lm_eval_s"] = time.perf_counter() - start
    reference = {(t, s["doc_id"]): [r[0] for r in s["filtered_resps"]]
                 for t, samples in result["samples"].items() for s in samples}
    same = total = decisive = decisive_same = 0
    gap = 0.0
    for task, qs in questions.items():
        want = [reference[(q.subtask, q.doc_id)] for q in qs]
        for got, exp, a, b in zip(fast[task], want, predictions(fast[task]), predictions(want)):
            same, total = same + (a == b), total + 1
            top = sorted(exp, reverse=True)
            if top[0] - top[1] > DECISIVE:  # not a near-tie that bf16 noise may flip
                decisive, decisive_same = decisive + 1, decisive_same + (a == b)
            gap = max(gap, max(abs(x - y) for x, y in zip(got, exp)))
    out.update(agreement=same / total, questions=total, max_loglik_gap=gap,
               decisive=decisive, decisive_agreement=decisive_same / max(1, decisive))
    return out


def run(name: str, recipe_name: str, shape: dict, world, root: Path, *, smoke: bool) -> dict:
    """One real-shape run through ``fit_on_ray``; its report with step time and memory."""
    from transformers import AutoTokenizer

    from raylens.ray_train import fit_on_ray
    from raylens.recipes import recipe

    device = "cpu" if smoke else "cuda"
    tokenizer = AutoTokenizer.from_pretrained(world.model)
    folder = root / f"model-{name}"
    start = time.perf_counter()
    n = write_model(folder, shape, tokenizer, device)
    texts = [json.loads(line)["text"] for line in world.forget.read_text().splitlines()]
    length = 256 if smoke else 2048
    batch = 2 if smoke else 4
    for corpus in ("forget", "retain"):
        write_documents(root / f"{corpus}.jsonl", texts, tokenizer, length, 2 * batch)
    setup_s = time.perf_counter() - start
    config = recipe(recipe_name, {
        "model.name_or_path": str(folder), "model.dtype": "bfloat16",
        "model.gradient_checkpointing": True, "lens.name_or_path": str(folder / "lens"),
        "data.forget": str(root / "forget.jsonl"), "data.retain": str(root / "retain.jsonl"),
        "data.max_length": length, "data.num_examples": 2 * batch, "batch.epochs": 1,
        "batch.global_batch": batch, "batch.per_device_batch": batch,
        "loss.target_layers": (5, 10, 15, 20, 25, 30) if not smoke else (2, 4, 6, 8, 10),
        "mode.lora_target_modules": None, "scaling.use_gpu": not smoke,
        "scaling.num_workers": 1, "scaling.checkpoint_every": 0, "tracking.enabled": False,
        "eval.tasks": ("toy_wmdp", "toy_mmlu"), "eval.time_limit_s": 600.0})
    out = root / f"run-{name}"
    start = time.perf_counter()
    report = fit_on_ray(config, out=out, storage_path=root / "ray", toyworld=world.root,
                        name=f"gpu-{name}")
    fit_s = time.perf_counter() - start
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    step = history[-1]
    tokens = step["tokens_per_s"]  # forget + retain tokens per second of the last step
    per_token = (6 if config.mode.kind == "full" else 4) * n
    flops_per_s = tokens * per_token + tokens / 2 * 2 * n  # retain is half the tokens
    result = {
        "run": name, "recipe": recipe_name, "non_embedding_params": n, "setup_s": setup_s,
        "fit_s": fit_s, "steps": report["num_steps"], "tokens_per_s": tokens,
        "mfu": flops_per_s / PEAK_FLOPS, "peak_mb": report["memory_per_rank"][0]["peak_mb"],
        "resident_mb": report["memory_per_rank"][0]["resident_mb"],
        "in_trial": {t: s["acc"] for t, s in (report["eval"] or {}).items()},
        "eval_error": report["eval_error"],
    }
    result.update(lm_eval_agreement(out / "model", world, device))
    return result


def main(argv=None) -> int:
    """Run the LoRA and FSDP2 shapes and print their table (``--smoke``: tiny, CPU)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    import ray

    from raylens import toyworld as tw

    world = tw.load_or_build()
    ray.init(log_to_driver=False)
    results, ok = [], True
    with tempfile.TemporaryDirectory(prefix="raylens-gpu-") as tmp:
        for name, recipe_name in (("6.9b", "lora_adamw"), ("2.8b", "sft_adamw")):
            shape = SMOKE_SHAPE if args.smoke else SHAPES[name]
            r = run(name, recipe_name, shape, world, Path(tmp), smoke=args.smoke)
            results.append(r)
            print(json.dumps(r, indent=1), flush=True)
            checks = {"trained": r["steps"] == 2, "in-trial eval": r["eval_error"] is None,
                      "export in bf16": r["export_dtype"] == "torch.bfloat16",
                      "scorer agrees on decisive questions": r["decisive_agreement"] >= 0.99}
            for check, passed in checks.items():
                print(f"{name} {check}: {'ok' if passed else 'FAILED'}")
                ok &= passed
            shutil.rmtree(Path(tmp, f"model-{name}"), ignore_errors=True)  # disk: 14 GB
    ray.shutdown()
    print("| run | params (non-emb.) | tokens/s | MFU | peak GPU MB | fast s | lm-eval s | "
          "agreement (decisive) |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} {r['recipe']} | {r['non_embedding_params'] / 1e9:.2f}B | "
              f"{r['tokens_per_s']:.0f} | {r['mfu']:.3f} | {r['peak_mb']:.0f} | "
              f"{r['fast_s']:.1f} | {r['lm_eval_s']:.1f} | {r['agreement']:.3f} "
              f"({r['decisive_agreement']:.3f} of {r['decisive']}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
