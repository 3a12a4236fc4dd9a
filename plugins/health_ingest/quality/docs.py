"""Great Expectations Data Docs per batch, from the batch's `ingest.dq_results`, linked from the batch row.

Rendering imports Great Expectations (seconds), so it runs after the gate's decision: from the DAG task that
follows a committed batch, or right away for a rejected one, whose reasons an operator needs.
"""

from __future__ import annotations

import html
import json
import logging
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote

from health_ingest import config

log = logging.getLogger(__name__)


def publish_data_docs(conn, batch_id: str) -> Path | None:
    """Render the batch's results; returns (and records in `ingest.batches.dq_report`) its index page."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT table_name, expectation, category, severity, success, observed_value "
            "FROM ingest.dq_results WHERE batch_id = %s ORDER BY result_id",
            (batch_id,),
        )
        rows = cur.fetchall()
    if not rows:
        return None
    pages = _render(batch_id, rows)
    index = config.state_dir() / "quality" / "batches" / f"{batch_id}.html"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(_index_page(batch_id, pages), encoding="utf-8")
    with conn.cursor() as cur:
        cur.execute("UPDATE ingest.batches SET dq_report = %s WHERE batch_id = %s", (str(index), batch_id))
    if not conn.autocommit:
        conn.commit()
    log.info("batch %s: Data Docs at %s", batch_id, index)
    return index


# --- implementation details -------------------------------------------------------------------


def _render(batch_id: str, rows: list[tuple]) -> list[tuple[str, bool, str]]:
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.core import ExpectationSuiteValidationResult, ExpectationValidationResult
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    context = gx.get_context(mode="file", project_root_dir=str(config.state_dir() / "quality"))
    by_suite: dict[tuple[str, str], list] = defaultdict(list)
    for table, expectation, category, severity, success, observed in rows:
        observed = observed if isinstance(observed, dict) else json.loads(observed)
        kind, _, column = expectation.partition("(")
        kwargs = {**observed.get("kwargs", {}), **({"column": column.rstrip(")")} if column.rstrip(")") else {})}
        configuration = ExpectationConfiguration(
            type=kind, kwargs=kwargs, meta={"category": category, "severity": severity, "table": table}
        )
        result = {k: v for k, v in observed.items() if k not in {"kwargs", "suite"}}
        by_suite[(observed.get("suite", table), table)].append(
            ExpectationValidationResult(success=success, expectation_config=configuration, result=result)
        )
    run = RunIdentifier(run_name=f"batch-{batch_id}", run_time=datetime.now(UTC))
    pages = []
    for (suite, table), results in sorted(by_suite.items()):
        success = all(r.success for r in results)
        key = ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=table),
            run_id=run,
            batch_identifier=batch_id,
        )
        context.validation_results_store.set(
            key,
            ExpectationSuiteValidationResult(
                success=success, results=results, suite_name=table, meta={"batch_id": batch_id, "suite": suite}
            ),
        )
        pages.append((key, success, table))
    context.build_data_docs()
    rendered = []
    for key, success, table in pages:
        url = context.get_docs_sites_urls(resource_identifier=key)[0]["site_url"]
        rendered.append((table, success, unquote(url.removeprefix("file://"))))
    return rendered


def _index_page(batch_id: str, pages: list[tuple[str, bool, str]]) -> str:
    items = "\n".join(
        f'<li class="{"passed" if ok else "failed"}">{"passed" if ok else "FAILED"}: '
        f'<a href="{html.escape(url)}">{html.escape(table)}</a></li>'
        for table, ok, url in pages
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Batch {batch_id}: data quality</title>"
        "<style>.failed{color:#b00;font-weight:bold}.passed{color:#060}</style></head>"
        f"<body><h1>Data quality of batch {batch_id}</h1><ul>{items}</ul></body></html>"
    )
