"""The prepared dataset on disk or S3: packed token shards and the manifest that lists them.

  manifest.json            written last; without it the directory is not a dataset
  tokenizer.json           when the tokenizer is a trained BPE (self-contained dataset)
  train/<id>.parquet       column "tokens": fixed-size lists of seq_len + 1 token ids
  validation/<id>.parquet

The manifest holds the tokenizer, seq_len, dtype, per split the document, token and
sequence counts, and per shard its sequence count and SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymoe.data.storage import Location, locate
from raymoe.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer, tokenizer_from_json
from raymoe.errors import RaymoeError

FORMAT = "raymoe-dataset/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")


class DatasetError(RaymoeError, ValueError):
    """A prepared dataset is missing, incomplete or corrupt; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_shard(sequences: np.ndarray) -> bytes:
    """(n, seq_len + 1) token array -> parquet bytes with one fixed-size list column."""
    n, width = sequences.shape
    values = pa.array(sequences.reshape(-1), type=pa.from_numpy_dtype(sequences.dtype))
    table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(values, width)})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def decode_shard(data: bytes, name: str, width: int, dtype: np.dtype) -> np.ndarray:
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"shard {name}: not a readable parquet file: {err}") from err
    expected = pa.list_(pa.from_numpy_dtype(dtype), width)
    if table.schema.names != ["tokens"] or table.schema.field("tokens").type != expected:
        raise DatasetError(f"shard {name}: schema {table.schema.to_string(show_schema_metadata=False)!r}"
                           f" does not match the manifest (tokens: {expected})")
    column = table.column("tokens").combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, width)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    path: str
    """Relative to the dataset root."""
    sequences: int
    sha256: str


class PreparedDataset:
    """A dataset written by ``raymoe prepare``, opened from its manifest."""

    def __init__(self, root: Location, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, uri: str) -> PreparedDataset:
        root = locate(uri)
        manifest_file = root.join(MANIFEST)
        if not manifest_file.exists():
            raise DatasetError(f"{uri}: no {MANIFEST}; not a prepared dataset, or its "
                               "preparation did not finish")
        manifest = json.loads(manifest_file.read_bytes())
        if manifest.get("format") != FORMAT:
            raise DatasetError(f"{uri}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        return cls(root, manifest)

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.manifest["splits"]:
            raise DatasetError(f"{self.root.uri}: no split {split!r} (has {list(self.manifest['splits'])})")
        return [ShardInfo(**s) for s in self.manifest["splits"][split]["shards"]]

    def tokenizer(self) -> Tokenizer:
        spec = self.manifest["tokenizer"]
        if spec == TOKENIZER_FILE:
            return tokenizer_from_json(self.root.join(spec).read_bytes().decode())
        return load_tokenizer(spec)

    def read_shard(self, shard: ShardInfo) -> np.ndarray:
        """Verified sequences of one shard: checksum, schema, count and token range."""
        data = self.root.join(shard.path).read_bytes()
        name = self.root.join(shard.path).uri
        if sha256(data) != shard.sha256:
            raise DatasetError(f"shard {name}: checksum does not match the manifest "
                               "(corrupt or replaced)")
        sequences = decode_shard(data, name, self.seq_len + 1, self.dtype)
        if len(sequences) != shard.sequences:
            raise DatasetError(f"shard {name}: {len(sequences)} sequences, the manifest says "
                               f"{shard.sequences}")
        if sequences.size and int(sequences.max()) >= self.vocab_size:
            raise DatasetError(f"shard {name}: token id {int(sequences.max())} is outside the "
                               f"vocabulary [0, {self.vocab_size})")
        return sequences
