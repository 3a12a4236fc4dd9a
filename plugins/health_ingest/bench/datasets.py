"""Scaled FHIR datasets made of the sample's real records, replicated under new ids with references kept."""

from __future__ import annotations

import math
import re
from pathlib import Path

from health_ingest.formats.ndjson import read_lines, resource_type_of

# Every UUID in the sample is a resource id (or an identifier equal to one): suffixing them all keeps each
# copy's references pointing inside the same copy.
UUID = re.compile(rb"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def build_fhir_dataset(sample: Path, target: Path, resources: int) -> int:
    """Write at least `resources` records (whole copies of the sample) to `target`; return the exact count."""
    files = sorted(p for p in sample.glob("*.ndjson") if resource_type_of(p))
    per_copy = sum(1 for f in files for _ in read_lines(f))
    copies = max(1, math.ceil(resources / per_copy))
    done = target / "_COMPLETE"
    if done.exists() and done.read_text() == str(copies * per_copy):
        return copies * per_copy
    target.mkdir(parents=True, exist_ok=True)
    for source_file in files:
        lines = [raw.rstrip(b"\n") for _, raw in read_lines(source_file)]
        with (target / source_file.name).open("wb") as out:
            for copy in range(copies):
                suffix = b"\\1-r%d" % copy
                out.write(b"\n".join(UUID.sub(suffix, line) for line in lines) + b"\n")
    done.write_text(str(copies * per_copy))
    return copies * per_copy


# The nine columns that join ER_PRS_F to its detail tables; each copy gets its own DCT_ORD_NUM so that rows stay
# distinct and each copy's details still join its own header.
DCIR_COPY_COLUMN = "DCT_ORD_NUM"
# A person's rows spread over this many copies (with the sample's seven people, about fourteen ER_PRS_F rows each,
# as in an extract): each group of copies has people of its own, so that their tokens are computed as often as a
# real extract's would be. The person pseudonym keeps its 17 characters: its last five become the group's number.
DCIR_PERSON_COLUMN = "BEN_NIR_PSA"
COPIES_PER_PERSON = 10


def build_snds_dataset(sample: Path, target: Path, rows: int) -> int:
    """Copies of the DCIR sample (ER_PRS_F and ER_PHA_F) until `rows` rows; return the exact count."""
    import csv

    files = sorted(sample.glob("ER_*_F.csv"))
    per_copy = sum(sum(1 for _ in f.open()) - 1 for f in files)
    copies = max(1, math.ceil(rows / per_copy))
    done = target / "_COMPLETE"
    marker = f"{copies * per_copy} rows, people of their own every {COPIES_PER_PERSON} copies"
    if done.exists() and done.read_text() == marker:
        return copies * per_copy
    target.mkdir(parents=True, exist_ok=True)
    for source_file in files:
        with source_file.open(newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            body = list(reader)
        column = header.index(DCIR_COPY_COLUMN)
        person = header.index(DCIR_PERSON_COLUMN) if DCIR_PERSON_COLUMN in header else None
        with (target / source_file.name).open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(header)
            for copy in range(copies):
                for row in body:
                    row = list(row)
                    row[column] = f"{row[column]}{copy:05d}"
                    if person is not None and row[person]:
                        row[person] = f"{row[person][:-5]}{copy // COPIES_PER_PERSON:05d}"
                    writer.writerow(row)
    done.write_text(marker)
    return copies * per_copy
