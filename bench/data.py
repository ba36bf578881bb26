"""Data path at scale, measured here:

1. Read amplification (bytes read from storage / bytes of the shards trained on) of one
   epoch at 8 and at 128 ranks, simulated in one process: a synthetic dataset of random
   tokens at seq_len 2048, with the reference's global batch (512) and shuffle window
   (64 shards), and shard and row-group sizes scaled down together from the defaults (64 MiB
   and 256 KiB) so that one window fits this machine: what a lane reads per row group and
   per shard is the same fraction as at full size. Bytes are counted as the files return them.
2. The reader's start-up with a synthetic 1,000,000-shard shard table (300B tokens at
   about 150k sequences a shard would need 1M shards at the old 256 documents a shard).
3. Stream supply of one rank (of 128) against what 1.3B+MoE-128 consumes per GPU at the
   reference's 372 samples/s on 128 A100s.
4. The step time of tiny-moe8 on 2 Ray workers on the Austen books (bytes, seq 128,
   8,000-character documents, 128 KiB shards: many shards) against the bundled sample,
   and against the trainer stepping the same global batch in one process without Ray Train
   (on the same cores, the local Ray cluster up in both); skipped without ../shared/data.
5. `raymoe prepare` (Ray Data) against plain one-process tokenization of the same books;
   skipped without ../shared/data.

    python bench/data.py [--max-mb 5] [--steps 60]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from raymoe.config import load_config  # noqa: E402
from raymoe.data.prepare import PrepareOptions, prepare  # noqa: E402
from raymoe.data.schedule import Source, StreamPlan  # noqa: E402
from raymoe.data.shards import (  # noqa: E402
    FORMAT,
    MANIFEST,
    PreparedDataset,
    ShardTable,
    index_path,
    write_shard,
)
from raymoe.data.storage import Location  # noqa: E402
from raymoe.data.stream import SequenceReader  # noqa: E402
from raymoe.data.text import decode_text, strip_gutenberg  # noqa: E402
from raymoe.data.tokenizers import gpt2_tokenizer  # noqa: E402
from raymoe.runs import read_metrics  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
CORPUS = SHARED / "corpus" / "gutenberg"
SAMPLE = REPO / "raymoe" / "sample" / "corpus"
SEQ_LEN, GLOBAL_BATCH, WINDOW, VOCAB = 2048, 512, 64, 50257
SCALE = 16  # shard and row-group sizes divided by this (both, so their ratio holds)
REFERENCE_SAMPLES_PER_S, REFERENCE_GPUS = 372, 128  # 1.3B+MoE-128, DeepSpeed-MoE Table 2


class CountingReads(pafs.FileSystemHandler):
    """The local filesystem, counting every byte read from a file."""

    def __init__(self) -> None:
        self.local, self.bytes_read = pafs.LocalFileSystem(), 0

    def _open(self, path: str) -> pa.PythonFile:
        handler = self

        class Counted(io.FileIO):
            def read(self, size: int = -1) -> bytes:
                data = super().read(size)
                handler.bytes_read += len(data)
                return data

            def readinto(self, buffer) -> int:
                count = super().readinto(buffer) or 0
                handler.bytes_read += count
                return count

        return pa.PythonFile(Counted(path, "r"), mode="r")

    open_input_file = open_input_stream = _open

    def get_type_name(self) -> str:
        return "counting"

    def equals(self, other) -> bool:
        return other is self

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def normalize_path(self, path: str) -> str:
        return path

    def _read_only(self, *args):
        raise OSError("read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


def write_manifest(root: Path, shards: ShardTable, row_group_sequences: int) -> None:
    (root / "index").mkdir(parents=True, exist_ok=True)
    (root / index_path("train")).write_bytes(shards.encode())
    sequences = int(shards.sequences.sum())
    (root / MANIFEST).write_text(json.dumps({
        "format": FORMAT, "tokenizer": "gpt2", "vocab_size": VOCAB, "eot_id": VOCAB - 1,
        "seq_len": SEQ_LEN, "dtype": "uint16", "row_group_sequences": row_group_sequences,
        "splits": {"train": {"documents": 0, "tokens": sequences * (SEQ_LEN + 1),
                             "sequences": sequences, "dropped_tokens": 0, "shards": len(shards)}}}))


def synthetic_dataset(root: Path) -> PreparedDataset:
    """One shuffle window of random-token shards, sizes scaled down by SCALE."""
    width = SEQ_LEN + 1
    per_shard = 64 * 2**20 // SCALE // (2 * width)
    per_group = 256 * 2**10 // SCALE // (2 * width)
    rng = np.random.default_rng(0)
    listing = [write_shard(Location(pafs.LocalFileSystem(), str(root), str(root)), "train",
                           rng.integers(0, VOCAB, (per_shard, width), dtype=np.uint16), per_group)
               for _ in range(WINDOW)]
    write_manifest(root, ShardTable.of("train", listing), per_group)
    return PreparedDataset.open(str(root))


def read_amplification(root: Path, world: int) -> tuple[float, float]:
    """(bytes read / bytes trained on over one epoch, one rank's sequences per second)."""
    dataset = PreparedDataset.open(str(root))
    table = dataset.shards("train")
    plan = StreamPlan([Source("x", table.sequences, dataset.row_group_sequences)], [1.0],
                      GLOBAL_BATCH, seed=1, window=WINDOW)
    steps = plan.layout(0, 0).steps
    stored = sum((root / p).stat().st_size for p in table.paths())
    trained = steps * GLOBAL_BATCH / table.sequences.sum() * stored
    counter = CountingReads()
    location = Location(pafs.PyFileSystem(counter), str(root), str(root))
    per_rank = GLOBAL_BATCH // world
    rates = []
    for rank in range(world):
        reader = SequenceReader(PreparedDataset.open(location), "train", rank, world, GLOBAL_BATCH,
                                seed=1, window=WINDOW)
        started = time.perf_counter()
        for _ in range(steps):
            reader.next_batch(per_rank)
        rates.append(steps * per_rank / (time.perf_counter() - started))
        reader.close()  # it has read ahead at most 2 steps into the next epoch
    return counter.bytes_read / trained, float(np.median(rates))


def startup_seconds(root: Path, shards: int = 1_000_000) -> tuple[float, int]:
    """Reader start-up on a shard table of ``shards`` rows: open, read the table, plan the
    first step of rank 0 of 128 (no shard is read: the files do not exist)."""
    per_shard = 64 * 2**20 // (2 * (SEQ_LEN + 1))
    checksums = np.random.default_rng(0).integers(0, 256, (shards, 32), dtype=np.uint8)
    table = ShardTable("train", np.full(shards, per_shard, dtype=np.int64), checksums)
    write_manifest(root, table, 256 * 2**10 // (2 * (SEQ_LEN + 1)))
    started = time.perf_counter()
    dataset = PreparedDataset.open(str(root))
    loaded = dataset.shards("train")
    plan = StreamPlan([Source(dataset.uri, loaded.sequences, dataset.row_group_sequences)], [1.0],
                      GLOBAL_BATCH, seed=1, window=WINDOW)
    plan.reads(plan.start(), range(0, GLOBAL_BATCH // 128))
    return time.perf_counter() - started, (root / index_path("train")).stat().st_size


def step_seconds(metrics: Path) -> float:
    """Wall seconds per step between the first and the last logged step after warm-up."""
    rows = [r for r in read_metrics(str(metrics)) if "lm_loss" in r and r["step"] > 10]
    return (rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["step"] - rows[0]["step"])


def tiny_moe_config(data: Path, tmp: Path, name: str, steps: int, *extra: str):
    """tiny-moe8 on ``data`` for ``steps`` steps, logging every 10, no checkpoint or
    validation on the way, into ``tmp``/``name``."""
    return load_config("tiny-moe8", [
        f"data.path={data}", f"train.storage={tmp}", f"train.max_steps={steps}", "train.log_every=10",
        "train.checkpoint_every=100000", "train.eval_every=100000", f"train.run_name={name}", *extra])


def one_process_step_seconds(data: Path, tmp: Path, steps: int) -> float:
    """tiny-moe8's whole step (the global batch of 16: 2 micro-batches of 8) by the trainer
    in this process, without Ray Train, on the machine's cores (which the 2 workers share),
    while the same local Ray cluster is up as during the Ray runs (its own processes take
    CPU from training on 2 cores, one process or not)."""
    from raymoe.train.loop import FileHooks, Trainer

    cfg = tiny_moe_config(data, tmp, "one-process", steps, "parallel.num_workers=1")
    Trainer(cfg, FileHooks(tmp / "one-process", keep=1, rank=0), torch.device("cpu"),
            metrics_uri=tmp / "one-process" / "metrics", log=lambda _: None).run()
    return step_seconds(tmp / "one-process" / "metrics")


def ray_step_seconds(tmp: Path, steps: int) -> tuple[float, float, int, int]:
    """tiny-moe8's step on 2 Ray workers on the bundled sample and on the Austen books
    (prepared in ``tmp``/sample-bytes and ``tmp``/austen-bytes), and their shard counts."""
    from raymoe.train.launcher import train_on_ray

    results = []
    for name, corpus in (("sample", SAMPLE), ("austen", CORPUS / "Austen_Jane")):
        data = tmp / f"{name}-bytes"
        prepare(PrepareOptions([str(corpus)], str(data), tokenizer="bytes", seq_len=128,
                               val_fraction=0.05, doc_chars=8000, shard_bytes=128 * 2**10),
                log=lambda _: None)
        train_on_ray(tiny_moe_config(data, tmp, name, steps))
        results.append((step_seconds(tmp / name / "metrics"),
                        len(PreparedDataset.open(str(data)).shards("train"))))
    (sample, sample_shards), (austen, austen_shards) = results
    return sample, austen, sample_shards, austen_shards


def prepare_against_plain(tmp: Path, max_mb: float) -> None:
    books_dir = tmp / "books"
    books_dir.mkdir()
    books, total = [], 0
    for book in sorted(CORPUS.rglob("*.txt")):
        if total >= max_mb * 2**20:
            break
        books.append(books_dir / f"{len(books):04d}-{book.name}")
        shutil.copyfile(book, books[-1])
        total += book.stat().st_size
    tok = gpt2_tokenizer()
    started = time.perf_counter()
    texts = [strip_gutenberg(decode_text(b.read_bytes(), str(b))) for b in books]
    plain_tokens = sum(len(ids) + 1 for ids in tok.encode_batch(texts))
    plain_rate = plain_tokens / (time.perf_counter() - started)
    started = time.perf_counter()
    manifest = prepare(PrepareOptions([str(books_dir)], str(tmp / "prepared"), seq_len=2048,
                                      val_fraction=0.0), log=lambda _: None)
    rate = manifest["splits"]["train"]["tokens"] / (time.perf_counter() - started)
    assert manifest["splits"]["train"]["tokens"] == plain_tokens
    print(f"prepare ({len(books)} books, {total / 2**20:.1f} MiB, {plain_tokens:,} GPT-2 tokens; "
          f"Ray Data read+clean+tokenize+pack+write): {rate:,.0f} tokens/s; plain one-process "
          f"tokenization {plain_rate:,.0f} tokens/s; prepare / plain = {rate / plain_rate:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-mb", type=float, default=5)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        synthetic_dataset(tmp / "synthetic")
        table = PreparedDataset.open(str(tmp / "synthetic")).shards("train")
        print(f"synthetic window: {len(table)} shards of {table.sequences[0]:,} sequences "
              f"(seq_len {SEQ_LEN}, {64 / SCALE:g} MiB), row groups of {256 / SCALE:g} KiB; "
              f"global batch {GLOBAL_BATCH}, shuffle window {WINDOW}")
        rates = {}
        for world in (8, 128):
            amplification, rates[world] = read_amplification(tmp / "synthetic", world)
            print(f"read amplification at {world} ranks: {amplification:.3f}")
        shutil.rmtree(tmp / "synthetic")
        seconds, index_bytes = startup_seconds(tmp / "million")
        print(f"reader start-up with a 1,000,000-shard manifest ({index_bytes / 2**20:.1f} MiB "
              f"shard table): {seconds:.2f} s")
        need = REFERENCE_SAMPLES_PER_S / REFERENCE_GPUS
        print(f"stream supply of one rank of 128 (local disk, read+verify+shuffle): "
              f"{rates[128]:,.0f} sequences/s; 1.3B+MoE-128 consumes {need:.2f} per GPU -> "
              f"supply / consumption = {rates[128] / need:,.0f}")
        if not SHARED.is_dir():
            print(f"skipped: the Austen step time and prepare benchmarks need {SHARED}")
            return
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        sample, austen, sample_shards, austen_shards = ray_step_seconds(tmp, args.steps)
        single = one_process_step_seconds(tmp / "austen-bytes", tmp, args.steps)
        print(f"tiny-moe8 step on 2 Ray workers: bundled sample ({sample_shards} shards) {sample:.3f} s, "
              f"Austen ({austen_shards} shards) {austen:.3f} s -> Austen / sample = "
              f"{austen / sample:.2f}; one process (the whole batch, no Ray Train) {single:.3f} s -> "
              f"Austen on 2 Ray workers / one process = "
              f"{austen / single:.2f}")
        prepare_against_plain(tmp, args.max_mb)
        ray.shutdown()


if __name__ == "__main__":
    main()
