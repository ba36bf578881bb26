"""``raymoe prepare``: raw text -> packed token shards, as a Ray Data pipeline.

files --flat_map--> documents --map_batches--> tokens + split --map_batches--> sequences
(read, decode, strip          (tokenize in parallel; the       (pack a batch's training
 Gutenberg boilerplate)        split is a seeded hash of the     documents into seq_len + 1
                               document id)                      sequences)
      --map_batches--> shards
      (write each run of ``shard_sequences`` training sequences as one shard)

A batch's training documents rarely end on a sequence boundary, and the validation
documents (0.5% of them) are far fewer than a sequence per batch: packing each batch on its
own would throw the ends away, most of the validation split with them. So what a batch
cannot pack (its training tail, its validation documents) goes to the driver, in order,
and the driver packs each split across batches: only the last partial sequence of a split
is dropped. The driver carries the validation split and a tail per batch, about 0.5% of the
tokens; the training shards are written by the tasks.

The driver writes the shard tables and then manifest.json, after deleting any earlier
manifest, so a run that fails half-way leaves no dataset that training could read.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from raymoe.data.shards import (
    FORMAT,
    MANIFEST,
    SPLITS,
    DatasetError,
    ShardInfo,
    ShardTable,
    index_path,
    token_dtype,
    write_shard,
)
from raymoe.data.storage import Location, StorageError, locate
from raymoe.data.text import decode_text, strip_gutenberg
from raymoe.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer, tokenizer_from_json
from raymoe.errors import RaymoeError, find_cause

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
PACK_DOCUMENTS = 256
"""Documents a task packs together; what does not fill a sequence goes to the driver."""


class PrepareError(RaymoeError, ValueError):
    """Bad input to prepare; the message names the file or bucket."""


@dataclass
class PrepareOptions:
    inputs: list[str]
    output: str
    tokenizer: str = "gpt2"
    seq_len: int = 2048
    val_fraction: float = 0.005
    seed: int = 1234
    text_field: str = "text"
    doc_chars: int = 0
    """Split long texts into documents of about this many characters at paragraph breaks
    (0: one document per text). Small corpora need it for a document-level validation split."""
    shard_bytes: int = 64 * 2**20
    """Target shard size: this many bytes of tokens (before compression) per shard."""
    row_group_bytes: int = 256 * 2**10
    """Bytes of tokens per row group, the unit a reader fetches: small enough that a rank
    reads little it does not train on, large enough to be one efficient S3 request."""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- documents


def list_inputs(inputs: list[str]) -> list[str]:
    """Every input file (txt, jsonl, parquet) under the given paths or s3:// prefixes."""
    if not inputs:
        raise PrepareError("no input given: expected paths or s3:// URIs of .txt, .jsonl or "
                           ".parquet files, or directories of them")
    files: list[str] = []
    for uri in inputs:
        try:
            found = [f.uri for f in locate(uri).list_files()]
        except StorageError as err:
            raise PrepareError(str(err)) from err
        matching = [f for f in found if f.endswith(INPUT_SUFFIXES)]
        if not matching:
            raise PrepareError(f"{uri}: no .txt, .jsonl or .parquet files found "
                               f"({len(found)} other files)")
        files.extend(matching)
    return files


def split_text(text: str, doc_chars: int) -> list[str]:
    """Pieces of about doc_chars characters, cut at paragraph breaks (0: the whole text)."""
    if doc_chars <= 0 or len(text) <= doc_chars:
        return [text]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        if current and size + len(paragraph) > doc_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def read_documents(uri: str, text_field: str, doc_chars: int) -> list[tuple[str, str]]:
    """(document id, text) of one input file; a clear error for anything not text."""
    data = locate(uri).read_bytes()
    if not data.strip():
        raise PrepareError(f"{uri}: empty file")
    if uri.endswith(".txt"):
        texts = [(uri, strip_gutenberg(decode_text(data, uri)))]
    elif uri.endswith(".jsonl"):
        texts = list(_jsonl_texts(uri, data, text_field))
    else:
        texts = list(_parquet_texts(uri, data, text_field))
    docs = []
    for doc_id, text in texts:
        for i, piece in enumerate(split_text(text, doc_chars)):
            if piece.strip():
                docs.append((f"{doc_id}#{i}", piece))
    if not docs:
        raise PrepareError(f"{uri}: no text in it")
    return docs


def _jsonl_texts(uri: str, data: bytes, text_field: str) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(decode_text(data, uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PrepareError(f"{uri}: line {number} is not JSON: {err}") from err
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise PrepareError(f"{uri}: line {number} has no string field {text_field!r}")
        yield f"{uri}:{number}", record[text_field]


def _parquet_texts(uri: str, data: bytes, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as err:
        raise PrepareError(f"{uri}: not a readable parquet file: {err}") from err
    if text_field not in table.column_names:
        raise PrepareError(f"{uri}: no column {text_field!r} (columns: {table.column_names})")
    for row, text in enumerate(table.column(text_field).to_pylist()):
        if text:
            yield f"{uri}:{row}", str(text)


def is_validation(doc_id: str, seed: int, val_fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


# ---------------------------------------------------------------------------- Ray stages

_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(spec: str, json_text: str | None) -> Tokenizer:
    if spec not in _TOKENIZERS:
        _TOKENIZERS[spec] = tokenizer_from_json(json_text) if json_text else load_tokenizer(spec)
    return _TOKENIZERS[spec]


def _documents_stage(row: dict[str, Any], text_field: str, doc_chars: int) -> list[dict[str, Any]]:
    return [{"doc_id": doc_id, "text": text}
            for doc_id, text in read_documents(row["uri"], text_field, doc_chars)]


def _tokenize_stage(batch: dict[str, np.ndarray], spec: str, json_text: str | None, seed: int,
                    val_fraction: float) -> dict[str, Any]:
    tokenizer = _tokenizer(spec, json_text)
    ids = tokenizer.encode_batch([str(t) for t in batch["text"]])
    tokens = np.empty(len(ids), dtype=object)
    for i, doc in enumerate(ids):
        tokens[i] = np.asarray(doc + [tokenizer.eot_id], dtype=np.int64)
    splits = ["validation" if is_validation(str(d), seed, val_fraction) else "train"
              for d in batch["doc_id"]]
    return {"doc_id": batch["doc_id"], "split": np.array(splits), "tokens": tokens}


def _pack_stage(batch: dict[str, np.ndarray], seq_len: int, dtype: str) -> dict[str, Any]:
    """Full training sequences of this batch as rows, plus one row per split for the driver:
    the training tail, or the validation documents, with the split's counts."""
    rows: dict[str, list] = {k: [] for k in ("kind", "split", "tokens", "documents", "token_count")}

    def add(kind: str, split: str, tokens: np.ndarray, documents: int = 0, count: int = 0) -> None:
        for key, value in (("kind", kind), ("split", split), ("tokens", tokens.astype(dtype)),
                           ("documents", documents), ("token_count", count)):
            rows[key].append(value)

    for split in SPLITS:
        chosen = [np.asarray(batch["tokens"][i]) for i, s in enumerate(batch["split"]) if s == split]
        if not chosen:
            continue
        stream = np.concatenate(chosen)
        full = len(stream) // (seq_len + 1) * (seq_len + 1) if split == "train" else 0
        for sequence in stream[:full].reshape(-1, seq_len + 1):
            add("sequence", split, sequence)
        add("leftover", split, stream[full:], len(chosen), len(stream))
    return {k: _column(v) for k, v in rows.items()}


def _write_stage(batch: dict[str, np.ndarray], root: str, row_group_sequences: int) -> dict[str, Any]:
    """Write this batch's training sequences as one shard; pass the leftovers through."""
    rows: dict[str, list] = {k: [] for k in ("kind", "split", "tokens", "documents", "token_count",
                                              "path", "sequences", "checksum")}

    def add(kind: str, split: str, tokens: np.ndarray, documents: int, count: int,
            shard: ShardInfo | None = None) -> None:
        values = (kind, split, tokens, documents, count, shard.path if shard else "",
                  shard.sequences if shard else 0, shard.checksum if shard else "")
        for key, value in zip(rows, values, strict=True):
            rows[key].append(value)

    kinds, tokens = batch["kind"], list(batch["tokens"])
    sequences = [t for k, t in zip(kinds, tokens, strict=True) if k == "sequence"]
    if sequences:
        shard = write_shard(locate(root), "train", np.stack(sequences), row_group_sequences)
        add("shard", "train", tokens[0][:0], 0, 0, shard)
    for i in np.flatnonzero(kinds == "leftover"):
        add("leftover", str(batch["split"][i]), tokens[i], int(batch["documents"][i]),
            int(batch["token_count"][i]))
    return {k: _column(v) for k, v in rows.items()}


def _column(values: list) -> np.ndarray:
    """A batch column; token arrays of different lengths as an object array."""
    if values and isinstance(values[0], np.ndarray):
        column = np.empty(len(values), dtype=object)
        column[:] = values
        return column
    return np.array(values)


class SplitPacker:
    """Packs one split's token stream, as it arrives, into shards of ``shard_sequences``."""

    def __init__(self, root: Location, split: str, seq_len: int, shard_sequences: int,
                 row_group_sequences: int):
        self.root, self.split, self.width = root, split, seq_len + 1
        self.shard_sequences, self.row_group_sequences = shard_sequences, row_group_sequences
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[ShardInfo] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        if self.pending_tokens >= self.shard_sequences * self.width:
            self._write(self.shard_sequences)

    def finish(self) -> int:
        """Write what is left as a last shard; returns the tokens dropped (< seq_len + 1)."""
        self._write(self.pending_tokens // self.width)
        return self.pending_tokens

    def _write(self, count: int) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0)
        if count:
            sequences = stream[:count * self.width].reshape(count, self.width)
            self.shards.append(write_shard(self.root, self.split, sequences, self.row_group_sequences))
        self.pending = [stream[count * self.width:]]
        self.pending_tokens = len(self.pending[0])


# ---------------------------------------------------------------------------- driver


def prepare(options: PrepareOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the pipeline on the current Ray cluster; returns the manifest written."""
    import ray

    if options.seq_len < 1:
        raise PrepareError(f"seq_len={options.seq_len}: must be >= 1")
    for key in ("shard_bytes", "row_group_bytes"):
        if getattr(options, key) < 1:
            raise PrepareError(f"{key}={getattr(options, key)}: must be >= 1")
    if not 0.0 <= options.val_fraction < 1.0:
        raise PrepareError(f"val_fraction={options.val_fraction}: must be in [0, 1)")
    files = list_inputs(options.inputs)
    tokenizer = load_tokenizer(options.tokenizer)
    json_text = (None if options.tokenizer in ("gpt2", "bytes")
                 else locate(options.tokenizer).read_bytes().decode())
    root = locate(options.output)
    manifest_file = root.join(MANIFEST)
    try:
        if manifest_file.exists():
            manifest_file.delete()  # a failure below must not leave the old manifest pointing here
        if json_text:
            root.join(TOKENIZER_FILE).write_bytes(json_text.encode())
    except StorageError as err:
        raise PrepareError(str(err)) from err
    dtype = token_dtype(tokenizer.vocab_size)
    width = options.seq_len + 1
    shard_sequences = max(1, options.shard_bytes // (width * dtype.itemsize))
    row_group_sequences = max(1, min(shard_sequences, options.row_group_bytes // (width * dtype.itemsize)))

    ctx = ray.data.DataContext.get_current()
    ctx.raise_original_map_exception = True  # keep our errors
    ctx.execution_options.preserve_order = True  # leftovers arrive in a reproducible order
    ds: ray.data.Dataset = ray.data.from_items([{"uri": f} for f in files],
                                               override_num_blocks=min(len(files), 256))
    ds = ds.flat_map(partial(_documents_stage, text_field=options.text_field, doc_chars=options.doc_chars))
    ds = ds.map_batches(partial(_tokenize_stage, spec=tokenizer.spec, json_text=json_text,
                                seed=options.seed, val_fraction=options.val_fraction),
                        batch_size=4, batch_format="numpy")
    ds = ds.map_batches(partial(_pack_stage, seq_len=options.seq_len, dtype=dtype.name),
                        batch_size=PACK_DOCUMENTS, batch_format="numpy")
    ds = ds.map_batches(partial(_write_stage, root=options.output, row_group_sequences=row_group_sequences),
                        batch_size=shard_sequences, batch_format="numpy")
    totals = {split: {"documents": 0, "tokens": 0, "sequences": 0, "dropped_tokens": 0}
              for split in SPLITS}
    packers = {split: SplitPacker(root, split, options.seq_len, shard_sequences, row_group_sequences)
               for split in SPLITS}
    shards: dict[str, list[ShardInfo]] = {split: [] for split in SPLITS}
    started = time.monotonic()
    try:
        for row in ds.iter_rows():
            split = str(row["split"])
            if row["kind"] == "shard":
                shards[split].append(ShardInfo(str(row["path"]), int(row["sequences"]),
                                               str(row["checksum"])))
                continue
            totals[split]["documents"] += int(row["documents"])
            totals[split]["tokens"] += int(row["token_count"])
            packers[split].add(np.asarray(row["tokens"]))
            _progress(totals, started)
        for split, packer in packers.items():
            totals[split]["dropped_tokens"] = packer.finish()
            shards[split] += packer.shards
    except Exception as err:  # a task's error arrives wrapped by Ray: keep its message
        cause = find_cause(err, (PrepareError, StorageError, DatasetError)) or err
        raise PrepareError(f"prepare failed, no manifest written: {cause}") from err
    sys.stderr.write("\n")
    for split, listing in shards.items():
        listing.sort(key=lambda s: s.path)
        totals[split].update(sequences=sum(s.sequences for s in listing), shards=len(listing))
        root.join(*index_path(split).split("/")).write_bytes(ShardTable.of(split, listing).encode())
    if not totals["train"]["sequences"]:
        raise PrepareError(f"no training sequence of {options.seq_len + 1} tokens could be packed "
                           f"from {len(files)} files; no manifest written")
    manifest = {"format": FORMAT, "tokenizer": TOKENIZER_FILE if json_text else tokenizer.spec,
                "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                "seq_len": options.seq_len, "dtype": dtype.name, "seed": options.seed,
                "val_fraction": options.val_fraction, "doc_chars": options.doc_chars,
                "row_group_sequences": row_group_sequences, "inputs": list(options.inputs),
                "splits": totals, **options.extra}
    manifest_file.write_bytes(json.dumps(manifest, indent=1).encode())
    for name, counts in totals.items():
        log(f"{name}: {counts['documents']:,} documents, {counts['tokens']:,} tokens, "
            f"{counts['sequences']:,} sequences in {counts['shards']} shards")
    log(f"wrote {root.join(MANIFEST).uri}")
    return manifest


def _progress(totals: dict[str, dict[str, Any]], started: float) -> None:
    docs = sum(s["documents"] for s in totals.values())
    tokens = sum(s["tokens"] for s in totals.values())
    rate = tokens / max(time.monotonic() - started, 1e-9)
    sys.stderr.write(f"\rprepare: {docs:,} documents, {tokens:,} tokens ({rate:,.0f} tokens/s)")
    sys.stderr.flush()
