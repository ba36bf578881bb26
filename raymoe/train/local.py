"""A one-process training loop on a text directory: the demo until Ray Train runs it.

Tokens of the corpus are held in memory; batches are random windows of seq_len + 1 tokens.
A seeded 5% of fixed-size chunks of every book is held back for validation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from raymoe.config import Config
from raymoe.data.text import read_documents
from raymoe.data.tokenizers import ByteTokenizer
from raymoe.model import GPT
from raymoe.train.optim import build_optimizer, learning_rate, set_learning_rate

CHUNK_TOKENS = 8192
VALIDATION_SHARE = 0.05


@dataclass
class LocalRunResult:
    steps: int
    tokens: int
    first_loss: float
    final_loss: float
    validation_loss: float


def split_tokens(corpus: Path, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) uint8-range token streams, split by chunk with a seed."""
    tokenizer = ByteTokenizer()
    ids: list[int] = []
    for _, text in read_documents(corpus):
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eot_id)
    tokens = torch.tensor(ids, dtype=torch.int16)
    chunks = list(tokens.split(CHUNK_TOKENS))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(chunks), generator=g).tolist()
    n_val = max(1, math.ceil(len(chunks) * VALIDATION_SHARE))
    val = torch.cat([chunks[i] for i in sorted(order[:n_val])])
    train = torch.cat([chunks[i] for i in sorted(order[n_val:])])
    return train.long(), val.long()


def random_windows(tokens: torch.Tensor, batch: int, seq_len: int,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch,), generator=g)
    rows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def validation_loss(model: GPT, tokens: torch.Tensor, cfg: Config) -> float:
    model.eval()
    g = torch.Generator().manual_seed(0)
    losses = [model(*random_windows(tokens, cfg.train.micro_batch, cfg.model.seq_len, g)).lm_loss
              for _ in range(cfg.train.eval_batches)]
    model.train()
    return float(torch.stack(losses).mean())


def train_locally(cfg: Config, corpus: Path, max_seconds: float,
                  log: Callable[[str], None] = print) -> LocalRunResult:
    if cfg.data.tokenizer != "bytes":
        raise ValueError(f"data.tokenizer={cfg.data.tokenizer!r}: the local demo trains with "
                         "the byte tokenizer; use a tiny preset")
    torch.manual_seed(cfg.train.seed)
    train, val = split_tokens(corpus, cfg.data.seed)
    log(f"corpus {corpus}: {train.numel():,} training and {val.numel():,} validation tokens")
    model = GPT(cfg.model)
    log(f"model {cfg.name}: {model.num_parameters():,} parameters, "
        f"{model.num_parameters(active_only=True):,} active per token")
    optimizer = build_optimizer(model, cfg.optim)
    g = torch.Generator().manual_seed(cfg.train.seed)
    tokens_per_step = cfg.train.global_batch * cfg.model.seq_len
    started = time.monotonic()
    step, tokens_seen, first_loss, loss_value = 0, 0, float("nan"), float("nan")
    while tokens_seen < cfg.train.total_tokens and time.monotonic() - started < max_seconds:
        set_learning_rate(optimizer, learning_rate(tokens_seen, cfg.optim))
        out = model(*random_windows(train, cfg.train.global_batch, cfg.model.seq_len, g))
        loss_value = float(out.loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"step {step}: loss is {loss_value}")
        optimizer.zero_grad(set_to_none=False)  # experts accumulate into .grad in place
        out.loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        step += 1
        tokens_seen += tokens_per_step
        first_loss = loss_value if step == 1 else first_loss
        if step % cfg.train.log_every == 0 or step == 1:
            elapsed = time.monotonic() - started
            dropped = (sum(s.dropped_fraction for s in out.moe_stats) / len(out.moe_stats)
                       if out.moe_stats else 0.0)
            log(f"step {step:5d}  loss {float(out.lm_loss):.4f}  l_aux {float(out.l_aux):.3f}  "
                f"dropped {dropped:.1%}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                f"{tokens_seen / elapsed:,.0f} tok/s")
    val_loss = validation_loss(model, val, cfg)
    log(f"finished: {step} steps, {tokens_seen:,} tokens, validation loss {val_loss:.4f} "
        f"(perplexity {math.exp(val_loss):.2f})")
    return LocalRunResult(step, tokens_seen, first_loss, loss_value, val_loss)
