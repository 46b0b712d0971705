"""Opening a webdataset shard wherever it is: a local path, `pipe:<command>`, or an fsspec URL.

- a local path (or `file:` path without `//`): `tarfile` reads it seekably, so a resume skips the
  records before its position by their headers without reading their data;
- `pipe:<command>` (as webdataset's `pipe:aws s3 cp s3://bucket/shard.tar -`): the command's stdout is
  read as a tar stream; its stderr goes to a temporary file and is quoted when the shard cannot be read;
- `<protocol>://...` (s3://, gs://, https://, file://, memory://): opened with fsspec (pip install fsspec
  and the protocol's backend, e.g. s3fs, gcsfs) and read as a stream.

Streams are never copied to local disk; records before a resume position are read and dropped.
Anything that cannot be opened is a ShardError naming the shard.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator

from m2megatron.data.skips import BadSample

log = logging.getLogger("m2megatron.data")
_OPEN_ERRORS = (OSError, tarfile.TarError, EOFError)


class ShardError(ValueError):
    """A shard or data file that cannot be read at all (named in the message)."""


class ShardFailures:
    """Shards of one source that this reading rank could not open. Each is a counted skip
    (`unreadable_shard`), logged by name; more than `fraction` of the rank's share of the source's shards
    (shards / DP size per epoch) stops the job with a ShardError naming the source and the setting."""

    def __init__(self, source: str, num_shards: int, dp_size: int, fraction: float, setting: str):
        self.source, self.setting, self.fraction = source, setting, fraction
        self.allowed = fraction * num_shards / dp_size
        self.failed: set[str] = set()

    def record(self, shard: str, error: ShardError) -> BadSample:
        self.failed.add(shard)
        n = len(self.failed)
        if n > self.allowed:
            raise ShardError(f"{self.setting}: {n} shard(s) of source {self.source!r} could not be read on this "
                             f"rank, more than {self.fraction:g} of its share; the last: {error}")
        log.warning("data: source %s: skipping a shard that cannot be read (%d so far on this rank, %.0f allowed): "
                    "%s", self.source, n, self.allowed, error)
        return BadSample("unreadable_shard", str(error))


def is_remote(shard: str) -> bool:
    """Whether `shard` is a pipe: command or an fsspec URL (nothing to glob or stat locally)."""
    return shard.startswith("pipe:") or "://" in shard


@contextlib.contextmanager
def open_tar(shard: str) -> Iterator[tarfile.TarFile]:
    if shard.startswith("pipe:"):
        with _pipe_tar(shard) as tf:
            yield tf
        return
    if "://" in shard:
        with _fsspec_tar(shard) as tf:
            yield tf
        return
    try:
        tf = tarfile.open(shard, "r:*")
    except _OPEN_ERRORS as exc:
        raise ShardError(f"cannot open shard {shard}: {exc}") from None
    with tf:
        yield tf


@contextlib.contextmanager
def _pipe_tar(shard: str) -> Iterator[tarfile.TarFile]:
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(shard[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=err)
        try:
            try:
                tf = tarfile.open(fileobj=proc.stdout, mode="r|*")
            except _OPEN_ERRORS as exc:
                proc.wait()
                err.seek(0)
                said = err.read(2000).decode("utf-8", "replace").strip()
                raise ShardError(f"cannot open shard {shard}: {exc} (exit status {proc.returncode}"
                                 f"{': ' + said if said else ''})") from None
            with tf:
                yield tf
        finally:
            proc.stdout.close()
            if proc.poll() is None:  # stopped early (a resume, a stop): the command need not finish
                proc.kill()
            proc.wait()


@contextlib.contextmanager
def _fsspec_tar(shard: str) -> Iterator[tarfile.TarFile]:
    try:
        import fsspec  # noqa: PLC0415 - optional: only URLs need it
    except ImportError:
        raise ShardError(f"cannot open shard {shard}: URLs need fsspec (pip install fsspec and the "
                         "protocol's backend, e.g. s3fs)") from None
    try:
        f = fsspec.open(shard, "rb").open()
    except (ImportError, ValueError, *_OPEN_ERRORS) as exc:
        raise ShardError(f"cannot open shard {shard}: {type(exc).__name__}: {exc}") from None
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r|*")
        except _OPEN_ERRORS as exc:
            raise ShardError(f"cannot open shard {shard}: {exc}") from None
        with tf:
            yield tf
