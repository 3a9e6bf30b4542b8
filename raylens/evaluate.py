"""Evaluation through lm-eval: results as plain dicts, a missing metric is an error.

Toy tasks (``toy_wmdp``, ``toy_mmlu``) are loaded from the YAMLs in ``raylens/tasks`` without
indexing lm-eval's ~14k built-in tasks; built-in tasks (``wmdp_bio``, ``mmlu``, ``mmlu_stem``) need
their datasets in the local Hugging Face cache. Everything is 0-shot.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from raylens.collectives import all_gather, any_rank, rank_and_world
from raylens.config import ConfigError, EvalConfig, UnlearnConfig

TASKS_DIR = Path(__file__).parent / "tasks"
TOY_TASKS = ("toy_wmdp", "toy_mmlu")
SHIPPED_TASKS = TOY_TASKS + ("wmdp_bio_robust",)


class EvalError(RuntimeError):
    """An evaluation produced no usable metric or ran out of time; the message names the task."""


def task_manager(tasks: tuple[str, ...], toyworld: Path | None = None,
                 data_dir: str | None = None, include: tuple[str, ...] = ()):
    """An lm-eval TaskManager that knows raylens's shipped tasks and any task folders in
    ``include`` (and indexes the built-ins only if another task is asked for). ``toyworld`` and
    ``data_dir`` reach the task loaders as metadata."""
    from lm_eval.tasks import TaskManager

    _compile_templates_once()
    builtins = not include and any(t not in SHIPPED_TASKS for t in tasks)
    metadata = {k: str(v) for k, v in (("toyworld", toyworld), ("data_dir", data_dir)) if v}
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, include)],
                       include_defaults=builtins, metadata=metadata or None)


def _compile_templates_once() -> None:
    """Make lm-eval compile each Jinja prompt template once per process. Its ``apply_template``
    compiles the template afresh for every document and field (three per question): that was
    0.5 s of a cold 0.8 s toy evaluation under the profiler, and grows with the questions
    (about 20 s for MMLU and WMDP-Bio at the same cost per question). Same environment, same
    template, same text."""
    import functools

    from lm_eval import utils

    if getattr(utils.apply_template, "raylens_cached", False):
        return
    compiled = functools.lru_cache(maxsize=1024)(utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    apply_template.raylens_cached = True  # type: ignore[attr-defined]
    apply_template.cache_info = compiled.cache_info  # type: ignore[attr-defined]
    apply_template.stock = utils.apply_template  # type: ignore[attr-defined]  # for comparisons
    utils.apply_template = apply_template


class Deadline:
    """Raises ``EvalError`` naming the tasks once ``limit_s`` has passed; checked per batch."""

    def __init__(self, tasks, limit_s: float | None):
        self.tasks, self.limit_s = list(tasks), limit_s
        self.start = time.monotonic()

    def expired(self) -> bool:
        """Whether the time limit has passed."""
        return self.limit_s is not None and time.monotonic() - self.start > self.limit_s

    def error(self, done: str = "") -> EvalError:
        """The error naming the tasks, the limit and how far scoring got."""
        return EvalError(f"evaluation of tasks {self.tasks} exceeded its time limit of "
                         f"{self.limit_s:g} s (eval.time_limit_s){done}")

    def check(self, done: str = "") -> None:
        """Raise ``error(done)`` once the time limit has passed."""
        if self.expired():
            raise self.error(done)


def lm_eval_0shot(lm, tasks: tuple[str, ...], manager, *, limit: int | None = None,
                  log_samples: bool = False, bootstrap_iters: int = 1000) -> dict:
    """lm-eval's ``simple_evaluate`` as raylens calls it everywhere: 0-shot, and without lm-eval
    reseeding the global RNGs (a trial's RNG stream is raylens's); its raw output, with the
    per-question ``samples`` when ``log_samples``."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit,
                           task_manager=manager, random_seed=None, numpy_random_seed=None,
                           torch_random_seed=None, fewshot_random_seed=None,
                           log_samples=log_samples, bootstrap_iters=bootstrap_iters)


def run_lm_eval(lm, tasks: tuple[str, ...], *, toyworld: Path | None = None,
                limit: int | None = None, data_dir: str | None = None,
                time_limit_s: float | None = None) -> dict[str, dict]:
    """Score ``lm`` (an lm-eval ``LM``) on ``tasks``, 0-shot; ``{task: {"acc", "acc_stderr", "n"}}``.

    Global RNG states are restored afterwards (lm-eval reseeds and draws from them) and the model
    is scored in eval mode (restored afterwards), so evaluation inside training does not change
    the training run.
    ``time_limit_s`` is checked before every model call."""
    import random

    import numpy as np

    deadline = Deadline(tasks, time_limit_s)
    # lm-eval reseeds or draws from the global RNGs (task building samples from ``random``)
    rng_states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    # HFLM sets eval mode only when built; a training loop may have switched dropout back on
    module = getattr(lm, "model", None)
    was_training = bool(getattr(module, "training", False))
    if module is not None and was_training:
        module.eval()
    model_call = getattr(lm, "_model_call", None)
    if model_call is not None:
        def timed_call(*args, **kwargs):
            deadline.check()
            return model_call(*args, **kwargs)

        lm._model_call = timed_call
    try:
        out = lm_eval_0shot(lm, tasks, task_manager(tasks, toyworld, data_dir), limit=limit)
    except EvalError:
        raise
    except Exception as exc:  # dataset offline/missing, bad task file: name the tasks, keep cause
        raise EvalError(
            f"lm-eval failed on tasks {list(tasks)}: {type(exc).__name__}: {str(exc)[:500]}"
        ) from exc
    finally:
        if model_call is not None:
            lm._model_call = model_call
        if module is not None and was_training:
            module.train()
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.set_rng_state(rng_states[2])
    return _collect(out, tasks)


def _collect(out: dict | None, tasks: tuple[str, ...]) -> dict[str, dict]:
    results = (out or {}).get("results", {})
    collected = {}
    for task in tasks:
        metrics = results.get(task)
        acc = None if metrics is None else metrics.get("acc,none")
        if acc is None or not isinstance(acc, float) or math.isnan(acc):
            raise EvalError(f"task {task!r} produced no accuracy (got {metrics!r})")
        n = ((out or {}).get("n-samples") or {}).get(task, {}).get("effective")
        collected[task] = {"acc": acc, "acc_stderr": metrics.get("acc_stderr,none"), "n": n}
    return collected


def hf_lm(model, tokenizer, batch_size: int = 32):
    """Wrap an in-memory model (plain or PEFT) for lm-eval; puts it in eval mode, since ``HFLM``
    only does so at construction."""
    from lm_eval.models.huggingface import HFLM

    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def scoring_device() -> torch.device:
    """Where a model loaded only to be scored runs: the first GPU when this process sees one
    (lm-eval's ``HFLM`` uses the model's device), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def evaluate_folder(folder: Path, tasks: tuple[str, ...], *, toyworld: Path | None = None,
                    batch_size: int = 32, limit: int | None = None, data_dir: str | None = None,
                    time_limit_s: float | None = None) -> dict[str, dict]:
    """Load a Hugging Face model folder and score it with lm-eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ConfigError(f"model folder {str(folder)!r} has no config.json: not a saved model")
    # in the dtype it was saved in, on the GPU when there is one
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(scoring_device())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return run_lm_eval(hf_lm(model, tokenizer, batch_size), tasks, toyworld=toyworld, limit=limit,
                       data_dir=data_dir, time_limit_s=time_limit_s)


# --- the fast in-loop scorer -------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One multiple-choice question as lm-eval tokenizes it: the context's token ids, each
    choice's continuation ids (``context_enc`` and ``whole[len(context_enc):]``, lm-eval's
    ``_encode_pair``), and the index of the right choice."""

    task: str
    subtask: str
    doc_id: int
    context: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...]
    gold: int

    @property
    def packed_length(self) -> int:
        """Tokens of the packed sequence ``_pack`` builds: the context, then every choice but its
        last token."""
        return len(self.context) + sum(len(c) - 1 for c in self.choices)


def _leaf_tasks(task_dict) -> dict:
    """``{name: Task}`` of lm-eval's (possibly nested, for groups) task dict."""
    leaves = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            leaves.update(_leaf_tasks(value))
        else:
            leaves[getattr(key, "group_name", key) if not isinstance(key, str) else key] = value
    return leaves


def subset_indices(num_docs: int, fraction: float | None, seed: int, strata=None) -> list[int]:
    """A fixed, seeded subset of ``round(fraction * num_docs)`` documents, stratified by
    ``strata`` (one label per document: the same fraction of each label); all when ``fraction``
    is None."""
    if fraction is None or fraction >= 1:
        return list(range(num_docs))
    strata = strata if strata is not None else [0] * num_docs
    groups: dict = {}
    for index, label in enumerate(strata):
        groups.setdefault(label, []).append(index)
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for label in sorted(groups, key=str):
        members = groups[label]
        keep = max(1, round(fraction * len(members)))
        order = torch.randperm(len(members), generator=generator)[:keep].tolist()
        chosen.extend(members[i] for i in order)
    return sorted(chosen)


def load_questions(tasks: tuple[str, ...], tokenizer, *, toyworld: Path | None = None,
                   data_dir: str | None = None, subset: float | None = None, seed: int = 0,
                   max_length: int | None = None,
                   include: tuple[str, ...] = ()) -> dict[str, list[Question]]:
    """The questions of ``tasks`` (a group counts as one task over all its subtasks), with the
    prompts lm-eval renders (0-shot) and the token ids lm-eval's ``HFLM`` would score.

    ``subset``: score a seeded subset of this fraction of each task (stratified by subtask), for
    search; None scores everything. Prompts longer than ``max_length`` are refused (lm-eval
    would silently cut their left end)."""
    from lm_eval.tasks import get_task_dict

    try:
        task_dict = get_task_dict(list(tasks), task_manager(tasks, toyworld, data_dir, include))
    except Exception as exc:
        raise EvalError(f"lm-eval could not load tasks {list(tasks)}: {type(exc).__name__}: "
                        f"{str(exc)[:500]}") from exc
    questions: dict[str, list[Question]] = {}
    for name in tasks:
        entry = {k: v for k, v in task_dict.items()
                 if (k if isinstance(k, str) else getattr(k, "group_name", str(k))) == name}
        leaves = _leaf_tasks(entry)
        if not leaves:
            raise EvalError(f"task {name!r}: lm-eval returned no task of that name")
        docs = [(leaf, task, i) for leaf, task in sorted(leaves.items())
                for i in range(len(task.eval_docs))]
        keep = subset_indices(len(docs), subset, seed, [leaf for leaf, _, _ in docs])
        per_leaf: dict = {}
        for j in keep:
            per_leaf.setdefault(docs[j][0], []).append(docs[j][2])
        out = []
        for leaf, doc_ids in per_leaf.items():
            task = leaves[leaf]
            if task.OUTPUT_TYPE != "multiple_choice":
                raise EvalError(f"task {leaf!r} is {task.OUTPUT_TYPE}, not multiple_choice")
            task.build_all_requests(samples=doc_ids, rank=0, world_size=1)
            grouped: dict = {}
            for inst in task.instances:
                grouped.setdefault(inst.doc_id, []).append(inst)
            for insts in grouped.values():
                insts.sort(key=lambda inst: inst.idx)
            out += _encode_questions(name, leaf, task, sorted(grouped.items()), tokenizer,
                                     max_length)
        questions[name] = out
    return questions


def _split_choices(leaf, doc_id, instances) -> tuple[str, list[str]]:
    """One document's context and each choice's continuation, split as lm-eval's
    ``HFLM._encode_pair`` splits them: the context's trailing whitespace moves to the
    continuation."""
    contexts = {inst.arguments[0] for inst in instances}
    if len(contexts) != 1:
        raise EvalError(f"task {leaf!r} doc {doc_id}: choices have different contexts")
    context = contexts.pop()
    spaces = len(context) - len(context.rstrip())
    if not spaces:
        return context, [inst.arguments[1] for inst in instances]
    return context[:-spaces], [context[-spaces:] + inst.arguments[1] for inst in instances]


def _encode_questions(name, leaf, task, documents, tokenizer, max_length) -> list[Question]:
    """lm-eval's ``HFLM._encode_pair`` for every choice of every document of one task, with one
    call of the tokenizer for them all (its batch encoding, not two calls per choice: the calls
    were most of loading a toy task). ``documents``: ``[(doc_id, instances by choice)]``."""
    texts: list[str] = []
    for doc_id, instances in documents:
        context, continuations = _split_choices(leaf, doc_id, instances)
        texts += [context] + [context + cont for cont in continuations]
    # the tokenizer's own special tokens, as lm-eval's HFLM (add_bos_token unset) encodes: a
    # tokenizer that prepends BOS gets it here too
    encoded = iter(tokenizer(texts)["input_ids"] if texts else [])
    out = []
    for doc_id, instances in documents:
        ctx_enc = next(encoded)
        if not ctx_enc:
            raise EvalError(f"task {leaf!r} doc {doc_id}: empty context is not supported")
        choices = []
        for inst in instances:
            cont_enc = next(encoded)[len(ctx_enc):]  # as lm-eval cuts it, merged or not
            if not cont_enc:
                raise EvalError(f"task {leaf!r} doc {doc_id}: choice {inst.idx} tokenizes to "
                                f"nothing after the context ({inst.arguments[1]!r})")
            choices.append(tuple(cont_enc))
        out.append(_question(name, leaf, doc_id, instances, task, tuple(ctx_enc), choices,
                             max_length))
    return out


def _question(name, leaf, doc_id, instances, task, ctx_enc, choices, max_length) -> Question:
    """One encoded document as a ``Question``, refusing prompts over ``max_length`` and gold
    labels that are not one of its choices."""
    longest = len(ctx_enc) + max(len(c) for c in choices) - 1
    if max_length is not None and longest > max_length:
        raise EvalError(f"task {leaf!r} doc {doc_id}: {longest} tokens exceed the model's "
                        f"{max_length}; lm-eval would truncate the prompt")
    gold = task.doc_to_target(instances[0].doc)
    if isinstance(gold, str):  # a choice's text, as lm-eval resolves it
        names = task.doc_to_choice(instances[0].doc)
        if gold not in names:  # lm-eval would score the question 0 with a warning
            raise EvalError(f"task {leaf!r} doc {doc_id}: gold label {gold!r} is not one of "
                            f"its choices {names}")
        gold = names.index(gold)
    if isinstance(gold, bool) or not isinstance(gold, numbers.Integral) \
            or not 0 <= int(gold) < len(choices):
        raise EvalError(f"task {leaf!r} doc {doc_id}: gold label {gold!r} is not a choice "
                        f"index 0..{len(choices) - 1}")
    return Question(name, leaf, doc_id, ctx_enc, tuple(choices), int(gold))


def _pack(question: Question) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """One sequence per question: the context, then each choice without its last token.
    Returns ``(tokens, positions, segments, score_at)``: ``segments`` is 0 on the context and
    ``j + 1`` on choice ``j``; ``score_at[j]`` are the sequence indices whose next-token logits
    score choice ``j``'s tokens."""
    ctx = list(question.context)
    tokens, positions, segments = list(ctx), list(range(len(ctx))), [0] * len(ctx)
    score_at = []
    for j, choice in enumerate(question.choices):
        start = len(tokens)
        inner = list(choice[:-1])
        tokens += inner
        positions += list(range(len(ctx), len(ctx) + len(inner)))
        segments += [j + 1] * len(inner)
        score_at.append([len(ctx) - 1] + list(range(start, start + len(inner))))
    return tokens, positions, segments, score_at


def _block_mask(segments: torch.Tensor) -> torch.Tensor:
    """``[batch, 1, L, L]``: which positions each position of a packed question may attend to,
    from its ``_pack`` segments (-1 on padding): the context is causal, each choice sees the
    context and its own earlier tokens, padding sees itself (a row with nothing allowed would
    give NaN). Built for the whole batch in a few tensor operations, not a Python loop per
    question and choice."""
    idx = torch.arange(segments.shape[1])
    causal = idx[None, :] <= idx[:, None]
    row, col = segments[:, :, None], segments[:, None, :]
    real = row >= 0
    allowed = causal & ((col == 0) | (col == row)) & real
    return (allowed | (~real & torch.eye(len(idx), dtype=torch.bool)))[:, None]


def _backbone(model):
    """``(root module to unshard or None, causal LM, body, unembedding)`` of a plain, PEFT or
    FSDP2-sharded Hugging Face causal LM."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(hf, hf.base_model_prefix)
    root = hf if hasattr(hf, "unshard") else None  # an FSDP2 module (``FSDPModule``)
    return root, body, hf.get_output_embeddings()


@torch.no_grad()
def choice_logliks(model, questions: list[Question], *, batch_size: int = 32,
                   device=None, deadline: Deadline | None = None,
                   before_batch=None) -> list[list[float]]:
    """Each choice's summed log-likelihood given its context, as lm-eval computes it, with one
    forward pass per question: choices are packed after their shared context (a block mask keeps
    them apart) and the unembedding runs only at the positions that score a choice token.
    Questions are batched by length (longest first) and results come back in input order.
    ``before_batch(done)`` runs before each batch (default: ``deadline.check``); sharded
    callers pass one that decides with all ranks, so no rank leaves a collective forward."""
    root, body, unembed = _backbone(model)
    device = device or next(unembed.parameters()).device
    packed = [_pack(q) for q in questions]
    order = sorted(range(len(questions)), key=lambda i: -questions[i].packed_length)
    results: list[list[float] | None] = [None] * len(questions)
    was_training = model.training
    model.eval()
    try:
        if root is not None:
            # FSDP2 initialises its sharded tree at the root's first forward; a body called
            # first would make block 0 a root of its own and the model's next forward fail
            # ("FSDP state has already been lazily initialized"): a fresh model, scored before
            # it trains (an attack's step 0), needs this. Every rank runs it.
            root(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
        for b in range(0, len(order), batch_size):
            done = f" after {b} of {len(order)} questions"
            if before_batch is not None:
                before_batch(done)
            elif deadline is not None:
                deadline.check(done)
            rows = order[b:b + batch_size]
            results_rows = _score_batch(body, unembed, root, [questions[i] for i in rows],
                                        [packed[i] for i in rows], device)
            for i, lls in zip(rows, results_rows):
                results[i] = lls
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]  # every slot is filled above


def _score_batch(body, unembed, root, questions, packed, device) -> list[list[float]]:
    length = max(len(tokens) for tokens, _, _, _ in packed)
    ids = torch.zeros(len(packed), length, dtype=torch.long)
    pos = torch.zeros(len(packed), length, dtype=torch.long)
    seg = torch.full((len(packed), length), -1, dtype=torch.long)
    for r, (tokens, positions, segments, _) in enumerate(packed):
        ids[r, :len(tokens)] = torch.tensor(tokens)
        pos[r, :len(positions)] = torch.tensor(positions)
        seg[r, :len(segments)] = torch.tensor(segments)
    mask = _block_mask(seg)
    if getattr(body.config, "_attn_implementation", "sdpa") == "eager":  # additive float mask
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    if root is not None:
        root.unshard()  # FSDP2: the embeddings, final norm and unembedding live on the root
    try:
        hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device),
                      position_ids=pos.to(device)).last_hidden_state
        rows, cols, targets, owners = [], [], [], []
        for r, (q, (_, _, _, score_at)) in enumerate(zip(questions, packed)):
            for j, (choice, at) in enumerate(zip(q.choices, score_at)):
                rows += [r] * len(at)
                cols += at
                targets += list(choice)
                owners += [(r, j)] * len(at)
        logits = unembed(hidden[torch.tensor(rows), torch.tensor(cols)]).float()
    finally:
        if root is not None:
            root.reshard()
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp[torch.arange(len(targets)), torch.tensor(targets, device=logp.device)].tolist()
    sums = [[0.0] * len(q.choices) for q in questions]
    for (r, j), value in zip(owners, picked):
        sums[r][j] += value
    return sums


def predictions(logliks: list[list[float]]) -> list[int]:
    """lm-eval's choice: the first index of the largest log-likelihood."""
    return [max(range(len(lls)), key=lambda j: (lls[j], -j)) for lls in logliks]


def shard(questions: list[Question], rank: int, world: int) -> list[int]:
    """Indices of the questions rank ``rank`` of ``world`` scores: dealt round-robin by packed
    length (balanced work), padded by repeating the last one so every rank runs the same number
    of batches (FSDP2 forwards are collective)."""
    by_length = sorted(range(len(questions)), key=lambda i: questions[i].packed_length)
    mine = by_length[rank::world]
    per_rank = -(-len(questions) // world)
    return mine + [mine[-1] if mine else by_length[0]] * (per_rank - len(mine))


def accuracy(questions: list[Question], logliks: list[list[float]]) -> dict:
    """``{"acc", "acc_stderr", "n"}`` as lm-eval reports a mean (sample stderr over ``n``)."""
    hits = [float(p == q.gold) for p, q in zip(predictions(logliks), questions)]
    n = len(hits)
    acc = sum(hits) / n
    var = sum((h - acc) ** 2 for h in hits) / (n - 1) if n > 1 else 0.0
    return {"acc": acc, "acc_stderr": math.sqrt(var / n), "n": n}


# -- scoring a live model inside a run (every rank takes part) -------------------------------


_QUESTIONS: dict[tuple, dict] = {}
"""Encoded questions by what they depend on (``question_key``): loading them through lm-eval's
task index takes seconds, and a trial scores the same ones again when its export is attacked."""


def _tokenizer_key(tokenizer) -> str:
    """The tokenizer by its contents. A fast tokenizer's serialization also holds the
    truncation and padding of its last call (a training batch's ``max_length``), which do not
    change how a question encodes: left out, or the same tokenizer would miss its own questions
    after a training step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        text = json.dumps(state, sort_keys=True)
    else:
        text = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(f"{text}|{tokenizer.bos_token}|{tokenizer.eos_token}".encode()).hexdigest()


def question_key(ev: EvalConfig, tokenizer, toyworld: Path | None, model_config) -> tuple:
    """What the encoded questions of ``ev`` depend on: its tasks, subset, seed and data folder,
    the toy world, the model's length limit and the tokenizer (by its contents)."""
    max_length = getattr(model_config, "max_position_embeddings", None)
    return (ev.tasks, ev.subset, ev.subset_seed, ev.data_dir, str(toyworld), max_length,
            _tokenizer_key(tokenizer))


def question_set(ev: EvalConfig, tokenizer, toyworld: Path | None,
                 model_config) -> dict[tuple, dict]:
    """``{question_key: questions}``: the questions of ``ev``'s tasks, encoded as the fast scorer
    reads them (loaded once per process for the same key, or taken from
    ``remember_questions``; never modified), in the form a driver hands to its workers."""
    key = question_key(ev, tokenizer, toyworld, model_config)
    if key not in _QUESTIONS:
        _QUESTIONS[key] = load_questions(
            ev.tasks, tokenizer, toyworld=toyworld, data_dir=ev.data_dir, subset=ev.subset,
            seed=ev.subset_seed, max_length=getattr(model_config, "max_position_embeddings", None))
    return {key: _QUESTIONS[key]}


def eval_questions(ev: EvalConfig, tokenizer, toyworld: Path | None, model_config) -> dict:
    """``question_set``'s questions alone: ``{task: [Question]}``."""
    (questions,) = question_set(ev, tokenizer, toyworld, model_config).values()
    return questions


def remember_questions(encoded: dict[tuple, dict]) -> None:
    """Take question sets another process encoded (``{question_key: questions}``): a sweep's
    driver encodes them once and hands them to every trial's workers, which would otherwise each
    load the tasks through lm-eval again. A worker whose key differs (another tokenizer, say)
    finds no match and loads its own."""
    _QUESTIONS.update(encoded)


def evaluate_live(model, tokenizer, ev: EvalConfig, toyworld: Path | None = None, *,
                  questions: dict | None = None) -> dict[str, dict]:
    """Score the live model (plain, LoRA or FSDP2-sharded) with the fast scorer, inside the run:
    each rank scores its share of the questions and the log-likelihoods are gathered, so every
    rank returns the same ``{task: {"acc", "acc_stderr", "n", "subset", "predictions"}}``.
    ``questions``: ``eval_questions``'s, when a caller scores the same ones repeatedly."""
    rank, world = rank_and_world()
    questions = questions or eval_questions(ev, tokenizer, toyworld, model.config)
    deadline = Deadline(ev.tasks, ev.time_limit_s)

    def before_batch(done: str) -> None:
        # every rank stops at the same batch: a rank leaving alone would strand the others in
        # a collective forward (FSDP2) or gather (DDP)
        if any_rank(deadline.expired()):
            raise deadline.error(done)

    results = {}
    for task, qs in questions.items():
        mine = shard(qs, rank, world)
        logliks = choice_logliks(model, [qs[i] for i in mine], batch_size=ev.batch_size,
                                 before_batch=before_batch)
        if world > 1:
            parts = all_gather(list(zip(mine, logliks)))
            merged = dict(pair for part in parts for pair in part)
            logliks = [merged[i] for i in range(len(qs))]
        results[task] = {**accuracy(qs, logliks), "subset": ev.subset,
                         "chance": sum(1 / len(q.choices) for q in qs) / len(qs),
                         "predictions": predictions(logliks)}
    return results


def score_folder(folder: Path | str, ev: EvalConfig,
                 toyworld: Path | None = None) -> dict[str, dict]:
    """A saved model (its weights in the dtype it was written in) scored by the fast scorer in
    this process, without the per-question predictions."""
    from raylens.config import ModelConfig
    from raylens.model import checkpoint_dtype, load_model, load_model_config

    source = ModelConfig(name_or_path=str(folder))
    model, tokenizer = load_model(source, dtype=checkpoint_dtype(load_model_config(source)))
    scores = evaluate_live(model.to(scoring_device()).eval(), tokenizer, ev, toyworld)
    return {task: {k: v for k, v in s.items() if k != "predictions"} for task, s in scores.items()}


def evaluate_base(config: UnlearnConfig, toyworld: Path | None = None) -> dict[str, dict]:
    """The unmodified model scored as every trial is (fast scorer, same tasks and subset):
    ``{task: {"acc", "acc_stderr", "n", "chance"}}``, the baseline a sweep is compared with."""
    from raylens.model import load_model
    from raylens.parallel import device_for

    model, tokenizer = load_model(config.model, toyworld)
    model = model.to(device_for(config)).eval()
    scores = evaluate_live(model, tokenizer, config.eval, toyworld)
    return {task: {k: v for k, v in s.items() if k != "predictions"} for task, s in scores.items()}
