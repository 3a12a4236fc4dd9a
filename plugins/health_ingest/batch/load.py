"""Load one delivery of a source, whoever asks (the DAG task, the `ingest` and `pull` commands, the benchmark): the
loader of the source's kind, a pulled export's commit hook and release, an inbox delivery marked done."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from health_ingest.batch.lifecycle import BatchResult, ProgressCallback
from health_ingest.errors import ConfigurationError
from health_ingest.privacy.keyring import Keyring
from health_ingest.sources.bulk.pull import PulledExport, commit_hook, pull_export, release_export
from health_ingest.sources.inbox import mark_done
from health_ingest.sources.registry import Source

KINDS = ("fhir", "claims")


@dataclass(frozen=True)
class WrittenTable:
    """A warehouse table the batch wrote rows to, as consumers name it (`fhir.patient`, `claims.snds_er_prs_f`)."""

    schema: str
    table: str
    rows: int


@dataclass(frozen=True)
class LoadedDelivery:
    result: BatchResult
    tables: list[WrittenTable]


def load_delivery(
    source: Source,
    delivery: Path | str,
    *,
    url: str | None = None,
    keyring: Keyring | None = None,
    progress: ProgressCallback | None = None,
) -> LoadedDelivery:
    """One delivery as one batch of the source: all of it commits, or nothing does (see `lifecycle.run_batch`)."""
    delivery = Path(delivery)
    options = {"url": url, "keyring": keyring, "progress": progress}
    if source.kind == "claims":
        from health_ingest.batch.claims import run_claims_batch

        result = run_claims_batch(delivery, source, **options)
    elif source.kind == "fhir":
        from health_ingest.batch.fhir import run_fhir_batch

        # a pulled export moves the source's `_since` in the batch's transaction, and is released once committed
        result = run_fhir_batch(delivery, source, before_commit=commit_hook(source, delivery), **options)
        release_export(source, delivery)
    else:
        raise ConfigurationError(f"source {source.name}: kind {source.kind!r} is none of {', '.join(KINDS)}")
    if source.inbox and delivery.parent == source.inbox:
        mark_done(delivery)
    return LoadedDelivery(result, written_tables(result))


def pull_and_load(
    source: Source,
    *,
    full_refresh: bool = False,
    url: str | None = None,
    progress=None,
    warehouse: str | None = None,
    session=None,
) -> tuple[PulledExport, BatchResult]:
    """Pull the source's next export (or the one in flight) and load it as one batch."""
    export = pull_export(
        source, full_refresh=full_refresh, url=url, progress=progress, warehouse=warehouse, session=session
    )
    return export, load_delivery(source, export.delivery, url=warehouse).result


def written_tables(result: BatchResult) -> list[WrittenTable]:
    """The warehouse tables the batch loaded rows into."""
    tables = []
    for name, counts in sorted(result.counts.items()):
        if counts.rows_loaded:
            schema, _, table = result.tables[name].partition(".")
            tables.append(WrittenTable(schema, table, counts.rows_loaded))
    return tables
