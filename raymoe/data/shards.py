"""The prepared dataset on disk or S3: packed token shards, their index and the manifest.

  manifest.json            written last; without it the directory is not a dataset
  index/<split>.parquet    the shard table: sequences and checksum, one row per shard
  tokenizer.json           when the tokenizer is a trained BPE (self-contained dataset)
  train/<id>.parquet       column "tokens": fixed-size lists of seq_len + 1 token ids,
  validation/<id>.parquet  in row groups of ``row_group_sequences`` sequences

The manifest holds the tokenizer, seq_len, dtype and per split the document, token and
sequence counts; it stays a few hundred bytes at any dataset size. The shard table is
parquet because at 300B tokens it may have a million rows: read once per reader, 40 bytes
a shard; a shard's file is named by its checksum. A shard's footer lists the SHA-256 of each row group's tokens and the
table holds the SHA-256 of that list, so a reader can fetch and verify one row group of
a shard without reading the rest of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymoe.data.storage import Location, StorageError, locate
from raymoe.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer, tokenizer_from_json
from raymoe.errors import RaymoeError, TransientError, may_pass

FORMAT = "raymoe-dataset/2"
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
ROW_GROUP_DIGESTS = b"raymoe.row_group_sha256"


class DatasetError(RaymoeError, ValueError):
    """A prepared dataset is missing, incomplete or corrupt; the message names the file."""


class DatasetUnavailable(DatasetError, TransientError):
    """A dataset's file could not be read for a reason that may pass (storage unreachable,
    throttled, a reset connection)."""


def _unreadable(err: BaseException) -> type[DatasetError]:
    return DatasetUnavailable if isinstance(err, OSError) and may_pass(err) else DatasetError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def index_path(split: str) -> str:
    return f"index/{split}.parquet"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_shard(sequences: np.ndarray, row_group_sequences: int) -> tuple[bytes, str]:
    """(n, seq_len + 1) token array -> (parquet bytes, checksum for the shard table)."""
    n, width = sequences.shape
    digests = [sha256(np.ascontiguousarray(sequences[i:i + row_group_sequences]).tobytes())
               for i in range(0, n, row_group_sequences)]
    listing = json.dumps(digests).encode()
    values = pa.array(sequences.reshape(-1), type=pa.from_numpy_dtype(sequences.dtype))
    table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(values, width)})
    table = table.replace_schema_metadata({ROW_GROUP_DIGESTS: listing})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_sequences)
    return sink.getvalue(), sha256(listing)


@dataclass(frozen=True)
class ShardInfo:
    path: str
    """Relative to the dataset root."""
    sequences: int
    checksum: str
    """SHA-256 of the shard's list of row-group digests."""


@dataclass(frozen=True)
class ShardTable:
    """One split's shards as two columns: sequence counts and checksums (the path is named by
    the checksum). A million shards are 40 MB of arrays, not a million objects."""

    split: str
    sequences: np.ndarray
    """int64 per shard."""
    checksums: np.ndarray
    """(shards, 32) uint8: the SHA-256 of each shard's row-group digests."""

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> ShardInfo:
        checksum = bytes(self.checksums[i]).hex()
        return ShardInfo(shard_path(self.split, checksum), int(self.sequences[i]), checksum)

    def paths(self) -> list[str]:
        return [self[i].path for i in range(len(self))]

    def encode(self) -> bytes:
        checksums = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(32), len(self), [None, pa.py_buffer(np.ascontiguousarray(self.checksums))])
        table = pa.table({"sequences": pa.array(self.sequences, pa.int64()), "checksum": checksums})
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        return sink.getvalue()

    @classmethod
    def decode(cls, split: str, data: bytes, name: str) -> ShardTable:
        try:
            table = pq.read_table(io.BytesIO(data), use_threads=False)
            checksums = table.column("checksum").combine_chunks()
            if checksums.type != pa.binary(32):
                raise KeyError(f"checksum column of type {checksums.type}")
            digests = np.frombuffer(checksums.buffers()[1], dtype=np.uint8,
                                    count=32 * len(checksums), offset=32 * checksums.offset)
            return cls(split, table.column("sequences").to_numpy().astype(np.int64),
                       digests.reshape(-1, 32))
        except (pa.ArrowInvalid, OSError, KeyError) as err:
            raise DatasetError(f"{name}: not a readable shard table: {err}") from err

    @classmethod
    def of(cls, split: str, shards: list[ShardInfo]) -> ShardTable:
        checksums = np.array([np.frombuffer(bytes.fromhex(s.checksum), np.uint8) for s in shards],
                             dtype=np.uint8).reshape(-1, 32)
        return cls(split, np.array([s.sequences for s in shards], dtype=np.int64), checksums)


def shard_path(split: str, checksum: str) -> str:
    return f"{split}/{checksum[:24]}.parquet"


def _read_footer(source: pa.NativeFile) -> pq.FileMetaData:
    """A parquet file's metadata from exactly its footer bytes. pyarrow's own open reads the
    last 64 KiB whatever the footer's size: for a rank that needs a few row groups of a shard
    that is most of what it would read."""
    size = source.size()
    tail = source.read_at(8, size - 8)
    if size < 12 or tail[4:] != b"PAR1":
        raise ValueError("no parquet footer")
    length = struct.unpack("<I", tail[:4])[0]
    footer = source.read_at(length, size - 8 - length)
    return pq.read_metadata(pa.BufferReader(b"PAR1" + footer + tail))


class ShardFile:
    """One shard opened for row-group reads: its footer is read and checked once."""

    def __init__(self, root: Location, shard: ShardInfo, width: int, dtype: np.dtype,
                 vocab_size: int):
        self.location = root.join(*shard.path.split("/"))
        self.name, self.width, self.dtype, self.vocab_size = self.location.uri, width, dtype, vocab_size
        try:
            source = self.location.fs.open_input_file(self.location.path)
            self.file = pq.ParquetFile(source, metadata=_read_footer(source))
        except FileNotFoundError as err:
            raise DatasetError(f"shard {self.name}: missing") from err
        except (pa.ArrowInvalid, OSError, ValueError) as err:
            raise _unreadable(err)(f"shard {self.name}: not a readable parquet file: {err}") from err
        listing = (self.file.schema_arrow.metadata or {}).get(ROW_GROUP_DIGESTS, b"")
        if sha256(listing) != shard.checksum:
            raise DatasetError(f"shard {self.name}: checksum does not match the shard table "
                               "(corrupt or replaced)")
        self.digests: list[str] = json.loads(listing)
        expected = pa.list_(pa.from_numpy_dtype(dtype), width)
        schema = self.file.schema_arrow
        if schema.names != ["tokens"] or schema.field("tokens").type != expected:
            raise DatasetError(f"shard {self.name}: schema {schema.remove_metadata().to_string()!r}"
                               f" does not match the manifest (tokens: {expected})")
        if self.file.metadata.num_rows != shard.sequences or len(self.digests) != self.file.num_row_groups:
            raise DatasetError(f"shard {self.name}: {self.file.metadata.num_rows} sequences in "
                               f"{self.file.num_row_groups} row groups, the shard table says "
                               f"{shard.sequences}")

    def read_row_group(self, index: int) -> np.ndarray:
        """Verified sequences of one row group: checksum and token range."""
        try:
            column = self.file.read_row_group(index).column("tokens").combine_chunks()
            rows = column.values.to_numpy(zero_copy_only=False).reshape(-1, self.width)
        except (pa.ArrowInvalid, OSError) as err:
            raise _unreadable(err)(f"shard {self.name}: row group {index} cannot be decoded, checksum "
                               f"does not match (corrupt or replaced): {err}") from err
        if sha256(np.ascontiguousarray(rows).tobytes()) != self.digests[index]:
            raise DatasetError(f"shard {self.name}: row group {index}: checksum does not match "
                               "(corrupt or replaced)")
        if rows.size and int(rows.max()) >= self.vocab_size:
            raise DatasetError(f"shard {self.name}: token id {int(rows.max())} is outside the "
                               f"vocabulary [0, {self.vocab_size})")
        return rows

    def close(self) -> None:
        self.file.close()


class PreparedDataset:
    """A dataset written by ``raymoe prepare``, opened from its manifest (read once)."""

    def __init__(self, root: Location, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self._tables: dict[str, ShardTable] = {}

    @classmethod
    def open(cls, where: str | Location) -> PreparedDataset:
        root = locate(where) if isinstance(where, str) else where
        manifest_file = root.join(MANIFEST)
        try:
            data = manifest_file.read_bytes()
        except StorageError as err:
            if isinstance(err.__cause__, FileNotFoundError):
                raise DatasetError(f"{root.uri}: no {MANIFEST}; not a prepared dataset, or its "
                                   "preparation did not finish") from err
            raise DatasetError(str(err)) from err
        manifest = json.loads(data)
        if manifest.get("format") != FORMAT:
            raise DatasetError(f"{root.uri}: format {manifest.get('format')!r}, expected {FORMAT!r}"
                               " (prepare it again with this version)")
        return cls(root, manifest)

    @property
    def uri(self) -> str:
        return self.root.uri

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def row_group_sequences(self) -> int:
        return self.manifest["row_group_sequences"]

    def shards(self, split: str) -> ShardTable:
        """The split's shard table, read on first use."""
        if split not in self.manifest["splits"]:
            raise DatasetError(f"{self.root.uri}: no split {split!r} (has {list(self.manifest['splits'])})")
        if split not in self._tables:
            location = self.root.join(*index_path(split).split("/"))
            self._tables[split] = ShardTable.decode(split, location.read_bytes(), location.uri)
        return self._tables[split]

    def open_shard(self, shard: ShardInfo) -> ShardFile:
        return ShardFile(self.root, shard, self.seq_len + 1, self.dtype, self.vocab_size)

    def tokenizer(self) -> Tokenizer:
        spec = self.manifest["tokenizer"]
        if spec == TOKENIZER_FILE:
            return tokenizer_from_json(self.root.join(spec).read_bytes().decode())
        return load_tokenizer(spec)

    def read_shard(self, shard: ShardInfo) -> np.ndarray:
        """All verified sequences of one shard, in stored order."""
        file = self.open_shard(shard)
        try:
            rows = [file.read_row_group(i) for i in range(file.file.num_row_groups)]
        finally:
            file.close()
        return np.concatenate(rows) if rows else np.zeros((0, self.seq_len + 1), self.dtype)


def write_shard(root: Location, split: str, sequences: np.ndarray,
                row_group_sequences: int) -> ShardInfo:
    """Write one shard (a whole-object write, named by its content) and return its row of
    the shard table."""
    data, checksum = encode_shard(sequences, row_group_sequences)
    path = shard_path(split, checksum)
    root.join(*path.split("/")).write_bytes(data)
    return ShardInfo(path, len(sequences), checksum)
