"""Claims formats without a warehouse: the bundled Table Schemas against the standard, and a file's byte ranges read
as its whole is."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from conftest import TEST_DATA
from health_ingest.errors import DeliveryError
from health_ingest.formats import claims
from health_ingest.formats.claims import PROFILES, LineRanges, load_profile, open_claims_file, rows_of_range


def _descriptors(profile: str) -> dict[str, dict]:
    folder = resources.files("health_ingest.formats") / "claims_profiles" / profile
    found = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".json") and entry.name != "profile.json":
            descriptor = json.loads(entry.read_text(encoding="utf-8"))
            name = descriptor.get("name") or entry.name.removesuffix(".json")
            found[name.upper() if load_profile(profile).table_names == "upper" else name] = descriptor
    return found


@pytest.mark.parametrize("profile_name", PROFILES)
def test_every_bundled_table_schema_is_valid_and_read_as_the_standard_reads_it(profile_name):
    from frictionless import Schema

    profile = load_profile(profile_name)
    descriptors = _descriptors(profile_name)
    assert set(descriptors) == set(profile.tables)
    for table, descriptor in descriptors.items():
        standard = Schema.from_descriptor(claims._table_schema_part(descriptor))  # raises when not Table Schema
        schema = profile.tables[table]
        assert [(c.name, c.type) for c in schema.columns] == [(f.name, f.type) for f in standard.fields], table
        assert list(schema.primary_key) == list(standard.primary_key or []), table


def test_a_yearly_snds_schema_serves_every_year_as_a_table_of_its_own():
    """`T_MCOaaB` is the schema of `T_MCO19B`, `T_MCO23B`... and of a file named as the schema itself."""
    profile = load_profile("snds")
    for name, table in [("T_MCO19B.csv", "T_MCO19B"), ("t_mco23c.csv.gz", "T_MCO23C"), ("T_MCOaaB.csv", "T_MCOAAB")]:
        assert profile.table_for(Path(name)) == table
        schema = profile.tables[table]
        assert schema.name == table and schema.primary_key == (("ETA_NUM", "RSA_NUM"))
    assert profile.tables.schema_name("T_HAD07A") == "T_HADAAA"
    assert profile.warehouse_table("T_MCO19B") == "snds_t_mco19b"
    for not_a_year in ["T_MCO9B", "T_MCO2019B", "T_MCOXXB"]:
        assert not_a_year not in profile.tables
    assert "T_MCO19B" not in set(profile.tables), "each yearly schema is listed once"


def test_every_snds_column_is_classified_and_direct_identifiers_never_kept_raw():
    from health_ingest.privacy.claims import plan_columns

    profile = load_profile("snds")
    classes = {"identifier", "quasi_identifier", "code", "amount", "date", "free_text"}
    for table in profile.tables:
        descriptor = profile.tables.descriptor(table)
        if not table.startswith("T_"):
            continue  # the PMSI tables, made by `health_ingest.formats.snds_schemas`
        fields = {f["name"]: f.get("classification") for f in descriptor["fields"]}
        assert set(fields.values()) <= classes, table
        plan, _ = plan_columns(profile.tables[table], list(fields), profile.privacy, "tokenise")
        kept_raw = {c.name for c in plan if c.action == "keep"}
        assert not {n for n, c in fields.items() if c in {"identifier", "free_text"}} & kept_raw, table


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d["fields"].append(dict(d["fields"][0])),  # a column twice
        lambda d: d["fields"][0].update(type="decimal"),  # no such type
        lambda d: d.update(primaryKey=["NOT_A_COLUMN"]),
    ],
    ids=["repeated column", "unknown type", "key not a column"],
)
def test_a_damaged_table_schema_fails_clearly(damage):
    descriptor = json.loads(json.dumps(_descriptors("snds")["ER_PHA_F"]))
    damage(descriptor)
    with pytest.raises(DeliveryError, match="schema of table ER_PHA_F is not a valid Table Schema"):
        claims._table_schema("ER_PHA_F", descriptor)


@pytest.mark.parametrize(
    ("profile_name", "table", "sample"),
    [
        ("snds", "ER_PHA_F", TEST_DATA / "synthetic-snds" / "DCIR" / "ER_PHA_F.csv"),
        ("cms-rif", "carrier", TEST_DATA / "cms-rif" / "carrier.csv"),  # pipes
    ],
)
def test_byte_ranges_give_the_rows_and_line_numbers_that_reading_the_whole_file_gives(
    profile_name, table, sample, tmp_path
):
    """Ranges without a quote are split at their delimiters rather than read by the CSV reader: the same values
    and line numbers, with Windows line ends and blank lines, and a range holding a quote still read as CSV."""
    profile = load_profile(profile_name)
    schema = profile.tables[table]
    header, *lines = sample.read_text(encoding="utf-8-sig").splitlines()
    delimiter = schema.delimiter or profile.delimiter
    lines[3] = ""  # a blank line, skipped but counted
    quoted = lines[-2].split(delimiter)
    quoted[1] = f'"{quoted[1]}{delimiter} quoted"'
    lines[-2] = delimiter.join(quoted)  # the last range then holds a quote
    if profile.trailing_delimiter:  # RIF files end each line with one
        header, lines = header + delimiter, [f"{line}{delimiter}" if line else line for line in lines]
    path = tmp_path / sample.name
    path.write_bytes(("\r\n".join([header, *lines]) + "\r\n").encode())

    expected, by_range = _whole_and_by_ranges(path, profile, schema)

    assert by_range == expected
    assert len(expected) == len(lines) - 1 and expected[-2][0] == len(lines)  # numbered as lines of the file
    assert expected[-2][1][1].endswith(f"{delimiter} quoted")
    assert all(len(values) == len(schema.columns) for _, values in expected)


def test_a_carriage_return_alone_is_a_line_break_read_in_order(tmp_path):
    """The CSV reader ends a row at a carriage return alone: a range holding one is not split at newlines only."""
    profile = load_profile("snds")
    schema = profile.tables["ER_PHA_F"]
    text = (TEST_DATA / "synthetic-snds" / "DCIR" / "ER_PHA_F.csv").read_text(encoding="utf-8-sig")
    header, *lines = text.splitlines()
    lines[5] = lines[5].replace(",", ",\r", 1)
    path = tmp_path / "ER_PHA_F.csv"
    path.write_bytes(("\r\n".join([header, *lines]) + "\r\n").encode())

    expected, by_range = _whole_and_by_ranges(path, profile, schema)

    assert by_range == expected and len(expected) == len(lines) + 1


def _whole_and_by_ranges(path: Path, profile, schema) -> tuple[list, list]:
    """The file's rows read whole, and read by ranges of about a seventh of it, then in order from `rest`."""
    whole = open_claims_file(path, path.name, profile, schema)
    ranges = LineRanges(path, range_bytes=len(path.read_bytes()) // 7)
    by_range = [
        row
        for start, end, line in ranges
        for row in rows_of_range(path, profile, schema, whole.encoding, len(whole.header), start, end, line, path.name)
    ]
    start, line = ranges.rest
    by_range += rows_of_range(path, profile, schema, whole.encoding, len(whole.header), start, None, line, path.name)
    return list(whole.rows), by_range


def test_a_quote_free_range_is_not_read_by_the_csv_reader(tmp_path, monkeypatch):
    """The split is what runs (else the test above would pass on the reader alone)."""
    path = tmp_path / "ER_PHA_F.csv"
    path.write_text(Path(TEST_DATA / "synthetic-snds" / "DCIR" / "ER_PHA_F.csv").read_text(encoding="utf-8-sig"))
    profile = load_profile("snds")
    schema = profile.tables["ER_PHA_F"]
    monkeypatch.setattr(claims.csv, "reader", None)
    header_end = len(path.read_bytes().split(b"\n", 1)[0]) + 1
    rows = list(
        rows_of_range(
            path, profile, schema, "utf-8", len(schema.columns), header_end, path.stat().st_size, 2, path.name
        )
    )
    assert rows and rows[0][0] == 2


def test_every_column_of_the_synthea_export_is_classified_and_identity_never_kept_raw():
    from health_ingest.privacy.claims import plan_columns

    profile = load_profile("synthea")
    classes = profile.privacy.classes
    for table in profile.tables:
        schema = profile.tables[table]
        for column in schema.column_names:
            found = {c for c, columns in classes.items() if column in columns or f"{table}.{column}" in columns}
            assert len(found) == 1, (table, column)
        plan, persons = plan_columns(schema, list(schema.column_names), profile.privacy, "tokenise")
        kept_raw = {c.name for c in plan if c.action == "keep"}
        raw_classes = {
            c for c, columns in classes.items() for n in kept_raw if n in columns or f"{table}.{n}" in columns
        }
        assert raw_classes <= {"code", "amount", "date", "quasi_identifier"}, table
        assert persons or table in {"payers", "organizations", "providers"}, f"{table} rows name their patient"


@pytest.mark.parametrize("profile_name", PROFILES)
def test_every_column_of_every_bundled_table_has_a_privacy_class(profile_name):
    """A column no rule classifies is dropped: a bundled table must lose none that way."""
    from health_ingest.privacy.claims import unclassified_columns

    profile = load_profile(profile_name)
    assert {t: unclassified_columns(profile.tables[t], profile.privacy) for t in profile.tables} == {
        t: [] for t in profile.tables
    }


def test_unclassified_and_free_text_columns_are_dropped_unless_a_source_keeps_them():
    from health_ingest.formats.claims import Column, PrivacyRoles, TableSchema
    from health_ingest.privacy.claims import plan_columns

    schema = TableSchema(
        "visits",
        (
            Column("PATIENT", "string"),
            Column("CODE", "string", coded=True),
            Column("NOTE", "string"),
            Column("NEW_FIELD", "string"),
            Column("SEEN", "date"),
            Column("COST", "number"),
        ),
    )
    roles = PrivacyRoles(
        person=("PATIENT",),
        identifiers={"PATIENT": "urn:x"},
        classes={"free_text": frozenset({"NOTE"})},
        class_patterns={"amount": ("^COST$",)},
    )
    header = list(schema.column_names)
    plan, _ = plan_columns(schema, header, roles, "tokenise")
    assert [(c.name, c.action) for c in plan] == [
        ("PATIENT", "token"),
        ("CODE", "keep"),
        ("SEEN", "keep"),
        ("COST", "keep"),
    ]
    kept, _ = plan_columns(schema, header, roles, "tokenise", keep_free_text=("visits.NOTE",))
    assert "NOTE" in [c.name for c in kept] and "NEW_FIELD" not in [c.name for c in kept]
