"""The fast multiple-choice scorer against lm-eval, question by question, in both prompt formats;
the shipped wmdp_bio_robust YAMLs render the seed's prompts from a local snapshot offline."""

import json

import pytest
import torch

from raylens import toyworld as tw
from raylens.evaluate import (
    EvalError,
    Question,
    _block_mask,
    _leaf_tasks,
    _pack,
    accuracy,
    choice_logliks,
    hf_lm,
    lm_eval_0shot,
    load_questions,
    predictions,
    shard,
    subset_indices,
    task_manager,
)

CATEGORIES = tw.WMDP_BIO_ROBUST_CATEGORIES
# The seed's definition (method notes): description, then question and lettered choices.
SEED_PROMPT = ("The following are multiple choice questions (with answers) about biology.\n\n"
               "{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:")


@pytest.fixture(scope="module")
def robust_snapshot(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    return root, tw.write_robust_snapshot(world, root)


@pytest.fixture(scope="module")
def phrase_task(world, tmp_path_factory):
    """An answer-text task whose choices are 1-3 word phrases (several tokens, unequal lengths),
    as a plain lm-eval YAML over a JSONL file."""
    folder = tmp_path_factory.mktemp("phrases")
    rows = tw.read_jsonl(world.eval_set("toy_mmlu"))[:96]
    with open(folder / "phrases.jsonl", "w") as f:
        for i, r in enumerate(rows):
            c = r["choices"]
            choices = [" ".join(c[j:j + 1 + (i + j) % 3]) for j in range(4)]
            f.write(json.dumps({"question": r["question"], "choices": choices,
                                "answer": r["answer"]}) + "\n")
    _write_jsonl_task(folder, "toy_phrases", folder / "phrases.jsonl")
    return folder


def _write_jsonl_task(folder, name, data):
    """A plain lm-eval answer-text YAML ``folder/<name>.yaml`` over the JSONL file ``data``
    (question, choices, answer)."""
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


@pytest.fixture(scope="module")
def models(world):
    """The toy world's main model and a random-weight GPT-NeoX with Pythia's 50,304-token
    unembedding (the point: a real vocabulary's log-softmax and packed scoring) on a narrow body
    (64 wide, 2 layers, 4 heads: the body adds nothing to the per-question check), both with the
    toy tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(world.model)
    toy = AutoModelForCausalLM.from_pretrained(world.model).eval()
    torch.manual_seed(0)
    shape = GPTNeoXConfig(vocab_size=50304, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=256, rotary_pct=0.25,
                          max_position_embeddings=2048, bos_token_id=tokenizer.eos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    big_vocab = GPTNeoXForCausalLM(shape).eval()
    return {"toy": toy, "big_vocab": big_vocab}, tokenizer


def _lm_eval_logliks(model, tokenizer, tasks, manager) -> dict:
    """``{(subtask, doc_id): [loglik per choice]}`` from lm-eval's logged samples."""
    out = lm_eval_0shot(hf_lm(model, tokenizer, 32), tasks, manager, log_samples=True)
    return {(subtask, s["doc_id"]): [r[0] for r in s["filtered_resps"]]
            for subtask, samples in out["samples"].items() for s in samples}


@pytest.mark.parametrize("name", ["toy", "big_vocab"])
def test_fast_scorer_matches_lm_eval_on_every_question(name, models, world, robust_snapshot,
                                                       phrase_task):
    all_models, tokenizer = models
    model = all_models[name]
    data_dir = robust_snapshot[0]
    tasks = ("toy_wmdp", "toy_mmlu", "wmdp_bio_robust", "toy_phrases")
    manager = task_manager(tasks, world.root, str(data_dir), include=(str(phrase_task),))
    reference = _lm_eval_logliks(model, tokenizer, tasks, manager)
    questions = load_questions(tasks, tokenizer, toyworld=world.root, data_dir=str(data_dir),
                               include=(str(phrase_task),))
    assert {t: len(q) for t, q in questions.items()} == {
        "toy_wmdp": 192, "toy_mmlu": 192, "wmdp_bio_robust": 192, "toy_phrases": 96}
    multi = sum(any(len(c) > 1 for c in q.choices) for q in questions["toy_phrases"])
    assert multi > 60  # the packed path is exercised
    for task, qs in questions.items():
        logliks = choice_logliks(model, qs, batch_size=16)
        expected = [reference[(q.subtask, q.doc_id)] for q in qs]
        assert predictions(logliks) == predictions(expected), task
        for got, want in zip(logliks, expected):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-4), task


def test_wmdp_bio_robust_yamls_render_the_seeds_prompts_offline(robust_snapshot):
    from lm_eval.tasks import get_task_dict

    data_dir, parts = robust_snapshot
    leaves = _leaf_tasks(get_task_dict(["wmdp_bio_robust"],
                                       task_manager(("wmdp_bio_robust",), None, str(data_dir))))
    assert sorted(leaves) == sorted(f"wmdp_bio_robust_{c}" for c in CATEGORIES)
    rendered = 0
    for category in CATEGORIES:
        task = leaves[f"wmdp_bio_robust_{category}"]
        task.build_all_requests(rank=0, world_size=1)
        assert len(task.instances) == 4 * len(parts[category])
        for inst in task.instances:
            row = parts[category][inst.doc_id]
            a, b, c, d = row["choices"]
            expected = SEED_PROMPT.format(question=row["question"].strip(), a=a, b=b, c=c, d=d)
            assert inst.arguments == (expected, " " + "ABCD"[inst.idx])
            rendered += 1
    assert rendered == 4 * 192


def test_missing_snapshot_is_an_error_naming_the_task(tmp_path, models):
    _, tokenizer = models
    with pytest.raises(EvalError, match="wmdp_bio_robust"):
        load_questions(("wmdp_bio_robust",), tokenizer, data_dir=str(tmp_path))


def test_subset_is_seeded_stratified_and_shards_cover_every_question(models, world):
    _, tokenizer = models
    strata = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    first = subset_indices(100, 0.2, seed=3, strata=strata)
    assert first == subset_indices(100, 0.2, seed=3, strata=strata)
    assert first != subset_indices(100, 0.2, seed=4, strata=strata)
    assert [sum(strata[i] == s for i in first) for s in "abc"] == [12, 6, 2]
    qs = load_questions(("toy_wmdp",), tokenizer, toyworld=world.root, subset=0.25)["toy_wmdp"]
    assert len(qs) == 48
    indices = [shard(qs, rank, 3) for rank in range(3)]
    assert len({len(i) for i in indices}) == 1
    assert set().union(*map(set, indices)) == set(range(48))


def test_time_limit_is_an_error_naming_the_task(models, world):
    from raylens.evaluate import Deadline

    all_models, tokenizer = models
    qs = load_questions(("toy_wmdp",), tokenizer, toyworld=world.root)["toy_wmdp"]
    with pytest.raises(EvalError, match=r"toy_wmdp.*time limit of 1e-09 s"):
        choice_logliks(all_models["toy"], qs, deadline=Deadline(["toy_wmdp"], 1e-9))
    logliks = choice_logliks(all_models["toy"], qs)
    assert accuracy(qs, logliks)["acc"] == world.baseline["main"]["toy_wmdp"]


def test_in_loop_lm_eval_keeps_rng_and_scores_in_eval_mode(models, world):
    """lm-eval would reseed Python/numpy/torch RNGs (changing the training run) and HFLM sets eval
    mode only once: run_lm_eval leaves every RNG untouched and a model put back in train mode
    (dropout on) is still scored deterministically."""
    import random

    import numpy as np

    from raylens.evaluate import run_lm_eval

    all_models, tokenizer = models
    model = all_models["toy"]
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    for m in dropouts:
        m.p = 0.5
    lm = hf_lm(model, tokenizer)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    model.train()  # as a training loop leaves it between evaluations
    first = run_lm_eval(lm, ("toy_wmdp",), toyworld=world.root, limit=32)
    again = hf_lm(model, tokenizer)  # sets eval mode once, at construction
    model.train()
    second = run_lm_eval(again, ("toy_wmdp",), toyworld=world.root, limit=32)
    assert model.training  # run_lm_eval restores the mode it found
    for m in dropouts:
        m.p = 0.0
    model.eval()
    assert first == second
    assert random.getstate() == states[0]
    assert (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


def test_a_gold_label_that_names_no_choice_is_an_eval_error(world, tmp_path):
    """A string gold that is not a choice's text (a digit stored as a string): lm-eval would
    score the question 0 with a warning; the scorer refuses with an ``EvalError`` naming task
    and document (which a trial records), not a bare ``ValueError`` that kills the worker."""
    gold, message = '"2"', "gold label '2' is not one of its choices"
    from transformers import AutoTokenizer

    from raylens.evaluate import EvalError

    (tmp_path / "q.jsonl").write_text(
        f'{{"question": "x", "choices": ["a", "b", "c", "d"], "answer": {gold}}}\n')
    _write_jsonl_task(tmp_path, "toy_badgold", tmp_path / "q.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(world.model)
    with pytest.raises(EvalError, match=f"task 'toy_badgold' doc 0: {message}"):
        load_questions(("toy_badgold",), tokenizer, include=(str(tmp_path),))


def test_scorer_encodes_like_lm_eval_for_a_tokenizer_that_prepends_bos(world):
    """lm-eval's HFLM (``add_bos_token`` unset) keeps the tokenizer's own special tokens; a
    tokenizer that prepends BOS (Llama, OLMo) must get it in the scorer's contexts too."""
    from lm_eval.models.huggingface import HFLM
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world.model)
    bos = tokenizer.eos_token
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.eos_token_id)])
    assert tokenizer("x y")["input_ids"][0] == tokenizer.eos_token_id
    lm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(world.model), tokenizer=tokenizer)
    questions = load_questions(("toy_wmdp",), tokenizer, toyworld=world.root)["toy_wmdp"][:20]
    from lm_eval.tasks import get_task_dict

    task = get_task_dict(["toy_wmdp"], task_manager(("toy_wmdp",), world.root))["toy_wmdp"]
    docs = list(task.eval_docs)
    for q in questions:
        doc = docs[q.doc_id]
        context = task.doc_to_text(doc)
        for choice, cont in zip(q.choices, task.doc_to_choice(doc)):
            ctx_enc, cont_enc = lm._encode_pair(context, " " + cont)
            assert (tuple(ctx_enc), tuple(cont_enc)) == (q.context, choice)
        assert q.context[0] == tokenizer.eos_token_id


def test_a_packed_question_attends_to_its_context_and_its_own_choice_only():
    """Context of 3 tokens, choices of 2 and 3 tokens (1 and 2 packed), 2 padding positions:
    the mask built for the batch is the block-causal one written out by hand."""
    question = Question("t", "t", 0, (5, 6, 7), ((8, 9), (10, 11, 12)), 0)
    tokens, positions, segments, score_at = _pack(question)
    assert (tokens, positions, segments) == ([5, 6, 7, 8, 10, 11], [0, 1, 2, 3, 3, 4],
                                             [0, 0, 0, 1, 2, 2])
    assert score_at == [[2, 3], [2, 4, 5]]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0, 0],   # choice 0: context + itself
                             [1, 1, 1, 0, 1, 0, 0, 0],   # choice 1 does not see choice 0
                             [1, 1, 1, 0, 1, 1, 0, 0],
                             [0, 0, 0, 0, 0, 0, 1, 0],   # padding sees itself only
                             [0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    mask = _block_mask(torch.tensor([segments + [-1, -1], [0] * 8]))
    assert mask.shape == (2, 1, 8, 8)
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask[1, 0], torch.ones(8, 8, dtype=torch.bool).tril())


def test_lm_eval_compiles_each_prompt_template_once_and_renders_the_same_text(world):
    """lm-eval compiles a task's Jinja template for every document; raylens's task manager makes
    it compile each once. Loading the toy tasks' 384 questions then compiles a handful of
    templates, and a template renders what a fresh compile renders."""
    from jinja2 import Environment, StrictUndefined
    from lm_eval import utils
    from transformers import AutoTokenizer

    from raylens.evaluate import task_manager

    task_manager(("toy_wmdp",), world.root)
    tokenizer = AutoTokenizer.from_pretrained(world.model)
    before = utils.apply_template.cache_info()
    questions = load_questions(("toy_wmdp", "toy_mmlu"), tokenizer, toyworld=world.root)
    after = utils.apply_template.cache_info()
    rendered = sum(len(qs) for qs in questions.values())
    assert rendered == 384
    assert after.misses - before.misses <= 10  # templates compiled
    assert after.hits - before.hits >= 2 * rendered  # renders that reused a compiled one
    template, doc = "Q: {{question}}\n{{ choices | join(', ') }}", {"question": "x?",
                                                                   "choices": ["a", "b"]}
    fresh = Environment(undefined=StrictUndefined, keep_trailing_newline=True)
    assert utils.apply_template(template, doc) == fresh.from_string(template).render(**doc)


def test_a_process_encodes_its_questions_once_even_after_a_truncating_training_batch(world):
    """The encoded questions are found again by the same tokenizer after it tokenized a
    training batch with truncation (which a fast tokenizer keeps in its serialization): a run
    used to encode them in ``validate`` and again at its first evaluation, and a sweep's
    workers never found the set their driver handed them."""
    from transformers import AutoTokenizer

    from raylens.config import EvalConfig
    from raylens.evaluate import _QUESTIONS, eval_questions, question_key, remember_questions
    from raylens.model import load_model_config
    from raylens.recipes import recipe

    model_config = load_model_config(recipe("lora_adamw").model, world.root)
    ev = EvalConfig(tasks=("toy_wmdp",), subset=0.25, subset_seed=11)
    tokenizer = AutoTokenizer.from_pretrained(world.model)
    before = question_key(ev, tokenizer, world.root, model_config)
    first = eval_questions(ev, tokenizer, world.root, model_config)
    tokenizer(["a training document"] * 2, truncation=True, max_length=16)
    assert question_key(ev, tokenizer, world.root, model_config) == before
    assert eval_questions(ev, tokenizer, world.root, model_config) is first
    # a set another process encoded is taken as it is, under its key
    handed = {"toy_wmdp": first["toy_wmdp"][:5]}
    _QUESTIONS.pop(before)
    remember_questions({before: handed})
    assert eval_questions(ev, AutoTokenizer.from_pretrained(world.model), world.root,
                          model_config) is handed
    other = EvalConfig(tasks=("toy_wmdp",), subset=0.25, subset_seed=12)  # another key: loads
    assert len(eval_questions(other, tokenizer, world.root, model_config)["toy_wmdp"]) == 48
    _QUESTIONS.pop(before)
