"""Great Expectations Data Docs per batch, from the batch's `ingest.dq_results`, linked from the batch row.

Rendering imports Great Expectations (seconds), so it runs after the gate's decision: from the DAG task that
follows a committed batch, or right away for a rejected one, whose reasons an operator needs.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections import defaultdict
from datetime import datetime
from importlib import resources
from pathlib import Path
from urllib.parse import unquote

from health_ingest import config
from health_ingest.quality.results import evaluated_kwargs, observed_text, split_expectation

STYLESHEET = "data-docs.css"
# what Great Expectations' pages load from CDNs: stylesheets, fonts and scripts a machine without network cannot get
REMOTE_ASSET = re.compile(
    r"<link\b[^>]*\bhref=\"https?://[^\"]*\"[^>]*>|<script\b[^>]*\bsrc=\"https?://[^\"]*\"[^>]*>\s*</script>",
    re.IGNORECASE,
)
REMOTE_IMAGE = re.compile(r'(<img\b[^>]*?\bsrc=)"https?://[^"]*"', re.IGNORECASE)  # the logo, served locally

log = logging.getLogger(__name__)


def publish_data_docs(conn, batch_id: str) -> Path | None:
    """Render the batch's results; returns (and records in `ingest.batches.dq_report`) its index page."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT table_name, expectation, category, severity, success, observed_value, checked_at "
            "FROM ingest.dq_results WHERE batch_id = %s ORDER BY result_id",
            (batch_id,),
        )
        rows = cur.fetchall()
    if not rows:
        return None
    run_time = max(row[6] for row in rows)
    pages = _render(batch_id, [row[:6] for row in rows], run_time)
    index = config.state_dir() / "quality" / "batches" / f"{batch_id}.html"
    index.parent.mkdir(parents=True, exist_ok=True)
    stylesheet = _write_stylesheet(index.parent / "static")
    index.write_text(_index_page(batch_id, pages, run_time, stylesheet, index.parent), encoding="utf-8")
    with conn.cursor() as cur:
        cur.execute("UPDATE ingest.batches SET dq_report = %s WHERE batch_id = %s", (str(index), batch_id))
    if not conn.autocommit:
        conn.commit()
    log.info("batch %s: Data Docs at %s", batch_id, index)
    return index


# --- implementation details -------------------------------------------------------------------


def _render(batch_id: str, rows: list[tuple], run_time: datetime) -> list[tuple[str, bool, str, list]]:
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
    failures: dict[str, list[str]] = defaultdict(list)
    for table, expectation, category, severity, success, observed in rows:
        observed = observed if isinstance(observed, dict) else json.loads(observed)
        kind, column = split_expectation(expectation)
        # the parameters as evaluated for this batch, never `{'$PARAMETER': ...}`
        kwargs = {**evaluated_kwargs(observed), **({"column": column} if column else {})}
        if not success:
            failures[table].append(f"{expectation}: {observed_text(observed)} [{category}, {severity}]")
        configuration = ExpectationConfiguration(
            type=kind, kwargs=kwargs, meta={"category": category, "severity": severity, "table": table}
        )
        result = {k: v for k, v in observed.items() if k not in {"kwargs", "suite"}}
        by_suite[(observed.get("suite", table), table)].append(
            ExpectationValidationResult(success=success, expectation_config=configuration, result=result)
        )
    run = RunIdentifier(run_name=f"batch-{batch_id}", run_time=run_time)
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
                success=success,
                results=results,
                suite_name=table,
                meta={
                    "batch_id": batch_id,
                    "suite": suite,
                    "run_id": run,
                    "great_expectations_version": gx.__version__,
                },
            ),
        )
        pages.append((key, success, table))
    context.build_data_docs()
    rendered = []
    for key, success, table in pages:
        url = context.get_docs_sites_urls(resource_identifier=key)[0]["site_url"]
        page = Path(unquote(url.removeprefix("file://")))
        _use_local_assets(page)
        rendered.append((table, success, str(page), failures.get(table, [])))
    if rendered:
        _use_local_assets(_site_of(Path(rendered[0][2])) / "index.html")
    return rendered


def _site_of(page: Path) -> Path:
    """The Data Docs site a page belongs to: the folder with its `index.html` and `static/`."""
    return next((p for p in page.parents if (p / "static").is_dir() and (p / "index.html").exists()), page.parent)


def _write_stylesheet(folder: Path) -> Path:
    """The Data Docs stylesheet, copied beside the pages that use it."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / STYLESHEET
    target.write_bytes((resources.files("health_ingest.quality") / "static" / STYLESHEET).read_bytes())
    return target


def _use_local_assets(page: Path) -> None:
    """Drop what a page loads from CDNs and link the local stylesheet, written into its site's static folder."""
    if not page.exists():
        return
    stylesheet = _write_stylesheet(_site_of(page) / "static" / "health-ingest")
    site = _site_of(page)
    text = REMOTE_ASSET.sub("", page.read_text(encoding="utf-8"))
    logo = html.escape(os.path.relpath(site / "static" / "images" / "logo-long.png", page.parent))
    text = REMOTE_IMAGE.sub(lambda match: f'{match[1]}"{logo}"', text)
    link = f'<link rel="stylesheet" href="{html.escape(os.path.relpath(stylesheet, page.parent))}">'
    text = text.replace("</head>", link + "</head>", 1)
    page.write_text(text, encoding="utf-8")


def _index_page(
    batch_id: str, pages: list[tuple[str, bool, str, list]], run_time: datetime, stylesheet: Path, folder: Path
) -> str:
    """Per table: passed or FAILED, what failed and why, and the link to its page; failed tables first."""
    from health_ingest import __version__

    rows = "\n".join(
        f'<tr class="{"passed" if ok else "failed"}"><td><a href="{html.escape(url)}">{html.escape(table)}</a></td>'
        f'<td class="status-{"passed" if ok else "failed"}">{"passed" if ok else "FAILED"}</td>'
        f"<td>{'<br>'.join(html.escape(why) for why in failures) or '-'}</td></tr>"
        for table, ok, url, failures in sorted(pages, key=lambda page: (page[1], page[0]))
    )
    css = html.escape(os.path.relpath(stylesheet, folder))
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Batch {batch_id}: data quality</title>"
        f"<link rel='stylesheet' href='{css}'></head><body><main><h1>Data quality of batch {batch_id}</h1>"
        f"<p class='muted'>Run batch-{batch_id}, checked {run_time.isoformat(timespec='seconds')}, "
        f"health-ingest {__version__}</p>"
        "<table class='index'><thead><tr><th>Table</th><th>Result</th><th>What failed and why</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></main></body></html>"
    )
