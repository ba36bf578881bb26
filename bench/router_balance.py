"""Why the tiny studies' routers collapsed, and what keeps them balanced.

Trains small MoE GPTs in one process (a plain loop: forward, backward, clipping, AdamW, the
presets' warm-up and learning rate) and prints, per configuration, the share of tokens the
MoE layers drop at capacity factor 1.0 along training, the largest share after the first 5%
of steps, the load-balancing loss per layer (1.0 is balanced, as DeepSpeed computes it), the
share of the frequent tokens' occurrences routed to the expert that most occurrences of the
same token go to (routing by token identity), and the mean training loss of the last 50 steps.

1. tiny-moe8 with 16 experts (the tiny study's MoE model) on UTF-8 bytes of Dickens: one
   byte (the space) is 16% of the tokens, 2.6x an expert's capacity share of 1/16;
2. the same on study-small's 4,096-token BPE of Dickens and Twain (no token above 6.1%);
3. the same with a 100x load-balancing coefficient, with a 4x lower learning rate, and with
   DeepSpeed's RSample gate noise (argmax over logits + Gumbel noise in training);
4. study-small's base + 32 experts, without and with RSample.

    python bench/router_balance.py [--steps 300] [--corpus DIR] [--data runs/gutenberg/train]
(`make study` prepares the BPE data; DIR holds Dickens_Charles/.)
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from study_speed import first_sequences, study_config  # noqa: E402

from raymoe.config import Config, load_config  # noqa: E402
from raymoe.data.prepare import PrepareOptions, prepare  # noqa: E402
from raymoe.model import GPT  # noqa: E402
from raymoe.train.optim import build_optimizer, learning_rate, set_learning_rate  # noqa: E402

BATCH = 16
REPORT_AT = (20, 50, 100, 200)


def train(cfg: Config, sequences: torch.Tensor, steps: int) -> str:
    """One configuration's line."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    dropped: list[float] = []
    l_aux: list[float] = []
    losses: list[float] = []
    tokens = 0
    for step in range(steps):
        batch = sequences[step * BATCH:(step + 1) * BATCH]
        set_learning_rate(optimizer, learning_rate(tokens, cfg.optim))
        out = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        tokens += batch[:, 1:].numel()
        dropped.append(float(torch.stack([s.dropped_fraction for s in out.moe_stats]).mean()))
        l_aux.append(float(out.l_aux.detach()) / len(out.moe_stats))
        losses.append(float(out.lm_loss))
    along = "  ".join(f"{at}: {dropped[at - 1]:.2f}" for at in REPORT_AT if at <= steps)
    after = dropped[math.ceil(0.05 * steps):]
    return (f"dropped at step {along}  max after 5%: {max(after):.2f}  "
            f"l_aux/layer {np.mean(l_aux[-50:]):.3f}  "
            f"routed by token {identity_share(model, sequences[-4 * BATCH:]):.2f}  loss {np.mean(losses[-50:]):.4f}")


FREQUENT = 20
"""Routing by token identity is measured over the tokens seen at least this often (in the
BPE most tokens occur once or twice in a batch: trivially routed "by identity")."""


@torch.no_grad()
def identity_share(model: GPT, batch: torch.Tensor) -> float:
    """Share of the frequent tokens' occurrences (mean over MoE layers) routed to the expert
    that most occurrences of the same input token go to."""
    choices: list[torch.Tensor] = []
    def keep_choice(_module: torch.nn.Module, _inputs: object, logits: torch.Tensor) -> None:
        choices.append(logits.argmax(-1))

    hooks = [layer.router.register_forward_hook(keep_choice) for layer in model.moe_layers]
    model(batch[:, :-1])
    for hook in hooks:
        hook.remove()
    ids = batch[:, :-1].reshape(-1)
    tokens, counts = ids.unique(return_counts=True)
    frequent = tokens[counts >= FREQUENT]
    occurrences = int(counts[counts >= FREQUENT].sum())
    shares = []
    for expert in choices:
        same = sum(int(torch.bincount(expert.reshape(-1)[ids == token]).max()) for token in frequent)
        shares.append(same / occurrences)
    return float(np.mean(shares))


def byte_sequences(corpus: Path, count: int, tmp: str) -> torch.Tensor:
    """UTF-8 bytes of Dickens' books, prepared at 128 tokens a sequence."""
    books = sorted((corpus / "Dickens_Charles").glob("*.txt"))[:12]
    prepare(PrepareOptions([str(b) for b in books], f"{tmp}/bytes", tokenizer="bytes", seq_len=128,
                           val_fraction=0.0, doc_chars=20000), log=lambda _: None)
    return first_sequences(f"{tmp}/bytes", count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--corpus", default=str(REPO.parent / "shared" / "data" / "corpus" / "gutenberg"))
    parser.add_argument("--data", default=str(REPO / "runs" / "gutenberg" / "train"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    count = args.steps * BATCH
    bpe = first_sequences(args.data, count)
    tiny = ["model.moe.num_experts=16", "parallel.num_workers=1"]
    bpe_tiny = [*tiny, "model.vocab_size=4096"]
    rsample = "model.moe.noisy_gate_policy=RSample"
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("tiny-moe8, 16 experts, bytes", load_config("tiny-moe8", tiny),
                 byte_sequences(Path(args.corpus), count, tmp)),
                ("tiny-moe8, 16 experts, BPE 4k", load_config("tiny-moe8", bpe_tiny), bpe),
                ("tiny-moe8, 16 experts, BPE 4k, loss_coef 1.0 (not 0.01)",
                 load_config("tiny-moe8", [*bpe_tiny, "model.moe.loss_coef=1.0"]), bpe),
                ("tiny-moe8, 16 experts, BPE 4k, lr 5e-4 (not 2e-3)",
                 load_config("tiny-moe8", [*bpe_tiny, "optim.lr=5e-4"]), bpe),
                ("tiny-moe8, 16 experts, BPE 4k, RSample", load_config("tiny-moe8", [*bpe_tiny, rsample]), bpe),
                ("study-small base-moe32 without RSample",
                 study_config("base-moe32", ["model.moe.noisy_gate_policy=null"]), bpe),
                ("study-small base-moe32 (RSample)", study_config("base-moe32", []), bpe)]
        print(f"{args.steps} steps of {BATCH} x 128 tokens, one process, 2 threads, capacity factor 1.0")
        for name, cfg, sequences in runs:
            print(f"{name}: {train(cfg, sequences, args.steps)}", flush=True)


if __name__ == "__main__":
    main()
