"""Workers read their own byte ranges of a delivery file: the lines and their numbers must be the file's."""

from __future__ import annotations

import itertools

import pytest
from conftest import SAMPLE


@pytest.mark.parametrize("chunk_bytes", [64, 1000, 1 << 20])
def test_byte_ranges_give_every_line_once_with_its_number(tmp_path, monkeypatch, chunk_bytes):
    from health_ingest import encoding
    from health_ingest.formats.ndjson import read_lines

    lines = (SAMPLE / "Location.000.ndjson").read_bytes().splitlines()[:30]
    # blank lines, a CRLF line, a line longer than a range, and no newline at the end
    body = b"\n".join([lines[0], b"", lines[1] + b"\r", b"   ", *lines[2:], lines[3] * 40, lines[4]])
    path = tmp_path / "Location.000.ndjson"
    path.write_bytes(body)
    monkeypatch.setattr(encoding, "CHUNK_BYTES", chunk_bytes)

    encoder = encoding.FileEncoder.__new__(encoding.FileEncoder)
    encoder.read_seconds = 0.0
    ranges = list(encoder._ranges(path))
    assert ranges[0][0] == 0 and ranges[-1][1] == len(body)
    assert all(end == next_start for (_, end, _), (next_start, _, _) in itertools.pairwise(ranges))
    found = [entry for start, end, first in ranges for entry in encoding.lines_of_range(path, start, end, first)]
    expected = [(n, raw.rstrip(b"\n")) for n, raw in read_lines(path)]
    assert found == expected
    assert len(ranges) > 1 or chunk_bytes > len(body)
