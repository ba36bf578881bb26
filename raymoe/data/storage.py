"""Local paths and s3:// URIs behind one interface (pyarrow filesystems).

S3 takes the usual AWS variables: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL for an S3-compatible server (http://host:port).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from raymoe.errors import RaymoeError, TransientError, may_pass


class StorageError(RaymoeError, OSError):
    """A path or bucket cannot be read or written; the message names it."""


class StorageUnavailable(StorageError, TransientError):
    """Storage failed in a way that may pass (unreachable, throttled, a reset connection)."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                    or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                      secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Location:
    """A directory or file on some filesystem; ``uri`` is what the user wrote."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        sep = "/" if is_s3(self.uri) else os.sep
        return Location(self.fs, posixpath.join(self.path, *parts),
                        self.uri.rstrip("/" + os.sep) + sep + sep.join(parts))

    def exists(self) -> bool:
        return self._call("check", lambda: self.fs.get_file_info(self.path).type
                          != pafs.FileType.NotFound)

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        return self._call("read", read)

    def write_bytes(self, data: bytes) -> None:
        """Whole-object write: readers see the old file or the new one, never a part."""
        def write() -> None:
            parent = posixpath.dirname(self.path)
            if parent:
                self.fs.create_dir(parent, recursive=True)
            if isinstance(self.fs, pafs.LocalFileSystem):
                tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                os.replace(tmp, self.path)
            else:  # an S3 PUT is atomic
                with self.fs.open_output_stream(self.path) as f:
                    f.write(data)
        self._call("write", write)

    def delete(self) -> None:
        self._call("delete", lambda: self.fs.delete_file(self.path))

    def list_files(self) -> list[Location]:
        """Every file below this location (or itself, when it is a file), sorted."""
        def listing() -> list[pafs.FileInfo]:
            info = self.fs.get_file_info(self.path)
            if info.type == pafs.FileType.File:
                return [info]
            if info.type == pafs.FileType.NotFound:
                bucket = self.path.split("/", 1)[0]
                if is_s3(self.uri) and self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise FileNotFoundError(f"bucket {bucket!r} does not exist")
                raise FileNotFoundError("no such file or directory")
            return self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        infos = self._call("list", listing)
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
        prefix = self.path.rstrip("/")
        return [self if p == self.path else self.join(p[len(prefix) + 1:]) for p in files]

    def children(self) -> list[str]:
        """The names directly below this directory (none when it does not exist)."""
        return [i.base_name for i in self._call("list", lambda: self.fs.get_file_info(
            pafs.FileSelector(self.path, allow_not_found=True)))]

    def file_sizes(self) -> dict[str, int]:
        """Name -> size of the files directly below this directory, in one listing (none
        when it does not exist)."""
        return {i.base_name: i.size for i in self._call("list", lambda: self.fs.get_file_info(
            pafs.FileSelector(self.path, allow_not_found=True))) if i.type == pafs.FileType.File}

    def _call(self, action: str, fn):
        try:
            return fn()
        except FileNotFoundError as err:
            raise StorageError(f"{self.uri}: {err.args[0] if err.args else err}") from err
        except OSError as err:
            kind = StorageUnavailable if may_pass(err) else StorageError
            raise kind(f"cannot {action} {self.uri}: {err}") from err


def locate(uri: str) -> Location:
    """A Location for a local path or an s3://bucket/key URI."""
    if is_s3(uri):
        return Location(s3_filesystem(), uri[len("s3://"):].rstrip("/"), uri)
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(pafs.LocalFileSystem(), path, uri)
