"""What experts can buy at study-small's size: the most a MoE layer could add is the
capacity of a feed-forward layer as wide as all its experts together, so a dense base
whose every feed-forward layer is 8x wider (ffn_mult 32) bounds the base + 8 experts from
above (it computes every token through all of that width; the MoE model through one
eighth). If that dense model barely beats the base, feed-forward capacity is not what the
base lacks at this token budget, and no gate can make 8 experts worth much more.

Trains in one process (raymoe's train_step: the trainer's step without Ray) on the
study's data (sequences drawn at random from the whole split, the same for every model),
at the study's batch, learning rate and schedule shape over --steps steps, and scores
--val sequences drawn from the validation split (eval mode: the experts chosen by argmax,
no token dropped). Prints each model's validation loss along training, the MoE models'
dropped share after the first 5% of steps, and each model's gain over the base (above 0:
better).

    python bench/study_ceiling.py [--steps 600] [--models dense-1x,dense-ffn8x,...]
(`make study` prepares the data.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from study_speed import study_config  # noqa: E402

from raymoe.config import Config  # noqa: E402
from raymoe.data.shards import PreparedDataset  # noqa: E402
from raymoe.model import GPT  # noqa: E402
from raymoe.parallel.mesh import Mesh  # noqa: E402
from raymoe.train.optim import build_optimizer, learning_rate, set_learning_rate  # noqa: E402
from raymoe.train.step import train_step  # noqa: E402

BATCH = 16
LR = 2e-3
"""study-small's choice for the dense models and base + 8 experts (its lr_search)."""
NO_NOISE = "model.moe.noisy_gate_policy=null"
MODELS: dict[str, tuple[str, list[str]]] = {
    "dense-1x": ("dense-1x", []),
    "dense-ffn8x": ("dense-1x", ["model.ffn_mult=32"]),
    "dense-4x": ("dense-4x", []),
    "base-moe8-rsample": ("base-moe8", []),  # the study's gate
    "base-moe8-no-noise": ("base-moe8", [NO_NOISE]),  # DeepSpeed's gate as the reference set it
    "base-moe8-balanced": ("base-moe8", [NO_NOISE, "model.moe.bias_update_rate=0.01"]),  # loss-free balancing
}
DEFAULT = ",".join(MODELS)


def sequences(data: str, split: str, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` sequences drawn without replacement from the whole split (stored order
    follows the books: their first shards would be a few books only), the same for every
    model."""
    dataset = PreparedDataset.open(data)
    table = dataset.shards(split)
    every = np.concatenate([dataset.read_shard(table[i]) for i in range(len(table))])
    if count > len(every):
        raise SystemExit(f"{data}: its {split} split has {len(every):,} sequences, fewer than {count:,}")
    chosen = np.random.default_rng(seed).permutation(len(every))[:count]
    return torch.from_numpy(every[chosen].astype(np.int64))


@torch.no_grad()
def validation_loss(model: GPT, val: torch.Tensor) -> float:
    model.eval()
    losses = [float(model(val[i:i + BATCH, :-1], val[i:i + BATCH, 1:]).lm_loss) for i in range(0, len(val), BATCH)]
    model.train()
    return float(np.mean(losses))


def train(cfg: Config, data: torch.Tensor, val: torch.Tensor, steps: int,
          every: int) -> tuple[list[float], str, int]:
    """Validation losses at every ``every`` steps and the end; a note on dropping; the
    model's parameter count."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    curve, dropped, tokens = [], [], 0
    for step in range(steps):
        batch = data[step * BATCH:(step + 1) * BATCH]
        set_learning_rate(optimizer, learning_rate(tokens, cfg.optim))
        result = train_step(model, optimizer, Mesh(1), [(batch[:, :-1], batch[:, 1:])], cfg.optim.grad_clip)
        tokens += batch[:, 1:].numel()
        dropped.append(max(result.dropped_fraction, default=0.0))
        if (step + 1) % every == 0 or step == steps - 1:
            curve.append(validation_loss(model, val))
    after = dropped[steps // 20:]
    note = f", dropped after 5%: mean {np.mean(after):.2f}, max {max(after):.2f}" if model.moe_layers else ""
    return curve, note, model.num_parameters()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=200, help="steps between validations")
    parser.add_argument("--val", type=int, default=192, help="validation sequences")
    parser.add_argument("--models", default=DEFAULT, help=f"comma-separated, of: {DEFAULT}")
    parser.add_argument("--data", default=str(REPO / "runs" / "gutenberg" / "train"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    data, val = sequences(args.data, "train", args.steps * BATCH), sequences(args.data, "validation", args.val)
    print(f"{args.steps} steps of {BATCH} x 128 tokens ({args.steps * BATCH * 128 / 1e6:.2f}M tokens), "
          f"lr {LR:g}, one process; validation loss on {args.val} sequences every {args.every} steps")
    finals: dict[str, float] = {}
    for name in args.models.split(","):
        study_model, overrides = MODELS[name]
        cfg = study_config(study_model, [f"train.total_tokens={args.steps * BATCH * 128}", f"optim.lr={LR}",
                                         *overrides])
        start = time.perf_counter()
        curve, note, params = train(cfg, data, val, args.steps, args.every)
        finals[name] = curve[-1]
        print(f"{name}: {params / 1e6:.2f}M parameters, validation loss "
              f"{' '.join(f'{v:.4f}' for v in curve)}{note} ({time.perf_counter() - start:.0f} s)", flush=True)
    if "dense-1x" in finals:
        for name, loss in finals.items():
            print(f"{name}: gain over dense-1x {finals['dense-1x'] - loss:+.4f} nats")


if __name__ == "__main__":
    main()
