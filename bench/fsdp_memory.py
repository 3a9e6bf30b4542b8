"""Memory per worker: full fine-tuning (sft_adamw, bf16 compute, fp32 master weights) of a random
GPT-NeoX of about 160M parameters on 1 Ray Train worker against 2 FSDP2 workers, measured in one
run.

Both runs build the model and its frozen reference on the meta device, shard them, and load the
checkpoint from rank 0 tensor by tensor (``raylens.model.load_sharded``). Two figures per rank:
``resident`` is the bytes of this rank's parameters, gradients and AdamW state plus the
reference (local shards only) after the first step, deterministic; ``peak`` is the process's
peak resident set size (CPU; it includes the Python/torch/Ray runtime, several hundred MiB, and
on rank 0 the checkpoint while it is read). At ~160M parameters the model is about 2.6 GiB of
the resident figure, so the runtime no longer hides it. Pass ``--gpu`` on a GPU machine (peak
is then allocated CUDA memory).

The step is one batch of 4 sequences of 16 tokens. On a CPU without bf16 matrix instructions
(AVX2 only, like the dev machine) torch runs bf16 matmuls in its reference loop, tens of times
slower than fp32 (the script prints the ratio it measures): at the first version's 16 x 64
tokens the 1-worker step took over 20 minutes, which read as a stall. Neither memory figure
depends on the token count beyond the activations of those few tokens.
"""

import argparse
import json
import tempfile
from pathlib import Path

import raylens  # noqa: F401
from raylens import toyworld as tw
from raylens.ray_train import fit_on_ray
from raylens.recipes import recipe

SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072)
"""GPT-NeoX at Pythia-160M's shape: 85M in the blocks, 77M in the two 50,304-row embeddings."""


def write_model(folder: Path, world) -> int:
    """A random GPT-NeoX of ``SHAPE`` stored in bf16 with the toy tokenizer and a tuned lens;
    its parameter count."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM
    from tuned_lens.nn import TunedLens

    from raylens.lens import save_lens

    tokenizer = AutoTokenizer.from_pretrained(world.model)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048,
                           tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
                           eos_token_id=tokenizer.eos_token_id, **SHAPE)
    model = GPTNeoXForCausalLM(config)
    save_lens(TunedLens.from_model(model), folder / "lens", base_model_name_or_path=str(folder))
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def measure(workers: int, use_gpu: bool, world, folder: Path, tmp: Path) -> list[dict]:
    """Train with ``workers`` FSDP2 ranks; each rank's resident and peak memory."""
    config = recipe("sft_adamw", {
        "model.name_or_path": str(folder), "model.dtype": "bfloat16",
        "lens.name_or_path": str(folder / "lens"), "loss.target_layers": (2, 4, 6, 8, 10),
        "data.num_examples": 4, "data.max_length": 16, "batch.epochs": 1,
        "batch.global_batch": 4, "batch.per_device_batch": 2, "scaling.num_workers": workers,
        "scaling.use_gpu": use_gpu, "scaling.checkpoint_every": 0})
    report = fit_on_ray(config, out=tmp / f"w{workers}", storage_path=tmp / "ray",
                        toyworld=world.root, name=f"w{workers}", evaluate=False)
    return report["memory_per_rank"]


def bf16_matmul_slowdown(n: int = 256) -> float:
    """How many times slower a bf16 matmul runs than an fp32 one on this CPU (best of 3 each)."""
    import time

    import torch

    def best(dtype) -> float:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) / best(torch.float32)


def main() -> None:
    """Measure 1, 2 and 4 ranks and print the per-rank memory table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    import ray

    world = tw.load_or_build()
    ray.init(num_cpus=2 if not args.gpu else None, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        params = write_model(folder, world)
        one = measure(1, args.gpu, world, folder, Path(tmp))
        two = measure(2, args.gpu, world, folder, Path(tmp))
    ray.shutdown()
    if not args.gpu:
        print(f"bf16 matmul on this CPU: {bf16_matmul_slowdown():.0f}x slower than fp32")
    print(f"random GPT-NeoX, {params / 1e6:.1f}M parameters, stored in bf16, trained as fp32 "
          "master weights with a bf16 reference")
    print("workers rank resident_MiB peak_MiB")
    for workers, ranks in ((1, one), (2, two)):
        for rank, m in enumerate(ranks):
            print(f"{workers:7d} {rank:4d} {m['resident_mb']:12.1f} {m['peak_mb']:8.1f}")
    resident = max(m["resident_mb"] for m in two) / one[0]["resident_mb"]
    peak = max(m["peak_mb"] for m in two) / one[0]["peak_mb"]
    print(f"per-worker ratio, 2 FSDP2 workers / 1 worker: resident {resident:.3f}, "
          f"peak {peak:.3f} (rank 1 alone: {two[1]['peak_mb'] / one[0]['peak_mb']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": params, "one": one, "two": two,
                                               "resident_ratio": resident,
                                               "peak_ratio": peak}, indent=1))


if __name__ == "__main__":
    main()
