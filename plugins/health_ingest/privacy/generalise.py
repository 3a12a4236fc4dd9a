"""Quasi-identifiers made coarse: birth dates, very old ages, postal codes."""

from __future__ import annotations

# HIPAA Safe Harbor: three-digit ZIP prefixes covering fewer than 20,000 people become 000.
SPARSE_US_ZIP3 = frozenset(
    {
        "036",
        "059",
        "063",
        "102",
        "203",
        "556",
        "692",
        "790",
        "821",
        "823",
        "830",
        "831",
        "878",
        "879",
        "884",
        "890",
        "893",
    }
)
FRANCE = {"FR", "FRA", "FRANCE"}
UNITED_STATES = {"US", "USA", "UNITED STATES"}
OLDEST_AGE_SHOWN = 89


def generalise_birth_date(value: str, *, precision: str, reference_year: int) -> str:
    """`YYYY` or `YYYY-MM`; anyone older than 89 is shown as born 90 years before the reference year."""
    year = value[:4]
    if year.isdigit() and reference_year - int(year) > OLDEST_AGE_SHOWN:
        return str(reference_year - OLDEST_AGE_SHOWN - 1)
    return value[: 4 if precision == "year" else 7]


def generalise_postal_code(code: str, country: str | None) -> str | None:
    """French codes keep their département (2 digits, 3 overseas); US ZIPs their 3 digits; others are dropped."""
    country = (country or "").strip().upper()
    digits = code.strip()
    if country in FRANCE:
        return digits[:3] if digits.startswith(("97", "98")) else digits[:2]
    if country in UNITED_STATES:
        prefix = digits[:3]
        return "000" if prefix in SPARSE_US_ZIP3 else prefix
    return None
