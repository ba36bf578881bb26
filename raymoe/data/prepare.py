"""``raymoe prepare``: raw text -> packed token shards, as a Ray Data pipeline.

files --flat_map--> documents --map_batches--> tokens + split --map_batches--> shards
(read, decode, strip          (tokenize in parallel; the      (pack each split into
 Gutenberg boilerplate)        split is a seeded hash of the    seq_len + 1 sequences,
                               document id)                     write one parquet shard)

Each shard-writing task returns the shard's metadata; the driver collects it and writes
manifest.json last, after deleting any earlier manifest, so a run that fails half-way
leaves no dataset that training could read.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from raymoe.data.shards import FORMAT, MANIFEST, SPLITS, DatasetError, encode_shard, sha256, token_dtype
from raymoe.data.storage import StorageError, locate
from raymoe.data.text import decode_text, strip_gutenberg
from raymoe.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer, tokenizer_from_json
from raymoe.errors import RaymoeError, find_cause

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")


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
    docs_per_shard: int = 256
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
    pieces, current, size = [], [], 0
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


def _pack_stage(batch: dict[str, np.ndarray], root: str, seq_len: int, dtype: str) -> dict[str, Any]:
    """Pack each split of this batch of documents into sequences and write one shard each."""
    rows: dict[str, list] = {k: [] for k in ("split", "path", "sequences", "sha256", "documents",
                                              "tokens", "dropped_tokens")}
    for split in SPLITS:
        chosen = [i for i, s in enumerate(batch["split"]) if s == split]
        if not chosen:
            continue
        stream = np.concatenate([np.asarray(batch["tokens"][i]) for i in chosen])
        count = len(stream) // (seq_len + 1)
        sequences = stream[:count * (seq_len + 1)].reshape(count, seq_len + 1).astype(dtype)
        digest = hashlib.sha1("\n".join(str(batch["doc_id"][i]) for i in chosen).encode())
        path = str(PurePosixPath(split) / f"{digest.hexdigest()[:20]}.parquet")
        data = encode_shard(sequences)
        if count:
            locate(root).join(*path.split("/")).write_bytes(data)
        for key, value in (("split", split), ("path", path), ("sequences", count),
                           ("sha256", sha256(data)), ("documents", len(chosen)),
                           ("tokens", len(stream)), ("dropped_tokens", len(stream) - count * (seq_len + 1))):
            rows[key].append(value)
    return {k: np.array(v) for k, v in rows.items()}


# ---------------------------------------------------------------------------- driver


def prepare(options: PrepareOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the pipeline on the current Ray cluster; returns the manifest written."""
    import ray

    if options.seq_len < 1:
        raise PrepareError(f"seq_len={options.seq_len}: must be >= 1")
    if not 0.0 <= options.val_fraction < 1.0:
        raise PrepareError(f"val_fraction={options.val_fraction}: must be in [0, 1)")
    files = list_inputs(options.inputs)
    tokenizer = load_tokenizer(options.tokenizer)
    json_text = None if options.tokenizer in ("gpt2", "bytes") else locate(options.tokenizer).read_bytes().decode()
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

    ray.data.DataContext.get_current().raise_original_map_exception = True  # keep our errors
    ds = ray.data.from_items([{"uri": f} for f in files], override_num_blocks=min(len(files), 256))
    ds = ds.flat_map(_documents_stage, fn_kwargs={"text_field": options.text_field,
                                                  "doc_chars": options.doc_chars})
    ds = ds.map_batches(_tokenize_stage, batch_size=4, batch_format="numpy",
                        fn_kwargs={"spec": tokenizer.spec, "json_text": json_text,
                                   "seed": options.seed, "val_fraction": options.val_fraction})
    ds = ds.map_batches(_pack_stage, batch_size=options.docs_per_shard, batch_format="numpy",
                        fn_kwargs={"root": options.output, "seq_len": options.seq_len,
                                   "dtype": dtype.name})
    totals = {split: {"documents": 0, "tokens": 0, "sequences": 0, "dropped_tokens": 0,
                      "shards": []} for split in SPLITS}
    started = time.monotonic()
    try:
        for row in ds.iter_rows():
            split = totals[str(row["split"])]
            for key in ("documents", "tokens", "sequences", "dropped_tokens"):
                split[key] += int(row[key])
            if int(row["sequences"]):
                split["shards"].append({"path": str(row["path"]), "sequences": int(row["sequences"]),
                                        "sha256": str(row["sha256"])})
            _progress(totals, started)
    except Exception as err:  # a task's error arrives wrapped by Ray: keep its message
        cause = find_cause(err, (PrepareError, StorageError, DatasetError)) or err
        raise PrepareError(f"prepare failed, no manifest written: {cause}") from err
    sys.stderr.write("\n")
    for split in totals.values():
        split["shards"].sort(key=lambda s: s["path"])
    if not totals["train"]["sequences"]:
        raise PrepareError(f"no training sequence of {options.seq_len + 1} tokens could be packed "
                           f"from {len(files)} files; no manifest written")
    manifest = {"format": FORMAT, "tokenizer": TOKENIZER_FILE if json_text else tokenizer.spec,
                "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                "seq_len": options.seq_len, "dtype": dtype.name, "seed": options.seed,
                "val_fraction": options.val_fraction, "doc_chars": options.doc_chars,
                "inputs": list(options.inputs),
                "splits": totals, **options.extra}
    manifest_file.write_bytes(json.dumps(manifest, indent=1).encode())
    for name, split in totals.items():
        log(f"{name}: {split['documents']:,} documents, {split['tokens']:,} tokens, "
            f"{split['sequences']:,} sequences in {len(split['shards'])} shards")
    log(f"wrote {root.join(MANIFEST).uri}")
    return manifest


def _progress(totals: dict[str, dict[str, Any]], started: float) -> None:
    docs = sum(s["documents"] for s in totals.values())
    tokens = sum(s["tokens"] for s in totals.values())
    rate = tokens / max(time.monotonic() - started, 1e-9)
    sys.stderr.write(f"\rprepare: {docs:,} documents, {tokens:,} tokens ({rate:,.0f} tokens/s)")
    sys.stderr.flush()
