"""MoE versus dense inference: generated tokens/s and per-token latency with the KV
cache, for the dense base, the MoE model (base + experts) at EP 1, 2 and 4 (inference
groups of Ray actors), and a dense model of about 5x the base's parameters (the
quality-equivalent dense model in the reference).

    python bench/inference.py [--cpus 4] [--d-model 128] [--layers 4] [--experts 8]

Every configuration gets the same --cpus: one actor with all of them, or EP actors with
--cpus / EP each. Batches of 1, 8 and 64 random prompts generate --new-tokens tokens
each (no early stop). Prints one line per (model, batch) and, per batch size, the ratios
MoE / dense-5x and MoE / dense-base of tokens/s (above 1: the MoE model is faster). The
models are randomly initialised (speed does not depend on the weights) and byte-level,
so that the output layer stays small beside the feed-forward layers.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from raymoe.config import Config, load_config  # noqa: E402
from raymoe.infer.group import GroupOptions, InferenceGroups  # noqa: E402
from raymoe.model import GPT  # noqa: E402
from raymoe.model.generation import Sampling  # noqa: E402
from raymoe.parallel.checkpoint import save_checkpoint  # noqa: E402
from raymoe.parallel.mesh import Mesh  # noqa: E402
from raymoe.runs import step_directory  # noqa: E402

BATCHES = (1, 8, 64)


def bench_config(d_model: int, layers: int, experts: int, prompt: int, new: int) -> Config:
    overrides = [f"model.d_model={d_model}", f"model.n_layer={layers}",
                 f"model.n_head={max(d_model // 64, 1)}", f"model.seq_len={prompt + new}",
                 "model.vocab_size=257"]
    if experts:
        overrides += [f"model.moe.num_experts={experts}", "model.moe.every=2"]
    return load_config("tiny", overrides)


def write_checkpoint(cfg: Config, root: Path) -> tuple[str, int]:
    torch.manual_seed(0)
    model = GPT(cfg.model)
    save_checkpoint(step_directory(root, 1), model, Mesh(1),
                    extra={"config": cfg.to_dict(), "tokenizer": "bytes", "step": 1})
    return str(step_directory(root, 1)), model.num_parameters()


def measure(checkpoint: str, ep: int, cpus: float, prompt: int, new: int) -> dict[int, float]:
    """Per batch size, the seconds to generate ``new`` tokens per row (after a warm-up)."""
    seconds = {}
    with InferenceGroups(checkpoint, GroupOptions(ep, 1, cpus_per_rank=cpus / ep)) as groups:
        g = torch.Generator().manual_seed(0)
        groups.generate_tokens([[1] * prompt], 2, Sampling(), stop_at_eot=False)  # warm-up
        for batch in BATCHES:
            prompts = torch.randint(0, 256, (batch, prompt), generator=g).tolist()
            start = time.perf_counter()
            out = groups.generate_tokens(prompts, new, Sampling(), stop_at_eot=False)
            seconds[batch] = time.perf_counter() - start
            assert all(len(t) == new for t in out)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    d5 = 64 * round(args.d_model * math.sqrt(5) / 64)  # ~5x the parameters at the same depth
    root = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    shapes = {"dense-base": (args.d_model, 0), "moe": (args.d_model, args.experts),
              "dense-5x": (d5, 0)}
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(root / "ray"))
    results: dict[str, dict[int, float]] = {}
    for name, (d_model, experts) in shapes.items():
        cfg = bench_config(d_model, args.layers, experts, args.prompt, args.new_tokens)
        checkpoint, params = write_checkpoint(cfg, root / name)
        for ep in ((1, 2, 4) if experts else (1,)):
            label = f"{name}@ep{ep}" if experts else name
            results[label] = measure(checkpoint, ep, args.cpus, args.prompt, args.new_tokens)
            for batch, s in results[label].items():
                print(f"{label:<12} params {params / 1e6:7.2f}M batch {batch:>3}: "
                      f"{batch * args.new_tokens / s:9.1f} tokens/s, "
                      f"{1e3 * s / args.new_tokens:8.2f} ms/token step", flush=True)
    ray.shutdown()
    for batch in BATCHES:
        for ep in (1, 2, 4):
            moe = results[f"moe@ep{ep}"][batch]
            print(f"batch {batch:>3} moe@ep{ep}: RATIO tokens/s moe/dense-5x "
                  f"{results['dense-5x'][batch] / moe:.2f}, moe/dense-base "
                  f"{results['dense-base'][batch] / moe:.2f}")


if __name__ == "__main__":
    main()
