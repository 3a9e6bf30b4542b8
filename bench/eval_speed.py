"""How long a trial's evaluation takes, against what a user would do instead, in one run.

Part 1, the scorer: the fast multiple-choice scorer against lm-eval on the same live model and
questions.

Part 2, end to end (``--end-to-end``): the whole in-trial evaluation (``evaluate_live`` on the
live model, loading and encoding the questions included, as a trial's first evaluation does)
against the seed's path: export the model, load it back from the folder, run lm-eval on it. Both
must give the same prediction on every question. Each side is timed ``--repeats`` times in turn;
the median ratio is printed with its spread (min-max). ``forward_s`` is the scoring alone (the
questions already encoded: the model's forward passes and nothing else a trial could skip), and
``bound`` the seed's path over it: the most any in-trial evaluation could gain on this machine.

Models: the toy world's main model, and a random-weight GPT-NeoX shaped like Pythia-70M (512
wide, 6 layers, 50,304-token unembedding) with the toy tokenizer. Questions: the toy tasks
(answer-text format) and the toy questions laid out as WMDP-Bio-Robust (letter format, the shipped
YAMLs over a local snapshot). Both sides include loading and tokenizing the tasks. Prints each
side's seconds, the ratio and the per-question agreement, per model and format.

Where the gain comes from: lm-eval already scores a question with one-token choices in one
forward (its logits cache), but computes the unembedding and log-softmax at every position; the
fast scorer runs the unembedding only where a choice token is scored and has no per-request
overhead. With a small body (toy) the overhead dominates; for the 70M shape on CPU the body's
compute does, which bounds the ratio near (body + unembedding) / body.
"""

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

import raylens  # noqa: F401
from raylens import toyworld as tw
from raylens.config import EvalConfig
from raylens.evaluate import (
    _QUESTIONS,
    choice_logliks,
    evaluate_live,
    hf_lm,
    lm_eval_0shot,
    load_questions,
    predictions,
    task_manager,
)


def seed_path(model, tokenizer, tasks, world, folder: Path) -> dict:
    """The seed's evaluation: export, load from the folder, lm-eval; predictions by question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    out = lm_eval_0shot(hf_lm(loaded, AutoTokenizer.from_pretrained(folder), 32), tasks,
                        task_manager(tasks, world.root, None), log_samples=True,
                        bootstrap_iters=0)
    return {(sub, s["doc_id"]): predictions([[r[0] for r in s["filtered_resps"]]])[0]
            for sub, samples in out["samples"].items() for s in samples}


def in_trial(model, tokenizer, tasks, world) -> dict:
    """``evaluate_live`` from cold (the questions loaded and encoded, as a trial's first
    evaluation does); predictions by question."""
    _QUESTIONS.clear()
    config = EvalConfig(tasks=tasks)
    scores = evaluate_live(model, tokenizer, config, world.root)
    questions = next(iter(_QUESTIONS.values()))
    return {(q.subtask, q.doc_id): p for task in tasks
            for q, p in zip(questions[task], scores[task]["predictions"])}


def end_to_end(models: dict, tokenizer, world, repeats: int) -> None:
    """Part 2: the in-trial evaluation against the seed's export-reload-lm-eval path."""
    tasks = ("toy_wmdp", "toy_mmlu")
    print("model      questions in-trial_s seed-path_s  ratio [min, max]  agreement  "
          "forward_s  bound")
    for name, model in models.items():
        times: dict[str, list[float]] = {"ours": [], "seed": [], "forward": []}
        for r in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                theirs = seed_path(model, tokenizer, tasks, world, Path(tmp) / "export")
                times["seed"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ours = in_trial(model, tokenizer, tasks, world)
            times["ours"].append(time.perf_counter() - start)
            questions = next(iter(_QUESTIONS.values()))  # encoded by in_trial
            start = time.perf_counter()
            for task in tasks:
                choice_logliks(model, questions[task], batch_size=EvalConfig().batch_size)
            times["forward"].append(time.perf_counter() - start)
        ratios = [s / o for s, o in zip(times["seed"], times["ours"])]
        bounds = [s / f for s, f in zip(times["seed"], times["forward"])]
        agree = sum(ours[k] == theirs.get(k) for k in ours)
        print(f"{name:10s} {len(ours):9d} {statistics.median(times['ours']):10.2f} "
              f"{statistics.median(times['seed']):11.2f} {statistics.median(ratios):5.1f}x "
              f"[{min(ratios):.1f}, {max(ratios):.1f}]  {agree}/{len(ours)}  "
              f"{statistics.median(times['forward']):9.2f}  {statistics.median(bounds):4.1f}x")


def main() -> None:
    """Time lm-eval and the fast scorer side by side and print their ratio (and, with
    ``--end-to-end``, the in-trial evaluation against the seed's path)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--end-to-end", action="store_true", help="part 2 only")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    world = tw.load_or_build()
    tokenizer = AutoTokenizer.from_pretrained(world.model)
    torch.manual_seed(0)
    random70m = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
        intermediate_size=2048, rotary_pct=0.25, max_position_embeddings=2048,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    toy = AutoModelForCausalLM.from_pretrained(world.model).eval()
    if args.end_to_end:
        torch.manual_seed(0)
        random160m = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, rotary_pct=0.25, max_position_embeddings=2048,
            tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id)).eval()
        end_to_end({"toy": toy, "random160m": random160m}, tokenizer, world, args.repeats)
        return
    with tempfile.TemporaryDirectory() as data_dir:
        tw.write_robust_snapshot(world, Path(data_dir))
        print("model      format       task              questions lm-eval_s  fast_s  ratio "
              "agreement")
        for (name, model), (fmt, tasks) in itertools.product(
                (("toy", toy), ("random70m", random70m)),
                (("answer-text", ("toy_wmdp", "toy_mmlu")), ("letters", ("wmdp_bio_robust",)))):
            manager = task_manager(tasks, world.root, data_dir)
            start = time.perf_counter()
            out = lm_eval_0shot(hf_lm(model, tokenizer, 32), tasks, manager, log_samples=True,
                                bootstrap_iters=0)
            lm_eval_s = time.perf_counter() - start
            start = time.perf_counter()
            questions = load_questions(tasks, tokenizer, toyworld=world.root, data_dir=data_dir)
            logliks = {t: choice_logliks(model, qs, batch_size=32) for t, qs in questions.items()}
            fast_s = time.perf_counter() - start
            reference = {(sub, s["doc_id"]): [r[0] for r in s["filtered_resps"]]
                         for sub, samples in out["samples"].items() for s in samples}
            total = agree = 0
            for task, qs in questions.items():
                ours = predictions(logliks[task])
                theirs = predictions([reference[(q.subtask, q.doc_id)] for q in qs])
                total += len(qs)
                agree += sum(a == b for a, b in zip(ours, theirs))
            print(f"{name:10s} {fmt:12s} {'+'.join(tasks):17s} {total:9d} {lm_eval_s:9.2f} "
                  f"{fast_s:7.2f} {lm_eval_s / fast_s:5.1f}x {agree}/{total}")


if __name__ == "__main__":
    main()
