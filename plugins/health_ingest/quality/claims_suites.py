"""Scaffold one suite per claims table from its Table Schema and what the format's documentation says.

`health-ingest quality scaffold-claims` writes `expectations/claims/<profile>/<TABLE>.json` for tables that have
none (an edited suite is never overwritten). The rules, per table:

- volume against the source's previous batch of the table (warning);
- key columns present (error) and, for a one-column key, unique (error); rows linked to a person (warning);
- every date possible for the format, 1600 to 2100 (error), and not more than a year ahead (warning);
- numbers within the bounds the Table Schema declares (error); amounts and counts not negative (error);
- periods ordered, start before end (error); care not before birth nor after death where the format has both;
- codes of their systems (CIP13, CCAM, ICD-10-CM/PCS, HCPCS, NDC, SNOMED CT patterns) (error);
- detail rows have their header row (the format's foreign keys to claim headers) (error).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from health_ingest.formats.claims import ClaimsProfile, TableSchema, load_profile
from health_ingest.privacy.claims import plan_columns
from health_ingest.privacy.policy import PrivacyPolicy

DATE_TYPES = {"date", "datetime"}
NUMBER_TYPES = {"integer", "number"}
PERIOD_SUFFIXES = (("_DTD", "_DTF"), ("_FROM_DT", "_THRU_DT"), ("START", "STOP"), ("FROMDATE", "TODATE"))
HEADERS = {  # detail table -> header table, for profiles whose schemas do not declare it
    ("synthea", "claims_transactions"): ("claims", {"CLAIMID": "Id"}),
}
CODES = {
    "snds": {
        r"PHA_PRS_C13|PHA_CIP_C13": ("^[0-9]{13}$", "CIP13"),
        r"CAM_PRS_IDE": ("^[A-Z]{4}[0-9]{3}$", "CCAM"),
        # PMSI establishments: a FINESS number, its département first (2A and 2B in Corsica)
        r"ETA_NUM(_EPMSI|_GEO[12]?|_JUR|_TWO|_ENT|_EHPA|_ESMS|_SMUR)?": ("^([0-9]{2}|2A|2B)[0-9]{7}$", "FINESS"),
    },
    "cms-rif": {
        r"(PRNCPAL|ADMTG|ICD)_DGNS(_E)?_CD[0-9]*|FST_DGNS_E_CD|LINE_ICD_DGNS_CD": (
            "^[A-Z][0-9][0-9A-Z]{0,5}$",
            "ICD-10-CM",
        ),
        r"ICD_PRCDR_CD[0-9]+": ("^[0-9A-HJ-NP-Z]{7}$", "ICD-10-PCS"),
        r"HCPCS_CD": ("^[A-Z0-9][0-9]{3}[A-Z0-9]$", "HCPCS"),
        r"PROD_SRVC_ID": ("^[0-9]{11}$", "NDC"),
    },
    "synthea": {
        r"DIAGNOSIS[1-8]": ("^[0-9]{6,18}$", "SNOMED CT"),
        r"PROCEDURECODE": ("^[0-9]{1,18}$", "SNOMED CT, RxNorm or CVX"),  # vaccines carry 2-3 digit CVX codes
    },
}
# dates a format writes for "none": Synthea writes the Unix epoch where a transaction has no end
NO_DATE = {"synthea": "1970-01-01"}
AMOUNTS = {
    "snds": r"_MNT$|_QTE$|^NBR_|_NBR$|_NBJ$",
    "cms-rif": r"_AMT$|_CNT$|_CLAIMS$|_QTY_DSPNSD_NUM$|_DAYS_SUPLY_NUM$",
    "synthea": r"^(AMOUNT|AMOUNT_COVERED|AMOUNT_UNCOVERED|REVENUE|UNITS|UNITAMOUNT|PAYMENTS|HEALTHCARE_EXPENSES|"
    r"HEALTHCARE_COVERAGE|INCOME|OUTSTANDING[1-9P]?|(UN)?COVERED_[A-Z]+|UNIQUE_CUSTOMERS|MEMBER_MONTHS|"
    r"BASE_ENCOUNTER_COST|TOTAL_CLAIM_COST|PAYER_COVERAGE|BASE_COST|TOTALCOST|DISPENSES|QUANTITY|UTILIZATION|"
    r"ENCOUNTERS|PROCEDURES)$",
}
LIFE = {  # profile -> (patients table, birth column, death column, service date columns)
    "synthea": ("patients", "BIRTHDATE", "DEATHDATE", ("SERVICEDATE", "FROMDATE", "START", "DATE")),
}


def scaffold(root: Path, *, force: bool = False) -> list[Path]:
    """Write the suites that are missing (or all, with `force`); returns the files written."""
    written = []
    for profile_name in ("snds", "synthea", "cms-rif"):
        profile = load_profile(profile_name)
        for table, schema in sorted(profile.tables.items()):
            path = root / "claims" / profile_name / f"{table}.json"
            if path.exists() and not force:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(table_suite(profile, schema), indent=2) + "\n", encoding="utf-8")
            written.append(path)
    return written


def table_suite(profile: ClaimsProfile, schema: TableSchema) -> dict:
    """The suite of one claims table, in Great Expectations 1.x JSON."""
    descriptor = profile.tables.descriptor(schema.name)
    plan, persons = plan_columns(schema, list(schema.column_names), profile.privacy, PrivacyPolicy().providers)
    kept = {c.name: c for c in plan}
    typed = {c.name: c.type for c in schema.columns if c.name in kept and kept[c.name].action == "keep"}
    constraints = {f["name"]: f.get("constraints") or {} for f in descriptor.get("fields", [])}
    warehouse_table = f"claims.{profile.warehouse_table(schema.name)}"
    columns: dict[str, object] = {}
    expectations: list[dict] = []

    def column(name: str) -> str:
        columns[name.lower()] = f's."{name.lower()}"'
        return name.lower()

    def code(name: str) -> str:
        # fixed-width formats pad empty codes with spaces: blank is missing, not a malformed code
        columns[f"{name.lower()}_code"] = f"nullif(btrim(s.\"{name.lower()}\"::text), '')"
        return f"{name.lower()}_code"

    def day(name: str) -> str:
        sentinel = NO_DATE.get(profile.name)
        value = f's."{name.lower()}"::date'
        return f"nullif({value}, '{sentinel}')" if sentinel else value

    def expect(kind: str, category: str, severity: str, why: str, **kwargs) -> None:
        meta = {"category": category, "severity": severity, "notes": why}
        expectations.append({"type": kind, "kwargs": kwargs, "meta": meta})

    expect(
        "expect_table_row_count_to_be_between",
        "plausibility",
        "warning",
        "a sudden drop against the source's previous batch of this table",
        min_value={"$PARAMETER": "half_of_previous_batch"},
    )
    key = [k for k in schema.primary_key if k in kept]
    for name in key:
        expect("expect_column_values_to_not_be_null", "completeness", "error", "key", column=column(name))
    if len(key) == 1:
        expect("expect_column_values_to_be_unique", "conformance", "error", "key", column=column(key[0]))
    if persons:
        columns["patient_id"] = "s.patient_id"
        expect(
            "expect_column_values_to_not_be_null",
            "completeness",
            "warning",
            "a row no person pseudonym links to",
            column="patient_id",
        )
    for name, kind in typed.items():
        if kind in DATE_TYPES:
            target = column(name)
            expect(
                "expect_column_values_to_be_between",
                "conformance",
                "error",
                "a date the format cannot mean",
                column=target,
                min_value="1600-01-01",
                max_value="2100-12-31",
            )
            ahead = f"{target}_days_ahead"
            columns[ahead] = f"{day(name)} - current_date"
            expect(
                "expect_column_values_to_be_between",
                "plausibility",
                "warning",
                "more than a year in the future",
                column=ahead,
                max_value=366,
            )
    for name, kind in typed.items():
        if kind not in NUMBER_TYPES:
            continue
        bounds = {k: constraints.get(name, {}).get(k) for k in ("minimum", "maximum")}
        if any(v is not None for v in bounds.values()):
            expect(
                "expect_column_values_to_be_between",
                "conformance",
                "error",
                "outside the bounds the Table Schema declares",
                column=column(name),
                min_value=bounds["minimum"],
                max_value=bounds["maximum"],
            )
        elif re.search(AMOUNTS.get(profile.name, "$^"), name, re.IGNORECASE):
            expect(
                "expect_column_values_to_be_between",
                "plausibility",
                "error",
                "an amount or a count below zero",
                column=column(name),
                min_value=0,
            )
    for start, end in _periods(typed):
        days = f"{start.lower()}_to_{end.lower()}_days"
        columns[days] = f"{day(end)} - {day(start)}"
        expect(
            "expect_column_values_to_be_between",
            "plausibility",
            "error",
            f"{end} before {start}",
            column=days,
            min_value=0,
        )
    for pattern, (regex, system) in CODES.get(profile.name, {}).items():
        for name in kept:
            if re.fullmatch(pattern, name, re.IGNORECASE) and kept[name].action == "keep":
                expect(
                    "expect_column_values_to_match_regex",
                    "conformance",
                    "error",
                    f"not a {system} code",
                    column=code(name),
                    regex=regex,
                )
    for header, on in _headers(profile, schema, descriptor, kept):
        # a yearly table's header is the same year's (`T_MCO19D` -> `T_MCO19B`): see `TableSuites`
        header_table = f"claims.{profile.warehouse_table(profile.tables.year_template(header) or header)}"
        match = " AND ".join(f'h."{h.lower()}" = s."{d.lower()}"' for d, h in on.items())
        name = f"has_{header.lower()}"
        columns[name] = {
            "sql": f"EXISTS (SELECT 1 FROM {header_table} h WHERE {match})",
            "requires": header_table,
            "otherwise": "false",
        }
        expect(
            "expect_column_values_to_be_in_set",
            "conformance",
            "error",
            f"a detail row without its {header} header",
            column=name,
            value_set=[True],
        )
    _life_events(profile, schema, typed, columns, expect)
    settings: dict = {"table": warehouse_table, "volume_key": schema.name, "columns": columns}
    if template := profile.tables.year_template(schema.name):
        # one suite for every year's table (`T_MCO19B`, `T_MCO23B`): see `TableSuites`
        settings["yearly"] = {"table": f"claims.{profile.warehouse_table(template)}", "volume_key": template}
    return {
        "name": warehouse_table,
        "expectations": expectations,
        "meta": {
            "health_ingest": settings,
            "notes": f"Scaffolded from the {profile.name} Table Schema of {schema.name}; edit freely.",
        },
    }


# --- implementation details -------------------------------------------------------------------


def _periods(typed: dict[str, str]) -> list[tuple[str, str]]:
    dates = {name.upper(): name for name, kind in typed.items() if kind in DATE_TYPES}
    pairs = []
    for upper, name in dates.items():
        for start, end in PERIOD_SUFFIXES:
            if upper.endswith(start) and upper[: -len(start)] + end in dates:
                pairs.append((name, dates[upper[: -len(start)] + end]))
    return pairs


def _headers(profile: ClaimsProfile, schema: TableSchema, descriptor: dict, kept) -> list[tuple[str, dict]]:
    """Header tables this table's rows must find: the schema's foreign keys to other claims tables of the
    profile (not to nomenclatures or referentials), or the project's own knowledge of the format."""
    found = []
    for foreign_key in descriptor.get("foreignKeys", []):
        if foreign_key.get("description") == "Nomenclature":
            continue
        header = foreign_key["reference"]["resource"]
        header = header.upper() if profile.table_names == "upper" else header
        fields, targets = foreign_key["fields"], foreign_key["reference"]["fields"]
        fields = [fields] if isinstance(fields, str) else fields
        targets = [targets] if isinstance(targets, str) else targets
        if header not in profile.tables or header == schema.name:
            continue
        # DCIR's claim headers, and the PMSI's stay (or establishment) tables, referenced by their own key
        stay = (
            bool(profile.tables.year_template(header))
            and len(targets) > 1  # a stay, not the establishment table (`T_MCOaaE`) an extract may not hold
            and set(targets) <= set(profile.tables[header].primary_key)  # an SSR stay spans weekly summaries
        )
        if not (header.endswith(("_PRS_F", "_IDE_AAAA_GN")) or stay):
            continue
        if all(f in kept and kept[f].action == "keep" for f in fields):
            found.append((header, dict(zip(fields, targets, strict=True))))
    known = HEADERS.get((profile.name, schema.name))
    if known:
        found.append(known)
    return found


def _life_events(profile: ClaimsProfile, schema: TableSchema, typed, columns: dict, expect) -> None:
    """Care dated before the person's birth or after their death, where the format carries both."""
    life = LIFE.get(profile.name)
    if not life or schema.name == life[0]:
        return
    patients, birth, death, service = life
    dated = [name for name in service if name in typed and typed[name] in DATE_TYPES]
    if not dated:
        return
    table = f"claims.{profile.warehouse_table(patients)}"
    when = f's."{dated[0].lower()}"::date'  # the service date of a claim is always written
    # birth dates are kept as a year and death dates as a year-month: compare at that precision
    checks = {
        "care_before_birth": f"EXISTS (SELECT 1 FROM {table} p WHERE p.patient_id = s.patient_id "
        f'AND p."{birth.lower()}" ~ \'^[0-9]{{4}}\' AND left(p."{birth.lower()}", 4)::int > '
        f"extract(year FROM {when}))",
        "care_after_death": f"EXISTS (SELECT 1 FROM {table} p WHERE p.patient_id = s.patient_id "
        f'AND p."{death.lower()}" ~ \'^[0-9]{{4}}-[0-9]{{2}}\' AND left(p."{death.lower()}", 7) < '
        f"to_char({when}, 'YYYY-MM'))",
    }
    for name, sql in checks.items():
        columns[name] = {"sql": sql, "requires": table, "otherwise": "false"}
        expect(
            "expect_column_values_to_be_in_set",
            "plausibility",
            "error",
            name.replace("_", " "),
            column=name,
            value_set=[False],
        )
