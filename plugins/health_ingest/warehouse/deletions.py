"""An export's `deleted[]` and `error[]` files, applied inside the batch's load transaction."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator

import orjson

from health_ingest.deliveries import LandedFile
from health_ingest.errors import DeliveryError
from health_ingest.formats.ndjson import read_lines
from health_ingest.formats.resource_types import RESOURCE_TYPES
from health_ingest.privacy.tokens import Tokeniser

log = logging.getLogger(__name__)

# `Patient/123`, `https://server/fhir/Patient/123`, `Patient/123/_history/2`
DELETED_URL = re.compile(r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")
PAGE = 1000


def apply_deletions(cur, batch_id: str, files: list[LandedFile], tokens: Tokeniser) -> int:
    """Delete, by pseudonym, every resource the export lists as deleted; each is recorded in `ingest.deletions`
    (found or not) so that consumers can follow. A malformed entry fails the batch, naming file and line."""
    deleted = 0
    page: list[tuple[str, str]] = []
    for landed in files:
        for resource_type, resource_id in _deleted_entries(landed):
            page.append((resource_type, tokens.resource_id(resource_type, resource_id)))
            if len(page) >= PAGE:
                deleted += _delete_page(cur, batch_id, page)
                page = []
    if page:
        deleted += _delete_page(cur, batch_id, page)
    cur.execute("UPDATE ingest.batches SET rows_deleted = %s WHERE batch_id = %s", (deleted, batch_id))
    if files:
        log.info("export deletions: %d resources listed as deleted", deleted)
    return deleted


def record_export_errors(cur, batch_id: str, files: list[LandedFile]) -> int:
    """Count the OperationOutcome issues of `error[]` files by severity and code; their text stays in landing."""
    total = 0
    for landed in files:
        issues: Counter[tuple[str, str]] = Counter()
        for _, raw in read_lines(landed.path, landed.name):
            try:
                outcome = orjson.loads(raw)
                found = [(str(i.get("severity", "unknown")), str(i.get("code", "unknown"))) for i in outcome["issue"]]
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                found = [("unknown", "unreadable")]
            issues.update(found)
        for (severity, code), count in sorted(issues.items()):
            cur.execute(
                "INSERT INTO ingest.export_errors (batch_id, file_name, severity, code, issues) VALUES (%s, %s, %s, "
                "%s, %s)",
                (batch_id, landed.name, severity[:40], code[:40], count),
            )
        total += sum(issues.values())
        if issues:
            summary = ", ".join(f"{s}/{c}: {n}" for (s, c), n in sorted(issues.items()))
            log.warning(
                "%s: the server reported %d issues (%s); the file is kept in landing",
                landed.name,
                sum(issues.values()),
                summary,
            )
    return total


def _deleted_entries(landed: LandedFile) -> Iterator[tuple[str, str]]:
    for line_number, raw in read_lines(landed.path, landed.name):
        where = f"{landed.name} line {line_number}"
        try:
            bundle = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise DeliveryError(f"{where}: not JSON (a deleted file holds Bundles)") from None
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise DeliveryError(f"{where}: not a Bundle (a deleted file holds Bundles of DELETE entries)")
        for position, entry in enumerate(bundle.get("entry") or [], start=1):
            request = entry.get("request") if isinstance(entry, dict) else None
            if not isinstance(request, dict) or str(request.get("method", "")).upper() != "DELETE":
                raise DeliveryError(f"{where}: entry {position} has no request with method DELETE")
            match = DELETED_URL.search(str(request.get("url", "")))
            if not match or match["type"] not in RESOURCE_TYPES:
                raise DeliveryError(f"{where}: entry {position}: request.url is not <ResourceType>/<id>")
            yield match["type"], match["id"]


def _delete_page(cur, batch_id: str, page: list[tuple[str, str]]) -> int:
    by_type: dict[str, list[str]] = {}
    for resource_type, token in page:
        by_type.setdefault(resource_type, []).append(token)
    for resource_type, ids in by_type.items():
        table = resource_type.lower()
        cur.execute("SELECT to_regclass(%s)", (f"fhir.{table}",))
        found: set[str] = set()
        if cur.fetchone()[0] is not None:
            cur.execute(f"DELETE FROM fhir.{table} WHERE id = ANY(%s) RETURNING id", (ids,))
            found = {row[0] for row in cur.fetchall()}
        cur.executemany(
            "INSERT INTO ingest.deletions (batch_id, resource_type, id, found) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            [(batch_id, resource_type, token, token in found) for token in ids],
        )
    return len(page)
