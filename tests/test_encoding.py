"""Workers read their own byte ranges of a delivery file: the lines and their numbers must be the file's."""

from __future__ import annotations

import itertools

import pytest
from conftest import SAMPLE
from health_ingest.config import read_limits


@pytest.mark.parametrize("chunk_bytes", [64, 1000, 1 << 20])
def test_byte_ranges_give_every_line_once_with_its_number(tmp_path, monkeypatch, chunk_bytes):
    from health_ingest.batch import fhir
    from health_ingest.formats.ndjson import read_lines

    lines = (SAMPLE / "Location.000.ndjson").read_bytes().splitlines()[:30]
    # blank lines, a CRLF line, a line longer than a range, and no newline at the end
    body = b"\n".join([lines[0], b"", lines[1] + b"\r", b"   ", *lines[2:], lines[3] * 40, lines[4]])
    path = tmp_path / "Location.000.ndjson"
    path.write_bytes(body)
    monkeypatch.setattr(fhir, "CHUNK_BYTES", chunk_bytes)

    encoder = fhir.FileEncoder.__new__(fhir.FileEncoder)
    encoder.read_seconds = 0.0
    encoder.limits = read_limits()
    ranges = list(encoder._ranges(path))
    assert ranges[0][0] == 0 and ranges[-1][1] == len(body)
    assert all(end == next_start for (_, end, _, _), (next_start, _, _, _) in itertools.pairwise(ranges))
    assert not any(too_long for *_, too_long in ranges)
    found = [entry for start, end, first, _ in ranges for entry in fhir.lines_of_range(path, start, end, first)[0]]
    expected = [(n, raw.rstrip(b"\n")) for n, raw in read_lines(path)]
    assert found == expected
    assert len(ranges) > 1 or chunk_bytes > len(body)


def test_workers_run_at_the_configured_priority_and_bad_settings_are_refused(monkeypatch):
    """The encoding workers yield to the database by default; a setting out of range is named, not half-applied."""
    import os

    from health_ingest.batch.fhir import FileEncoder
    from health_ingest.bench.measure import BENCH_SOURCE
    from health_ingest.errors import ConfigurationError
    from health_ingest.privacy.keyring import Keyring, MasterKey

    keyring = Keyring(keys={"k1": MasterKey("k1", b"0" * 32)}, active_id="k1")
    own = os.nice(0)
    for setting, expected in ((None, min(own + 19, 19)), ("5", min(own + 5, 19))):
        if setting is None:
            monkeypatch.delenv("HEALTH_INGEST_WORKER_NICENESS", raising=False)
        else:
            monkeypatch.setenv("HEALTH_INGEST_WORKER_NICENESS", setting)
        with FileEncoder(keyring, BENCH_SOURCE, workers=2) as encoder:
            assert {encoder._pool.submit(os.nice, 0).result() for _ in range(4)} == {expected}
    for name, value in (("HEALTH_INGEST_WORKER_NICENESS", "-5"), ("HEALTH_INGEST_WORKERS", "two")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigurationError, match=f"{name} must be a whole number"):
            FileEncoder(keyring, BENCH_SOURCE)
        monkeypatch.delenv(name)
