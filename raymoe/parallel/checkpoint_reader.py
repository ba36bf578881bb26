"""Reading a checkpoint where it lies (a local directory or s3://), only the bytes a rank needs.

DCP's FileSystemReader plans which stored items each rank needs and reads them file by
file; here it reads through a pyarrow filesystem, each item with one ranged read (an S3
GET with a Range header), so a rank fetches the dense items, the block of experts its EP
rank holds and nothing else: no rank downloads the whole checkpoint. Every byte read is
counted, for the per-rank figures the trainer prints.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Generator
from contextlib import contextmanager
from typing import IO, Any, cast

import pyarrow.fs as pafs
from torch.distributed.checkpoint import FileSystemReader, Metadata
from torch.distributed.checkpoint.filesystem import FileSystemBase
from torch.distributed.checkpoint.metadata import StorageMeta

from raymoe.data.storage import Location

DCP_METADATA = ".metadata"
"""DCP's global metadata file (the index of every stored item: file, offset, length)."""


class ByteCount:
    """Bytes read from one checkpoint by this process."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, data: bytes) -> bytes:
        self.total += len(data)
        return data


class ArrowFileSystem(FileSystemBase):
    """DCP's filesystem interface over a pyarrow filesystem (paths without a scheme), for
    reading: checkpoints are written by DCP's own writer into a local staging directory."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        if mode != "rb":
            raise _read_only()
        with self.fs.open_input_file(os.fspath(path)) as f:
            yield cast(io.IOBase, f)

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return f"{os.fspath(path).rstrip('/')}/{suffix}"

    def init_path(self, path: str | os.PathLike) -> str:
        return os.fspath(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False  # always given explicitly, never guessed from a checkpoint_id

    def exists(self, path: str | os.PathLike) -> bool:
        return self.fs.get_file_info(os.fspath(path)).type != pafs.FileType.NotFound

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        raise _read_only()

    def mkdir(self, path: str | os.PathLike) -> None:
        raise _read_only()

    def rm_file(self, path: str | os.PathLike) -> None:
        raise _read_only()


def _read_only() -> NotImplementedError:
    return NotImplementedError("checkpoints are read through pyarrow, written by DCP's FileSystemWriter")


class RangedReader(FileSystemReader):
    """DCP's FileSystemReader on ``location``'s filesystem: one ranged read per stored item
    (DCP's own view would issue a read per torch.load call, many small GETs on S3), and
    DCP's metadata read once (it is read to check shapes before DCP reads it again)."""

    def __init__(self, location: Location, count: ByteCount):
        super().__init__(location.path)
        self.fs = ArrowFileSystem(location.fs)  # type: ignore[assignment]  # DCP's own seam
        self.path = location.path
        self.location, self.count = location, count
        self._metadata: Metadata | None = None

    def _slice_file(self, file: Any, sinfo: Any) -> IO[bytes]:
        return io.BytesIO(self.count.add(file.read_at(sinfo.length, sinfo.offset)))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            data = self.count.add(self.location.join(DCP_METADATA).read_bytes())
            self._metadata = pickle.loads(data)
            if getattr(self._metadata, "storage_meta", None) is None:
                self._metadata.storage_meta = StorageMeta()
        assert self._metadata.storage_meta is not None
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata
