"""Claims formats, described declaratively: a profile (delimiter, encodings, privacy roles of columns) and one
Table Schema file per table (the tests check each against the standard). Adding a table of a known format is adding
its schema file.

Files are streamed row by row (gzip and zip too), decoded as the profile says, and checked against their table's
schema header first: a missing or unknown column fails the delivery before anything is written.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from health_ingest.config import read_limits
from health_ingest.errors import DeliveryError
from health_ingest.formats.bounded import open_limited

PROFILES = ("snds", "synthea", "cms-rif")
TABLE_SCHEMA_TYPES = {
    *("string", "number", "integer", "boolean", "object", "array", "date", "time", "datetime"),
    *("year", "yearmonth", "duration", "geopoint", "geojson", "any"),
}
STANDARD_CONSTRAINTS = {"required", "unique", "minLength", "maxLength", "minimum", "maximum", "pattern"}
CSV_SUFFIXES = (".csv", ".csv.gz", ".txt", ".txt.gz", ".zip")


# encodings in which every ASCII byte is itself, so that a block of ASCII bytes needs no decoding to be known valid
ASCII_COMPATIBLE = {"ascii", "utf-8", "utf-8-sig", "iso8859-1", "iso8859-15", "cp1252"}


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # Table Schema type: string, integer, number, boolean, date, datetime, year, yearmonth
    coded: bool = False  # its values come from a nomenclature the schema names (SNDS `nomenclature`)


@dataclass(frozen=True)
class TableSchema:
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = ()
    delimiter: str | None = None  # a table's own CSV dialect, when it differs from the profile's

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True)
class PrivacyRoles:
    """What the profile says each sensitive column is; keys are `COLUMN` or `table.COLUMN`."""

    person: tuple[str, ...] = ()
    identifiers: dict[str, str] = field(default_factory=dict)
    drop: frozenset[str] = frozenset()
    drop_patterns: tuple[str, ...] = ()  # free-text columns by name (SNDS labels `*_LIB`, names `*_NOM`...)
    year: frozenset[str] = frozenset()
    year_month: frozenset[str] = frozenset()
    zip3: frozenset[str] = frozenset()
    providers: frozenset[str] = frozenset()
    numbers_only: frozenset[str] = frozenset()  # values kept when they read as a number, free text otherwise
    # what each column is (identifier, quasi_identifier, code, amount, date, free_text), by `COLUMN` or
    # `table.COLUMN`: the `classification` of the schema files' fields (`field_classes`) and the profile's own
    # `classes` lists; `class_patterns` classify by name (see `health_ingest.privacy.claims.classify_column`)
    classes: dict[str, frozenset[str]] = field(default_factory=dict)
    class_patterns: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ClaimsProfile:
    name: str
    delimiter: str
    encodings: tuple[str, ...]
    table_names: str
    table_suffix: str | None
    trailing_delimiter: bool
    privacy: PrivacyRoles
    tables: _TableSchemas

    def table_for(self, path: Path) -> str:
        """The table a file belongs to, from its name (`ER_PRS_F.csv`, `carrier_2019.csv.gz`)."""
        stem = path.name
        for suffix in sorted(CSV_SUFFIXES, key=len, reverse=True):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        if self.table_suffix:
            stem = re.sub(self.table_suffix, "", stem)
        return stem.upper() if self.table_names == "upper" else stem.lower()

    def warehouse_table(self, table: str) -> str:
        return f"{self.name.replace('-', '_')}_{table.lower()}"


@cache
def load_profile(name: str) -> ClaimsProfile:
    """The profile and every table schema of its folder, each read when it is first used."""
    if name not in PROFILES:
        raise DeliveryError(f"unknown claims profile '{name}' (known: {', '.join(PROFILES)})")
    folder = resources.files("health_ingest.formats") / "claims_profiles" / name
    settings = json.loads((folder / "profile.json").read_text(encoding="utf-8"))
    descriptors = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json") or entry.name == "profile.json":
            continue
        descriptor = json.loads(entry.read_text(encoding="utf-8"))
        descriptors[descriptor.get("name") or entry.name.removesuffix(".json")] = descriptor
    tables = _TableSchemas(descriptors, settings.get("table_names", "lower"), settings.get("year_placeholder"))
    roles = settings.get("privacy", {})
    return ClaimsProfile(
        name=settings["name"],
        delimiter=settings["delimiter"],
        encodings=tuple(settings.get("encodings", ["utf-8"])),
        table_names=settings.get("table_names", "lower"),
        table_suffix=settings.get("table_suffix"),
        trailing_delimiter=bool(settings.get("trailing_delimiter", False)),
        privacy=PrivacyRoles(
            person=tuple(roles.get("person", ())),
            identifiers=dict(roles.get("identifiers", {})),
            drop=frozenset(roles.get("drop", ())),
            drop_patterns=tuple(roles.get("drop_patterns", ())),
            year=frozenset(roles.get("year", ())),
            year_month=frozenset(roles.get("year_month", ())),
            zip3=frozenset(roles.get("zip3", ())),
            providers=frozenset(roles.get("providers", ())),
            numbers_only=frozenset(roles.get("numbers_only", ())),
            classes=_merged_classes(
                field_classes(descriptors, settings.get("table_names", "lower")), roles.get("classes", {})
            ),
            class_patterns={name: tuple(patterns) for name, patterns in roles.get("class_patterns", {}).items()},
        ),
        tables=tables,
    )


def field_classes(descriptors: dict[str, dict], case: str = "lower") -> dict[str, frozenset[str]]:
    """The privacy class of each classified field of a profile's schema files, by class: under the column's name
    when every table says the same of it, else under `table.COLUMN`."""
    found: dict[str, dict[str, str]] = {}
    for table, descriptor in descriptors.items():
        for f in descriptor.get("fields", []):
            if f.get("classification"):
                found.setdefault(f["name"], {})[_in_case(table, case)] = f["classification"]
    classes: dict[str, set[str]] = {}
    for column, by_table in found.items():
        if len(set(by_table.values())) == 1:
            classes.setdefault(next(iter(by_table.values())), set()).add(column)
            continue
        for table, class_name in by_table.items():
            classes.setdefault(class_name, set()).add(f"{table}.{column}")
    return {class_name: frozenset(columns) for class_name, columns in classes.items()}


def _merged_classes(from_fields: dict[str, frozenset[str]], listed: dict[str, list[str]]) -> dict[str, frozenset[str]]:
    """The schema files' field classes with the profile's own `classes` lists."""
    merged = dict(from_fields)
    for name, columns in listed.items():
        merged[name] = merged.get(name, frozenset()) | frozenset(columns)
    return merged


def is_claims_file(path: Path) -> bool:
    return path.name.lower().endswith(CSV_SUFFIXES)


@dataclass
class ClaimsFile:
    """An open file of a delivery: its header (checked) and an iterator of (row number, values)."""

    header: list[str]
    rows: Iterator[tuple[int, list[str]]]
    encoding: str


def open_claims_file(
    path: Path, label: str, profile: ClaimsProfile, schema: TableSchema, encoding: str | None = None
) -> ClaimsFile:
    """Decode with the first of the profile's encodings that reads the whole file (or with `encoding`, once
    chosen), and check the header against the schema. An encoding is chosen on the whole file, not on its header:
    a Latin-1 export has an ASCII header, and its first accented value would otherwise stop the batch midway."""
    refused = []
    for candidate in [encoding] if encoding else profile.encodings:
        if encoding is None and (line := _checked_line(path, label, candidate)) is not None:
            if _is_utf8(candidate) and _holds_utf8_sequences(path, label):
                raise DeliveryError(
                    f"{label}: UTF-8 with bytes of another encoding at line {line}: the file mixes encodings, and "
                    "no one encoding reads it right; nothing of the delivery was loaded"
                )
            refused.append(f"not {candidate} at line {line}")
            continue
        reader = csv.reader(_text_stream(path, candidate, label), delimiter=schema.delimiter or profile.delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise DeliveryError(f"{label}: empty file, no header") from None
        if profile.trailing_delimiter and header and header[-1] == "":
            header = header[:-1]
        _check_header(label, header, schema)
        return ClaimsFile(header, _rows(reader, label, len(header), profile.trailing_delimiter), candidate)
    raise DeliveryError(f"{label}: {'; '.join(refused)}; nothing of the delivery was loaded")


def rows_of_range(
    path: Path,
    profile: ClaimsProfile,
    schema: TableSchema,
    encoding: str,
    width: int,
    start: int,
    end: int | None,
    line: int,
    label: str,
) -> Iterator[tuple[int, list[str]]]:
    """(line number, values) of the rows in a byte range of a plain file of `width` columns that starts at line
    `line`, past the header, and ends at a line break (None: at the end of the file): what `ClaimsFile.rows` gives
    for them. `label` names the file in errors."""
    delimiter, trailing = schema.delimiter or profile.delimiter, profile.trailing_delimiter
    if end is None:
        with open_limited(path, label, refuse_long_lines=True, start=start) as raw:
            reader = csv.reader(io.TextIOWrapper(raw, encoding=encoding, newline=""), delimiter=delimiter)
            yield from _rows(reader, label, width, trailing, line)
        return
    with path.open("rb") as raw:
        raw.seek(start)
        block = raw.read(end - start)
    text = block.decode(encoding)
    if _cuttable(block):
        yield from _split_rows(text, delimiter, width, trailing, line)
        return
    yield from _rows(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), label, width, trailing, line)


class LineRanges:
    """Byte ranges of whole lines of a plain file, after its header, that can be read apart: each (start, end,
    first line) of about `range_bytes`. A range is only cut where no field can be open: the ranges stop at the first
    one holding a quote (a quoted field may hold a line break) or a carriage return alone (a line break that the
    count of newlines would miss); `rest` is then the (offset, line) from which the file must be read in order."""

    def __init__(self, path: Path, range_bytes: int, label: str = "a claims file"):
        self.path, self.range_bytes, self.label = path, range_bytes, label
        self.rest: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        max_line = read_limits().line_bytes
        with self.path.open("rb") as handle:
            header = _bounded_line(handle, max_line, self.label, 1)
            if not _cuttable(header):
                self.rest = (0, 1)
                return
            offset, line = len(header), 2
            while block := handle.read(self.range_bytes):
                if not block.endswith(b"\n"):
                    block += _bounded_line(handle, max_line, self.label, line + block.count(b"\n"))
                if not _cuttable(block):
                    self.rest = (offset, line)
                    return
                yield offset, offset + len(block), line
                offset, line = offset + len(block), line + block.count(b"\n")


def _bounded_line(handle, max_bytes: int, label: str, line: int) -> bytes:
    """The rest of a line, refused when longer than the limit: a CSV row cannot be skipped (a quote may be open)."""
    rest = handle.readline(max_bytes + 1)
    if len(rest) > max_bytes and not rest.endswith(b"\n"):
        raise DeliveryError(
            f"{label}: line {line} is longer than {max_bytes} bytes (HEALTH_INGEST_MAX_LINE_BYTES); nothing of the "
            "delivery was loaded"
        )
    return rest


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


_UTF8_SEQUENCE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")


def _holds_utf8_sequences(path: Path, label: str) -> bool:
    """Whether a file that is not UTF-8 still holds UTF-8's multi-byte sequences (`é` written as two bytes): then it
    mixes encodings, and Latin-1 would read each of them as two wrong characters. A Latin-1 text almost never holds
    one (an accented letter followed by a symbol of the 0x80-0xBF range)."""
    with _raw_stream(path, label) as raw:
        tail = b""
        while block := raw.read(1 << 20):
            if _UTF8_SEQUENCE.search(tail + block):
                return True
            tail = block[-3:]
    return False


def _cuttable(block: bytes) -> bool:
    """No quote, and no carriage return but before a newline (a third of the cost of counting both)."""
    return b'"' not in block and (b"\r" not in block or _LONE_CR.search(block) is None)


_LONE_CR = re.compile(rb"\r(?!\n)")


def _checked_line(path: Path, label: str, encoding: str) -> int | None:
    try:
        return first_undecodable_line(path, encoding, label)
    except EOFError:
        raise DeliveryError(f"{label}: the compressed file ends too soon; nothing of the delivery was loaded") from None
    except (gzip.BadGzipFile, zipfile.BadZipFile, zlib.error):
        raise DeliveryError(f"{label}: not a valid compressed file; nothing of the delivery was loaded") from None


def first_undecodable_line(path: Path, encoding: str, label: str = "a claims file") -> int | None:
    """The line holding the first bytes that are not valid in `encoding`, or None when the whole file decodes.
    One pass over the file (about 0.3 s per million SNDS rows; a compressed file is decompressed for it), in
    blocks: the lines are only counted when a file does not decode."""
    decoder = codecs.getincrementaldecoder(encoding)()
    ascii_compatible = codecs.lookup(encoding).name in ASCII_COMPATIBLE
    with _raw_stream(path, label) as raw:
        try:
            while block := raw.read(1 << 20):
                if not (ascii_compatible and block.isascii() and not decoder.getstate()[0]):
                    decoder.decode(block)
            decoder.decode(b"", final=True)
            return None
        except UnicodeDecodeError:
            pass
    decoder = codecs.getincrementaldecoder(encoding)()
    number = 0
    with _raw_stream(path, label) as raw:
        for number, line in enumerate(raw, start=1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError:
                return number
    return number  # a sequence cut short by the end of the file


# --- implementation details -------------------------------------------------------------------


class _TableSchemas(Mapping):
    """A profile's table schemas by name, each validated when first asked for: a batch uses a few of SNDS's two
    hundred tables, and validating all of them cost seconds per batch.

    A schema whose name holds the profile's year placeholder (SNDS's `aa` in `T_MCOaaB`) serves every year: it is
    listed once, under its own name in the profile's case (`T_MCOAAB`), and also answers for each year's table
    (`T_MCO19B`), which is a table of its own, as the SNDS names it."""

    def __init__(self, descriptors: dict[str, dict], case: str = "lower", year_placeholder: str | None = None):
        self._descriptors = {_in_case(name, case): d for name, d in descriptors.items()}
        self._schemas: dict[str, TableSchema] = {}
        self._yearly: list[tuple[re.Pattern, str, str]] = []  # (pattern, schema name, template)
        for name in descriptors:
            if year_placeholder and year_placeholder in name:
                before, _, after = name.partition(year_placeholder)
                template = _in_case(before, case) + "{year}" + _in_case(after, case)
                pattern = _year_pattern(template, _in_case(year_placeholder, case))
                self._yearly.append((pattern, _in_case(name, case), template))

    def __getitem__(self, table: str) -> TableSchema:
        schema = self._schemas.get(table)
        if schema is None:
            schema = self._schemas[table] = _table_schema(table, self.descriptor(table))
        return schema

    def descriptor(self, table: str) -> dict:
        """The Table Schema descriptor of a table, a yearly table's being its schema's (KeyError if none)."""
        return self._descriptors[self.schema_name(table)]

    def schema_name(self, table: str) -> str:
        """The name of the schema a table is read with: its own, or the yearly schema it is a year of."""
        if table in self._descriptors:
            return table
        for pattern, name, _ in self._yearly:
            if pattern.match(table):
                return name
        raise KeyError(table)

    def year_template(self, table: str) -> str | None:
        """`T_MCO{year}B` for a yearly schema's name (`T_MCOAAB`), None for a table of its own."""
        return next((template for _, name, template in self._yearly if name == table), None)

    def named_tables(self) -> list[str]:
        """The tables whose name is their schema's: all but the yearly schemas, whose tables are one per year."""
        yearly = {name for _, name, _ in self._yearly}
        return [name for name in self._descriptors if name not in yearly]

    def __iter__(self):
        return iter(self._descriptors)

    def __len__(self) -> int:
        return len(self._descriptors)


def _in_case(name: str, case: str) -> str:
    return name.upper() if case == "upper" else name.lower() if case == "lower" else name


def _year_pattern(template: str, placeholder: str) -> re.Pattern:
    """`T_MCO{year}B` matches `T_MCO19B` and the schema's own `T_MCOAAB` (a file named as the schema is)."""
    before, _, after = template.partition("{year}")
    return re.compile(f"^{re.escape(before)}(?:[0-9]{{2}}|{re.escape(placeholder)}){re.escape(after)}$")


def _table_schema(table: str, descriptor: dict) -> TableSchema:
    """The columns, types, key and dialect of a bundled Table Schema. The bundled schemas are checked against the
    Table Schema standard by the tests (`frictionless`), not by each batch, where loading the validator cost half a
    second and a third of the process's memory; what is read here is checked enough to fail clearly if a file was
    damaged."""
    part = _table_schema_part(descriptor)
    columns = tuple(
        Column(f["name"], f.get("type", "any"), (raw.get("nomenclature") or "-") not in ("-", ""))
        for f, raw in zip(part["fields"], descriptor["fields"], strict=True)
    )
    names = [c.name for c in columns]
    key = part.get("primaryKey", ())
    key = (key,) if isinstance(key, str) else tuple(key)
    unknown_types = {c.type for c in columns} - TABLE_SCHEMA_TYPES
    if len(set(names)) != len(names) or not set(key) <= set(names) or unknown_types:
        raise DeliveryError(f"the schema of table {table} is not a valid Table Schema; reinstall health-ingest")
    return TableSchema(table, columns, key, (descriptor.get("dialect") or {}).get("delimiter"))


def _table_schema_part(descriptor: dict) -> dict:
    """The Table Schema keys of an SNDS descriptor (which adds its own documentation keys)."""
    fields = [
        {k: v for k, v in f.items() if k in {"name", "type", "format", "description", "constraints"}}
        for f in descriptor["fields"]
    ]
    for f in fields:
        if f.get("format") and f["format"] != "default" and f["type"] in {"date", "datetime"}:
            f["format"] = "any"
        if "constraints" in f:  # the standard constraints only (SNDS adds its own, such as "decimals")
            f["constraints"] = {k: v for k, v in f["constraints"].items() if k in STANDARD_CONSTRAINTS}
    part = {"fields": fields}
    if descriptor.get("primaryKey"):
        part["primaryKey"] = descriptor["primaryKey"]
    return part


def _text_stream(path: Path, encoding: str, label: str) -> io.TextIOBase:
    return io.TextIOWrapper(_raw_stream(path, label), encoding=encoding, newline="")


def _raw_stream(path: Path, label: str) -> io.BufferedIOBase:
    """The file's bytes (gzip and zip decompressed), within the read limits: no line, and so no field, longer than
    the line limit, and no compression bomb."""
    return open_limited(path, label, refuse_long_lines=True)


def _check_header(label: str, header: list[str], schema: TableSchema) -> None:
    missing = [c for c in schema.column_names if c not in header]
    unknown = [c for c in header if c not in schema.column_names]
    if missing or unknown or len(set(header)) != len(header):
        parts = []
        if missing:
            parts.append(f"missing columns {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unknown:
            parts.append(f"unknown columns {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        if len(set(header)) != len(header):
            parts.append("repeated columns")
        raise DeliveryError(f"{label}: header does not match the schema of {schema.name}: {'; '.join(parts)}")


def _split_rows(
    text: str, delimiter: str, width: int, trailing_delimiter: bool, first_line: int
) -> Iterator[tuple[int, list[str]]]:
    """`_rows` of a block without a quote or a lone carriage return, where a CSV reader only splits each line at
    its delimiters: so split here, at a third of the reader's cost."""
    for line_no, line in enumerate(text.split("\n"), first_line):
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            continue
        values = line.split(delimiter)
        if trailing_delimiter and len(values) == width + 1 and values[-1] == "":
            values.pop()
        yield line_no, values


def _rows(
    reader, label: str, width: int, trailing_delimiter: bool, first_line: int = 1
) -> Iterator[tuple[int, list[str]]]:
    """A CSV reader's rows, each with the line it starts on (a quoted value may hold line breaks). A file the reader
    cannot read on (a field over the reader's size limit) fails the delivery with the line and the reader's reason,
    which quotes no value."""
    offset = first_line - 1  # the line before the reader's first
    last = offset + reader.line_num  # the last line it has read (a header, already)
    try:
        for values in reader:
            starts, last = last + 1, offset + reader.line_num
            if not values or values == [""]:
                continue
            if trailing_delimiter and len(values) == width + 1 and values[-1] == "":
                values = values[:-1]
            yield starts, values
    except csv.Error as error:
        raise DeliveryError(
            f"{label}: line {last + 1}: not readable as CSV ({error}); nothing of the delivery was loaded"
        ) from None
