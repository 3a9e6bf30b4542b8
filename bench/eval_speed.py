"""The fast multiple-choice scorer against lm-eval on the same model and questions, one run.

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

import itertools
import tempfile
import time
from pathlib import Path

import torch

import raylens  # noqa: F401
from raylens import toyworld as tw
from raylens.evaluate import (
    choice_logliks,
    hf_lm,
    lm_eval_0shot,
    load_questions,
    predictions,
    task_manager,
)


def main() -> None:
    """Time lm-eval and the fast scorer side by side and print their ratio."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
    )

    world = tw.load_or_build()
    tokenizer = AutoTokenizer.from_pretrained(world.model)
    torch.manual_seed(0)
    random70m = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
        intermediate_size=2048, rotary_pct=0.25, max_position_embeddings=2048,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    toy = AutoModelForCausalLM.from_pretrained(world.model).eval()
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
