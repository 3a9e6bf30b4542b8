"""Toy world: build time (recorded when it was built) against load-from-cache time (both models,
tokenizer and lens in memory), one run.

Builds the default world first if it is not cached. Prints seconds and the ratio.
"""

import time

import raylens  # noqa: F401
from raylens import toyworld as tw


def main() -> None:
    """Print the cold build time against the cached load time of the toy world."""
    world = tw.load_or_build()
    build_s = world.baseline["build_s"]
    start = time.perf_counter()
    loaded = tw.load_or_build()
    # a load that is ready for work: both models, the tokenizer and the lens in memory
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylens.lens import load_lens

    model = AutoModelForCausalLM.from_pretrained(loaded.model)
    AutoModelForCausalLM.from_pretrained(loaded.control)
    AutoTokenizer.from_pretrained(loaded.model)
    load_lens(model, str(loaded.lens))
    load_s = time.perf_counter() - start
    print(f"toy world {world.root.name}: build {build_s:.1f} s, load from cache {load_s:.4f} s, "
          f"ratio build/load {build_s / load_s:.0f}x")


if __name__ == "__main__":
    main()
