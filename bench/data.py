"""Data path speed: `raymoe prepare` (Ray Data) against plain one-process tokenization of
the same text, and one rank's streaming throughput against what models consume.

    python bench/data.py [--corpus DIR] [--max-mb 20]

Consumption: the tiny MoE GPT is trained here for a few steps and timed; the 350M model's
rate is derived from 6 * params FLOPs per token at 40% of an A100's 312 bf16 TFLOP/s
(the reference's hardware), and printed as such.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from raymoe.config import load_config  # noqa: E402
from raymoe.data.prepare import PrepareOptions, prepare  # noqa: E402
from raymoe.data.shards import PreparedDataset  # noqa: E402
from raymoe.data.stream import SequenceReader  # noqa: E402
from raymoe.data.text import decode_text, strip_gutenberg  # noqa: E402
from raymoe.data.tokenizers import gpt2_tokenizer  # noqa: E402
from raymoe.model import GPT  # noqa: E402

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "gutenberg"
A100_BF16_FLOPS, MFU = 312e12, 0.40


def pick_books(corpus: Path, max_bytes: int, into: Path) -> list[Path]:
    chosen, total = [], 0
    for book in sorted(corpus.rglob("*.txt")):
        if total >= max_bytes:
            break
        chosen.append(into / f"{len(chosen):04d}-{book.name}")
        shutil.copyfile(book, chosen[-1])
        total += book.stat().st_size
    return chosen


def plain_tokens_per_second(books: list[Path]) -> tuple[float, int]:
    tok = gpt2_tokenizer()
    start = time.perf_counter()
    texts = [strip_gutenberg(decode_text(b.read_bytes(), str(b))) for b in books]
    count = sum(len(ids) + 1 for ids in tok.encode_batch(texts))
    return count / (time.perf_counter() - start), count


def tiny_model_tokens_per_second() -> float:
    cfg = load_config("tiny-moe8")
    model = GPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.model.seq_len + 1))
    for i in range(6):
        if i == 1:
            start = time.perf_counter()
        model(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    return 5 * x[:, :-1].numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--max-mb", type=float, default=20)
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        books_dir = Path(tmp) / "books"
        books_dir.mkdir()
        books = pick_books(args.corpus, int(args.max_mb * 2**20), books_dir)
        corpus_mib = sum(b.stat().st_size for b in books) / 2**20
        plain_rate, plain_tokens = plain_tokens_per_second(books)
        start = time.perf_counter()
        manifest = prepare(PrepareOptions([str(books_dir)], f"{tmp}/prepared", seq_len=2048,
                                          val_fraction=0.0, docs_per_shard=2), log=lambda _: None)
        prepare_seconds = time.perf_counter() - start
        tokens = sum(s["tokens"] for s in manifest["splits"].values())
        assert tokens == plain_tokens, (tokens, plain_tokens)
        dataset = PreparedDataset.open(f"{tmp}/prepared")
        sequences = manifest["splits"]["train"]["sequences"]
        start = time.perf_counter()  # start-up of the Ray Data read included
        with SequenceReader(dataset, "train", 0, 1, seed=0) as reader:
            for _ in range(sequences // 8):
                reader.next_batch(8)
        stream_rate = sequences // 8 * 8 * 2049 / (time.perf_counter() - start)
    tiny_rate = tiny_model_tokens_per_second()
    params_350m = 355_919_872
    rate_350m = A100_BF16_FLOPS * MFU / (6 * params_350m)
    print(f"corpus: {len(books)} books, {corpus_mib:.1f} MiB, "
          f"{tokens:,} GPT-2 tokens; Ray with 4 logical CPUs on {torch.get_num_threads()} cores")
    print(f"prepare (Ray Data, read+clean+tokenize+pack+write): {tokens / prepare_seconds:,.0f} tokens/s")
    print(f"plain tokenizers encode_batch, one process:         {plain_rate:,.0f} tokens/s")
    print(f"prepare / plain tokenization ratio: {tokens / prepare_seconds / plain_rate:.3f}")
    print(f"streaming one epoch on one rank ({len(dataset.shards('train'))} shards; Ray Data read, "
          f"verify, shuffle; start-up included): {stream_rate:,.0f} tokens/s")
    print(f"tiny-moe8 training consumes here: {tiny_rate:,.0f} tokens/s -> "
          f"stream / consumption = {stream_rate / tiny_rate:.1f}")
    print(f"gpt-350m on one A100 at {MFU:.0%} MFU consumes {rate_350m:,.0f} tokens/s -> "
          f"stream / consumption = {stream_rate / rate_350m:.1f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
