"""The SNDS profile's table files, made from the official SNDS Table Schemas (the `schemas/` folder of the synthetic
SNDS and of the SNDS schema repository), each field given the privacy class the profile's roles make of it.

    python -m health_ingest.formats.snds_schemas SCHEMAS_FOLDER [PRODUCT ...]    # default product: PMSI

Each `<TABLE>.json` found under the products' folders is written beside `profile.json` unchanged but for a
`classification` on every field (identifier, quasi_identifier, code, amount, date, free_text), so that no column
is left unclassified, and for the stay keys: `ETA_NUM` (a FINESS number, `2A...` in Corsica) and the stay numbers
are text in most PMSI schemas and integers in a few; they are text in all, so that every table joins on them. Two
date formats of the PMSI are not dates the Table Schema standard can type: a month alone (`%m`: `SOR_MOI`,
`ADM_MOIS`) becomes an integer from 1 to 12, and a day-month-year date without separators (`%d%m%Y`: `ENT_DAT`,
`SOR_DAT`) text of eight digits, kept as written. Running it again on the same schemas writes the same files.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

PROFILE_FOLDER = Path(__file__).parent / "claims_profiles" / "snds"
DATE_TYPES = {"date", "datetime", "year", "yearmonth", "time"}
AMOUNT_NAME = re.compile(r"_MNT$|_QTE$|_MNT_|^MNT_|^NBR_|_NBR$|_NBJ$|^NB_|^DUR_|_DUR$|^QTE_|_PRI$|^PRI_")
AMOUNT_WORDS = re.compile(r"\b(montant|nombre|quantit|prix|tarif|dur[ée]e|co[uû]t|valoris|d[ée]lai)", re.IGNORECASE)
STAY_KEYS = {"ETA_NUM", "ETA_NUM_EPMSI", "RSA_NUM", "RHA_NUM", "RHS_NUM", "RHAD_NUM", "RIP_NUM", "SEQ_NUM", "SEJ_NUM"}
DATE_WORDS = re.compile(r"^(date|mois|ann[ée]e)\b", re.IGNORECASE)  # dates the schema types as text
QUASI_IDENTIFIERS = re.compile(r"^(AGE_|COD_SEX$|SEX_COD$|BEN_SEX_COD$|BDI_DEP$|BEN_RES_DPT$|AGE$|POI_|BEN_NAI_)")


def classify(field: dict, roles: dict) -> str:
    """The privacy class of one field, from the profile's roles first, then its name, type and description."""
    name = field["name"].upper()
    identifiers = {key.upper() for key in [*roles.get("identifiers", {}), *roles.get("person", [])]}
    if name in identifiers or name in {p.upper() for p in roles.get("providers", [])}:
        return "identifier"
    if any(re.search(pattern, name) for pattern in roles.get("drop_patterns", [])):
        return "free_text"
    if name in {d.upper() for d in roles.get("drop", [])}:
        return "quasi_identifier"
    if QUASI_IDENTIFIERS.match(name):
        return "quasi_identifier"
    if field.get("type") in DATE_TYPES or DATE_WORDS.match(field.get("description") or ""):
        return "date"
    if field.get("type") in {"integer", "number"} and (
        AMOUNT_NAME.search(name) or AMOUNT_WORDS.search(field.get("description") or "")
    ):
        return "amount"
    return "code"


def profile_tables(schemas: Path, products: list[str], roles: dict) -> dict[str, dict]:
    """Each table's descriptor, with its fields classified, by file name."""
    tables = {}
    for product in products:
        for path in sorted((schemas / product).rglob("*.json")):
            descriptor = json.loads(path.read_text(encoding="utf-8"))
            for field in descriptor["fields"]:
                field["classification"] = classify(field, roles)
                if field["name"].upper() in STAY_KEYS and field.get("type") in {"integer", "number"}:
                    _as_text(field)
                elif field.get("type") == "date" and field.get("format") == "%m":
                    field.update(type="integer", format="default", constraints={"minimum": 1, "maximum": 12})
                elif field.get("type") == "date" and field.get("format") == "%d%m%Y":
                    field.update(type="string", format="default", constraints={"pattern": "[0-9]{8}"})
            tables[path.name] = descriptor
    return tables


def _as_text(field: dict) -> None:
    field["type"] = "string"
    constraints = {k: v for k, v in (field.get("constraints") or {}).items() if k not in {"minimum", "maximum"}}
    if str(field.get("length") or "").isdigit():
        constraints["maxLength"] = int(field["length"])
    field["constraints"] = constraints


def write_profile_tables(schemas: Path, products: list[str], folder: Path = PROFILE_FOLDER) -> list[Path]:
    roles = json.loads((folder / "profile.json").read_text(encoding="utf-8"))["privacy"]
    written = []
    for name, descriptor in profile_tables(schemas, products, roles).items():
        target = folder / name
        target.write_text(json.dumps(descriptor, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(target)
    return written


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__.strip())
        return 0 if argv else 2
    schemas, products = Path(argv[0]), argv[1:] or ["PMSI"]
    written = write_profile_tables(schemas, products)
    print(f"{len(written)} table files written to {PROFILE_FOLDER}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
