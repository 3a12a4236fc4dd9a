"""Reading a delivered file within limits: a compressed file may not decompress beyond a size or a ratio (a gzip
bomb), and a line may not grow beyond a length. Each limit ends in a clear refusal, never in memory growth."""

from __future__ import annotations

import gzip
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

from health_ingest.config import ReadLimits, read_limits
from health_ingest.errors import DeliveryError

TOO_LONG = b""  # what `bounded_lines` gives for a line over the limit (a blank line is never given)
_RATIO_FLOOR = 1 << 20  # compressed bytes below which the ratio is taken on this much: small files vary


def open_limited(
    path: Path, label: str, limits: ReadLimits | None = None, *, refuse_long_lines: bool = False, start: int = 0
) -> io.BufferedReader:
    """A binary reader of the file's content (gzip and a zip of one file decompressed), that refuses, as a
    `DeliveryError` naming `label`, a decompressed size or ratio over the limits, and with `refuse_long_lines` a
    line over the limit (for readers that cannot skip one, such as CSV). A plain file is read from `start`."""
    limits = limits or read_limits()
    name = path.name.lower()
    plain = not name.endswith((".gz", ".zip"))
    if plain and not refuse_long_lines:
        handle = path.open("rb")
        handle.seek(start)
        return handle
    compressed = _Counting(path.open("rb"))
    if plain:
        compressed.seek(start)
    if name.endswith(".gz"):
        inner = gzip.GzipFile(fileobj=compressed, mode="rb")
    elif name.endswith(".zip"):
        archive = zipfile.ZipFile(compressed)
        members = [m for m in archive.namelist() if not m.endswith("/")]
        if len(members) != 1:
            raise DeliveryError(f"{label}: a zip archive must hold exactly one file")
        inner = archive.open(members[0])
    else:
        inner, compressed = compressed, None
    return io.BufferedReader(_Limited(inner, compressed, label, limits, refuse_long_lines), 1 << 16)


def bounded_lines(handle, max_bytes: int) -> Iterator[bytes]:
    """The lines of a binary reader; a line over `max_bytes` is given as `TOO_LONG`, and the rest of it is read
    through without being kept."""
    readline = handle.readline
    while line := readline(max_bytes + 1):
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while (rest := readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield TOO_LONG
        else:
            yield line


# --- implementation details -------------------------------------------------------------------


class _Counting(io.RawIOBase):
    """A file that counts the bytes read from it (a compressed stream's input)."""

    def __init__(self, raw) -> None:
        self.raw, self.count = raw, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer) -> int:
        read = self.raw.readinto(buffer)
        self.count += read or 0
        return read

    def close(self) -> None:
        self.raw.close()
        super().close()


class _Limited(io.RawIOBase):
    def __init__(self, inner, compressed: _Counting | None, label: str, limits: ReadLimits, lines: bool) -> None:
        self.inner, self.compressed, self.label, self.limits = inner, compressed, label, limits
        self.total = 0
        self.since_newline = 0 if lines else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[: self.limits.line_bytes]  # so that a line within one read is within the limit
        read = self.inner.readinto(view)
        if not read:
            return read
        self.total += read
        if self.compressed is not None:
            if self.total > self.limits.decompressed_bytes:
                raise DeliveryError(
                    f"{self.label}: decompresses to more than {self.limits.decompressed_bytes} bytes "
                    "(HEALTH_INGEST_MAX_DECOMPRESSED_BYTES); nothing of the delivery was loaded"
                )
            if self.total > self.limits.compression_ratio * max(self.compressed.count, _RATIO_FLOOR):
                raise DeliveryError(
                    f"{self.label}: decompresses more than {self.limits.compression_ratio} times its size "
                    "(HEALTH_INGEST_MAX_COMPRESSION_RATIO), as a compression bomb does; nothing of the delivery "
                    "was loaded"
                )
        if self.since_newline is not None:
            last = bytes(view[:read]).rfind(b"\n")
            self.since_newline = self.since_newline + read if last < 0 else read - 1 - last
            if self.since_newline > self.limits.line_bytes:
                raise DeliveryError(
                    f"{self.label}: a line longer than {self.limits.line_bytes} bytes (HEALTH_INGEST_MAX_LINE_BYTES); "
                    "nothing of the delivery was loaded"
                )
        return read

    def close(self) -> None:
        self.inner.close()
        if self.compressed is not None:
            self.compressed.close()
        super().close()
