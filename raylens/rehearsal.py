"""A rehearsal of the real setting under the real hub ids, offline, on a CPU.

``build(folder)`` writes a Hugging Face cache (``HF_HOME`` layout) holding small stand-ins for
every hub id the real sweeps name, in the layouts the libraries themselves write after a
download, so the real loading code runs unchanged with ``HF_HOME=folder`` and
``HF_HUB_OFFLINE=1``:

- models and lenses: ``hub/models--<org>--<name>/`` with ``blobs/``, ``snapshots/<commit>/``
  (links to the blobs) and ``refs/main``, as ``huggingface_hub`` keeps them;
- datasets: ``datasets/<org>___<name>/<config>/0.0.0/<hash>/`` arrow files and
  ``dataset_info.json``, as ``datasets`` prepares them (offline it reloads exactly this), written
  by the ``parquet`` builder ``datasets`` uses for hub repositories.

Each stand-in has the real schema (configs, splits, columns, dtypes) and toy content: the model
is a GPT-NeoX with deep-ignorance's structure (32 layers, rotary 0.25, 50,304-wide unembedding,
untied, stored in bf16) scaled to width 64; the lens is a tuned lens for it in the format the
seed's trainer saved; corpora and questions come from the toy world. The stand-ins are not the
real weights: a rehearsal shows the path runs, not what the method achieves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MODEL_ID = "EleutherAI/deep-ignorance-unfiltered"
LENS_ID = "EleutherAI/deep-ignorance-unfiltered-lens"
FORGET_ID = "Unlearning/WMDP-Bio-Remove-Dataset"
RETAIN_ID, RETAIN_CONFIG = "EleutherAI/wikitext_document_level", "wikitext-103-raw-v1"
ROBUST_ID = "EleutherAI/wmdp_bio_robust_mcqa"
WMDP_ID, WMDP_CONFIGS = "cais/wmdp", ("wmdp-bio", "wmdp-chem", "wmdp-cyber")
MMLU_ID = "cais/mmlu"
HUB_IDS = (MODEL_ID, LENS_ID, FORGET_ID, RETAIN_ID, ROBUST_ID, WMDP_ID, MMLU_ID)
"""Every hub id the real sweeps read (model, lens, corpora, and the evaluation datasets)."""

STAND_IN_WIDTH = 64
"""Hidden size of the stand-in model (the real one: 4096)."""


def mmlu_subjects() -> list[str]:
    """The dataset configs lm-eval's built-in ``mmlu`` group reads (57 subjects), from the
    installed lm-eval's own task files."""
    import lm_eval
    import yaml

    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    subjects = []
    for path in sorted(folder.glob("mmlu_*.yaml")):
        spec = yaml.safe_load(path.read_text())
        if isinstance(spec, dict) and spec.get("dataset_name"):
            subjects.append(spec["dataset_name"])
    return subjects


def _write_hub_repo(hub: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """``files`` (name in the repo -> local file) as a cached model repo; its snapshot folder."""
    root = hub / ("models--" + repo_id.replace("/", "--"))
    shas = {}
    for name, src in sorted(files.items()):
        sha = hashlib.sha256(Path(src).read_bytes()).hexdigest()
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / "blobs" / sha)
        shas[name] = sha
    commit = hashlib.sha1(json.dumps(shas, sort_keys=True).encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    for name, sha in shas.items():
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "blobs" / sha, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def _write_dataset(cache: Path, repo_id: str, config: str, splits: dict[str, list[dict]],
                   features=None) -> None:
    """One config of a hub dataset as ``datasets`` caches it after a download: the parquet
    builder run over parquet files of ``splits``, named and placed as for ``repo_id``."""
    import datasets
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for split, rows in splits.items():
            path = Path(tmp) / f"{split}-00000-of-00001.parquet"
            datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
            files[split] = [str(path)]
        builder = Parquet(cache_dir=str(cache), dataset_name=repo_id.split("/")[-1],
                          config_name=config, config_id=config, features=features,
                          data_files=DataFilesDict.from_local_or_remote(files, base_path=tmp),
                          hash=hashlib.sha1(f"{repo_id}/{config}".encode()).hexdigest()[:16])
        builder.repo_id = repo_id  # the cache folder is <org>___<name>, as for a hub download
        builder._cache_dir = builder._build_cache_dir()
        builder.download_and_prepare()


def stand_in_model(tokenizer, seed: int = 0):
    """A random GPT-NeoX with deep-ignorance-unfiltered's structure at width 64."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=50304, hidden_size=STAND_IN_WIDTH, num_hidden_layers=32,
        num_attention_heads=4, intermediate_size=4 * STAND_IN_WIDTH, rotary_pct=0.25,
        rotary_emb_base=10000, max_position_embeddings=2048, use_parallel_residual=True,
        tie_word_embeddings=False, layer_norm_eps=1e-5, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    return GPTNeoXForCausalLM(config).to(torch.bfloat16)


def _questions(rows: list[dict], parts: int) -> list[list[dict]]:
    """``rows`` dealt over ``parts`` lists (each non-empty)."""
    return [rows[k::parts] or rows[:1] for k in range(parts)]


def _write_model_and_lens(hub: Path, world, log) -> None:
    """The stand-in model (bf16) and a tuned lens for it, as hub repositories."""
    import torch
    from transformers import AutoTokenizer
    from tuned_lens.nn import TunedLens

    from raylens.lens import save_lens

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        tokenizer = AutoTokenizer.from_pretrained(world.model)
        model = stand_in_model(tokenizer)
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        _write_hub_repo(hub, MODEL_ID, {p.name: p for p in (tmp / "model").iterdir()})
        log(f"{MODEL_ID}: {sum(p.numel() for p in model.parameters()):,} parameters, bf16")
        lens = TunedLens.from_model(model.float())
        with torch.no_grad():  # non-trivial translators, so the forget loss sees a real lens
            gen = torch.Generator().manual_seed(1)
            for translator in lens.layer_translators:
                translator.weight.add_(torch.randn(translator.weight.shape, generator=gen) * 0.02)
        save_lens(lens, tmp / "lens", base_model_name_or_path=MODEL_ID)
        _write_hub_repo(hub, LENS_ID, {p.name: p for p in (tmp / "lens").iterdir()})
        log(f"{LENS_ID}: {len(lens)} translators")


def _write_corpora(cache: Path, world, log) -> None:
    """The forget and retain corpora in the hub datasets' schemas."""
    from raylens import toyworld as tw

    forget = [r["text"] for r in tw.read_jsonl(world.forget)]
    _write_dataset(cache, FORGET_ID, "default", {"train": [
        {"title": " ".join(t.split()[:4]), "abstract": "" if i % 3 == 0 else t.split(".")[0],
         "text": t} for i, t in enumerate(forget)]})
    retain = [r["text"] for r in tw.read_jsonl(world.retain)]
    half = len(retain) // 8
    _write_dataset(cache, RETAIN_ID, RETAIN_CONFIG, {
        "train": [{"page": t} for t in retain], "validation": [{"page": t} for t in retain[:half]],
        "test": [{"page": t} for t in retain[half:2 * half]]})
    log(f"{FORGET_ID}: {len(forget)} documents; {RETAIN_ID} ({RETAIN_CONFIG}): {len(retain)}")


def _write_eval_sets(cache: Path, world, log) -> None:
    """WMDP-Bio-Robust, lm-eval's wmdp_bio and mmlu, from the toy world's questions."""
    import datasets

    from raylens import toyworld as tw

    hazard = tw.read_jsonl(world.eval_set("toy_wmdp"))
    general = tw.read_jsonl(world.eval_set("toy_mmlu"))
    mcq = datasets.Features({"answer": datasets.Value("int64"), "question": datasets.Value("string"),
                             "choices": datasets.Sequence(datasets.Value("string"))})
    keep = lambda r: {"answer": int(r["answer"]), "question": r["question"],
                      "choices": list(r["choices"])}
    robust = _questions(hazard, 2 * len(tw.WMDP_BIO_ROBUST_CATEGORIES))
    for k, category in enumerate(tw.WMDP_BIO_ROBUST_CATEGORIES):
        _write_dataset(cache, ROBUST_ID, category, {
            "robust": [keep(r) for r in robust[2 * k]],
            "shortcut": [keep(r) for r in robust[2 * k + 1]]}, features=mcq)
    for config, part in zip(WMDP_CONFIGS, _questions(hazard, 3)):
        _write_dataset(cache, WMDP_ID, config, {"test": [keep(r) for r in part]}, features=mcq)
    subjects = mmlu_subjects()
    mmlu = datasets.Features({"question": datasets.Value("string"),
                              "subject": datasets.Value("string"),
                              "choices": datasets.Sequence(datasets.Value("string")),
                              "answer": datasets.ClassLabel(names=["A", "B", "C", "D"])})
    for subject, part in zip(subjects, _questions(general, len(subjects))):
        rows = [{**keep(r), "subject": subject} for r in part]
        _write_dataset(cache, MMLU_ID, subject, {"test": rows, "validation": rows[:1],
                                                 "dev": rows[:1]}, features=mmlu)
    log(f"{ROBUST_ID}: {len(tw.WMDP_BIO_ROBUST_CATEGORIES)} configs; {WMDP_ID}: "
        f"{len(WMDP_CONFIGS)} configs; {MMLU_ID}: {len(subjects)} subjects")


def build(folder: Path, *, world=None, log=print) -> Path:
    """Write the rehearsal cache into ``folder`` (its ``HF_HOME``); returns ``folder``."""
    from raylens import toyworld as tw

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        from raylens.config import ConfigError

        raise ConfigError(f"rehearsal folder {str(folder)!r} is invalid: allowed a new or empty "
                          "folder")
    world = world or tw.load_or_build(log=log)
    _write_model_and_lens(folder / "hub", world, log)
    _write_corpora(folder / "datasets", world, log)
    _write_eval_sets(folder / "datasets", world, log)
    (folder / "REHEARSAL.json").write_text(json.dumps(
        {"hub_ids": list(HUB_IDS), "toyworld": str(world.root)}, indent=1))
    return folder
