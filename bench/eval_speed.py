"""How long a trial's evaluation takes, against what a user would do instead, in one run.

Part 1, the scorer: the fast multiple-choice scorer against lm-eval on the same live model and
questions.

Part 2, end to end (``--end-to-end``): the whole in-trial evaluation (``evaluate_live`` on the
live model in a process that has not scored before) against the seed's path: export the model,
load it back from the folder, run lm-eval on it. In-trial is timed two ways: in a sweep, where
the driver encoded the questions once (``driver``, its time printed) and each trial's workers
take them (deserialized as ``ray.get`` does); and cold, loading and encoding the tasks through
lm-eval, as a standalone run does. The seed's path is timed with lm-eval as it ships
(``stock``) and with raylens's once-per-template fix (``fixed``, stricter). Every prediction must
agree. Each side is timed ``--repeats`` times in turn; ratios are per round, printed as median
[min, max]. ``forward`` is the scoring alone (the model's forward passes, nothing a trial could
skip); the seed's path over it is the most any in-trial evaluation could gain here.

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
import pickle
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
    question_set,
    remember_questions,
    task_manager,
)


def seed_path(model, tokenizer, tasks, world, folder: Path, *, stock: bool) -> dict:
    """The seed's evaluation: export, load from the folder, lm-eval; predictions by question.
    ``stock``: lm-eval as it ships, compiling its prompt template for every document (the
    seed's path); else with raylens's once-per-template fix (a stricter comparison)."""
    from lm_eval import utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    manager = task_manager(tasks, world.root, None)  # installs the fix
    fixed = utils.apply_template
    utils.apply_template = fixed.stock if stock else fixed
    try:
        out = lm_eval_0shot(hf_lm(loaded, AutoTokenizer.from_pretrained(folder), 32), tasks,
                            manager, log_samples=True, bootstrap_iters=0)
    finally:
        utils.apply_template = fixed
    return {(sub, s["doc_id"]): predictions([[r[0] for r in s["filtered_resps"]]])[0]
            for sub, samples in out["samples"].items() for s in samples}


def in_trial(model, tokenizer, tasks, world, handed: bytes | None = None) -> dict:
    """``evaluate_live`` in a fresh process: from cold (loading and encoding the questions, as
    a standalone run's first evaluation does), or, given ``handed`` (the driver's encoded
    questions, serialized), taking them as a sweep's trial does; predictions by question."""
    _QUESTIONS.clear()
    if handed is not None:
        remember_questions(pickle.loads(handed))  # what ray.get does with the driver's copy
    scores = evaluate_live(model, tokenizer, EvalConfig(tasks=tasks), world.root)
    assert len(_QUESTIONS) == 1, "the handed questions were not the ones scored"
    questions = next(iter(_QUESTIONS.values()))
    return {(q.subtask, q.doc_id): p for task in tasks
            for q, p in zip(questions[task], scores[task]["predictions"])}


def driver_questions(model, tokenizer, tasks, world) -> bytes:
    """What a sweep's driver hands its trials (``evaluate.question_set``), serialized."""
    return pickle.dumps(question_set(EvalConfig(tasks=tasks), tokenizer, world.root,
                                     model.config))


SIDES = ("sweep", "cold", "stock", "fixed", "forward")
"""What ``end_to_end`` times: the in-trial evaluation in a sweep (questions from the driver)
and cold; the seed's path with stock lm-eval and with the template fix; the forward alone."""


def end_to_end(models: dict, tokenizer, world, repeats: int) -> None:
    """Part 2: the in-trial evaluation against the seed's export-reload-lm-eval path, each side
    timed in turn in every round; ratios per round, then median [min, max]."""
    tasks = ("toy_wmdp", "toy_mmlu")
    print("model      questions | driver s | in-trial s: sweep  cold | seed's path s: stock  "
          "fixed | stock/sweep      fixed/sweep      stock/cold     | agreement | forward s  "
          "stock/forward")
    for name, model in models.items():
        _QUESTIONS.clear()
        start = time.perf_counter()
        handed = driver_questions(model, tokenizer, tasks, world)  # once per sweep
        driver_s = time.perf_counter() - start
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        agree = total = 0
        for _ in range(repeats):
            theirs = []
            for side in ("stock", "fixed"):
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    theirs.append(seed_path(model, tokenizer, tasks, world,
                                            Path(tmp) / "export", stock=side == "stock"))
                    times[side].append(time.perf_counter() - start)
            for side, given in (("cold", None), ("sweep", handed)):
                start = time.perf_counter()
                ours = in_trial(model, tokenizer, tasks, world, given)
                times[side].append(time.perf_counter() - start)
                for reference in theirs:
                    agree += sum(ours[k] == reference.get(k) for k in ours)
                    total += len(ours)
            questions = next(iter(_QUESTIONS.values()))
            start = time.perf_counter()
            for task in tasks:
                choice_logliks(model, questions[task], batch_size=EvalConfig().batch_size)
            times["forward"].append(time.perf_counter() - start)

        def ratio(a: str, b: str) -> str:
            values = [x / y for x, y in zip(times[a], times[b])]
            return f"{statistics.median(values):4.1f}x [{min(values):4.1f}, {max(values):4.1f}]"

        med = {side: statistics.median(t) for side, t in times.items()}
        print(f"{name:10s} {len(ours):9d} | {driver_s:8.2f} | {med['sweep']:16.2f} "
              f"{med['cold']:5.2f} | {med['stock']:19.2f} {med['fixed']:6.2f} | "
              f"{ratio('stock', 'sweep')}  {ratio('fixed', 'sweep')}  {ratio('stock', 'cold')} "
              f"| {agree}/{total} | {med['forward']:9.2f}  {ratio('stock', 'forward')}")


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
