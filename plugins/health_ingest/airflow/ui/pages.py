"""The Ingestion view's HTML pages: overview, batch, Data Docs, consumers feed. Plain HTML and inline SVG, styled by
one local stylesheet; the only script follows the Airflow UI's light or dark theme."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from html import escape
from urllib.parse import quote

from health_ingest.airflow.ui import charts
from health_ingest.quality.results import KAHN_CATEGORIES, expected_text, observed_text, split_expectation
from health_ingest.warehouse.monitoring import BatchRecord, BatchSummary, DayActivity, FeedEntry, SourceActivity


@dataclass(frozen=True)
class Links:
    """Where the plugin is mounted and where the Airflow UI is, as the browser sees them."""

    plugin: str  # e.g. /ingestion
    airflow: str  # e.g. '' (the UI at the server's root)

    def page(self, path: str = "/") -> str:
        return self.plugin + path

    def batch(self, batch_id: str) -> str:
        return self.plugin + "/batches/" + quote(batch_id)

    def airflow_run(self, dag_id: str, run_id: str) -> str:
        return f"{self.airflow}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"

    def airflow_task(
        self, dag_id: str, run_id: str, task_id: str, try_number: int | None, map_index: int | None
    ) -> str:
        link = self.airflow_run(dag_id, run_id) + f"/tasks/{quote(task_id, safe='')}"
        if map_index is not None and map_index >= 0:
            link += f"/mapped/{map_index}"
        return link + (f"?try_number={try_number}" if try_number else "")

    def airflow_dag_runs(self, dag_id: str) -> str:
        return f"{self.airflow}/dags/{quote(dag_id, safe='')}/runs"


@dataclass(frozen=True)
class SourceRow:
    name: str
    kind: str
    format: str
    owner: str
    dag_id: str
    expect_every: timedelta | None
    activity: SourceActivity
    freshness: str
    loaded_per_day: list[float]


def overview_page(links: Links, rows: list[SourceRow], days: list[date], activity: list[DayActivity], now) -> str:
    by_day: dict[date, list[DayActivity]] = defaultdict(list)
    for entry in activity:
        by_day[entry.day.date()].append(entry)
    loaded = [float(sum(e.rows_loaded for e in by_day[d])) for d in days]
    quarantined = [float(sum(e.rows_quarantined for e in by_day[d])) for d in days]
    longest = [max((e.max_seconds or 0.0 for e in by_day[d]), default=0.0) for d in days]
    totals = {
        "batches": sum(e.batches for e in activity),
        "committed": sum(e.committed for e in activity),
        "rejected": sum(e.rejected for e in activity),
        "failed": sum(e.failed for e in activity),
        "rows read": sum(e.rows_read for e in activity),
        "rows loaded": sum(e.rows_loaded for e in activity),
        "rows quarantined": sum(e.rows_quarantined for e in activity),
    }
    table_rows = "".join(_source_row(links, row, now) for row in rows)
    tiles = "".join(
        f'<div class="tile"><div class="tile-value">{value:,}</div><div class="tile-label">{escape(label)}</div></div>'
        for label, value in totals.items()
    )
    body = f"""
<h1>Ingestion</h1>
<p class="lead">Every declared source, its last batch and whether its data is on time; the last {len(days)} days
across all sources.</p>
<section aria-label="totals"><h2>Last {len(days)} days, all sources</h2><div class="tiles">{tiles}</div></section>
<section aria-label="charts" class="charts">
{charts.bar_chart(days, loaded, title="Rows loaded per day", unit="rows", css_class="bar-loaded")}
{charts.bar_chart(days, quarantined, title="Rows quarantined per day", unit="rows", css_class="bar-quarantined")}
{charts.bar_chart(days, longest, title="Longest batch per day (s)", unit="s", css_class="bar-duration")}
</section>
<section aria-label="sources"><h2>Sources</h2>
<table class="grid" id="sources">
<thead><tr><th>Source</th><th>Kind / format</th><th>Owner</th><th>Freshness</th><th>Last committed batch</th>
<th>Last batch</th><th>Rows loaded, {len(days)} days</th></tr></thead>
<tbody>{table_rows}</tbody></table></section>
"""
    return layout("Ingestion", body, links, active="overview")


def batch_page(links: Links, record: BatchRecord, dag_id: str) -> str:
    s = record.summary
    airflow_links = []
    if record.airflow_dag_id and record.airflow_run_id:
        airflow_links.append(
            f'<a target="_top" href="{escape(links.airflow_run(record.airflow_dag_id, record.airflow_run_id))}">'
            "Airflow run</a>"
        )
        if record.airflow_task_id:
            task_link = links.airflow_task(
                record.airflow_dag_id,
                record.airflow_run_id,
                record.airflow_task_id,
                record.airflow_try_number,
                record.airflow_map_index,
            )
            airflow_links.append(f'<a target="_top" href="{escape(task_link)}">task log</a>')
    else:
        airflow_links.append(
            f'<a target="_top" href="{escape(links.airflow_dag_runs(dag_id))}">runs of {escape(dag_id)}</a> '
            '<span class="muted">(loaded outside Airflow: no run recorded)</span>'
        )
    facts = [
        ("Status", _status(s.status)),
        ("Source", f'{escape(s.source)} <span class="muted">({escape(s.kind)})</span>'),
        ("Started", _time(s.started_at)),
        ("Finished", _time(s.finished_at)),
        ("Duration", _seconds(s.seconds)),
        ("Commit sequence", str(s.commit_seq) if s.commit_seq is not None else "-"),
        ("Key id", f"<code>{escape(record.key_id)}</code>"),
        ("Hosting decision", escape(record.hosting or "not recorded")),
        ("Airflow", " &middot; ".join(airflow_links)),
        ("Data Docs", f'<a href="{escape(links.batch(s.batch_id))}/docs">quality results of this batch</a>'),
        ("JSON", f'<a href="{escape(links.page("/api/batches/" + s.batch_id))}">this batch</a>'),
    ]
    if record.rekeyed_from:
        facts.append(("Re-keyed from", f"<code>{escape(record.rekeyed_from)}</code>"))
    facts_html = "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in facts)
    error = f'<p class="error" id="reason"><strong>Why:</strong> {escape(record.error)}</p>' if record.error else ""
    body = f"""
<p class="crumbs"><a href="{escape(links.page("/"))}">Ingestion</a> &rsaquo; batch</p>
<h1>Batch <code>{escape(s.batch_id)}</code></h1>
{error}
<dl class="facts">{facts_html}</dl>
<section class="counts"><h2>Rows</h2>{_count_tiles(s)}</section>
{_steps(record)}
{_types(record)}
{_files(record)}
{_quarantine(record)}
{_quality(record)}
{_privacy(record)}
"""
    return layout(f"Batch {s.batch_id}", body, links, active="batch")


def data_docs_page(links: Links, summary: BatchSummary, results, *, version: str) -> str:
    """The batch's quality results as Data Docs: an index per table of what failed and why, then every result."""
    by_table: dict[str, list] = defaultdict(list)
    for result in results:
        by_table[result.table_name].append(result)
    index_rows = []
    sections = []
    for table in sorted(by_table, key=lambda t: (all(r.success for r in by_table[t]), t)):
        table_results = by_table[table]
        failed = [r for r in table_results if not r.success]
        anchor = "table-" + "".join(c if c.isalnum() else "-" for c in table)
        why = "; ".join(f"{_expectation_name(r)}: {observed_text(r.observed)}" for r in failed) or "-"
        index_rows.append(
            f'<tr class="{"failed" if failed else "passed"}"><td><a href="#{anchor}">{escape(table)}</a></td>'
            f"<td>{_status('failed' if failed else 'passed')}</td><td>{len(failed)} of {len(table_results)}</td>"
            f"<td>{escape(why)}</td></tr>"
        )
        items = "".join(
            f'<tr class="{"failed" if not r.success else "passed"}">'
            f"<td>{_status('passed' if r.success else 'failed')}</td><td>{escape(r.category)}</td>"
            f"<td>{escape(r.severity)}</td><td><code>{escape(_expectation_name(r))}</code><br>"
            f"{escape(expected_text(r.expectation, r.observed))}</td><td>{escape(observed_text(r.observed))}</td></tr>"
            for r in sorted(table_results, key=lambda r: (r.success, r.category, r.expectation))
        )
        sections.append(
            f'<section id="{anchor}"><h3>{escape(table)}</h3><table class="grid"><thead><tr><th>Result</th>'
            "<th>Category</th><th>Severity</th><th>Expectation (as evaluated for this batch)</th><th>Observed</th>"
            f"</tr></thead><tbody>{items}</tbody></table></section>"
        )
    run_time = max((r.checked_at for r in results), default=summary.started_at)
    body = f"""
<p class="crumbs"><a href="{escape(links.page("/"))}">Ingestion</a> &rsaquo;
<a href="{escape(links.batch(summary.batch_id))}">batch</a> &rsaquo; Data Docs</p>
<h1>Data Docs: batch <code>{escape(summary.batch_id)}</code></h1>
<dl class="facts"><dt>Run name</dt><dd>batch-{escape(summary.batch_id)}</dd>
<dt>Run time</dt><dd>{_time(run_time)}</dd><dt>Source</dt><dd>{escape(summary.source)}</dd>
<dt>Status</dt><dd>{_status(summary.status)}</dd><dt>Version</dt><dd>health-ingest {escape(version)}</dd></dl>
<section aria-label="index"><h2>Per table</h2>
<table class="grid" id="docs-index"><thead><tr><th>Table</th><th>Result</th><th>Failed</th><th>What failed and why</th>
</tr></thead><tbody>{"".join(index_rows) or '<tr><td colspan="4">No expectation ran on this batch.</td></tr>'}
</tbody></table></section>
<section aria-label="results"><h2>Every expectation</h2>{"".join(sections)}</section>
"""
    return layout(f"Data Docs {summary.batch_id}", body, links, active="batch")


def feed_page(links: Links, entries: list[FeedEntry], table_names) -> str:
    rows = "".join(
        f'<tr><td>{e.summary.commit_seq}</td><td><a href="{escape(links.batch(e.summary.batch_id))}">'
        f"<code>{escape(e.summary.batch_id[:8])}</code></a></td><td>{escape(e.summary.source)}</td>"
        f"<td>{_time(e.summary.committed_at)}</td><td>"
        + ", ".join(
            f"<code>{escape(table_names(e.summary, name))}</code> {rows:,}"
            for name, rows in sorted(e.rows_by_type.items())
            if rows
        )
        + f"</td><td>{e.summary.rows_deleted:,}</td></tr>"
        for e in entries
    )
    body = f"""
<h1>Consumers</h1>
<p class="lead">Committed batches as downstream consumers read them: every batch with <code>status = 'committed'</code>
and a <code>commit_seq</code> above the consumer's watermark, in <code>commit_seq</code> order (commits are serialised);
rows carry their <code>batch_id</code>. A <code>NOTIFY health_ingest_batches</code> fires at each commit and each DAG
emits one Airflow Asset event per table written. JSON: <a href="{escape(links.page("/api/feed"))}">/api/feed</a>
(<code>?after=</code> a watermark).</p>
<table class="grid" id="feed"><thead><tr><th>commit_seq</th><th>Batch</th><th>Source</th><th>Committed</th>
<th>Tables written (rows)</th><th>Deleted</th></tr></thead><tbody>{rows}</tbody></table>
"""
    return layout("Consumers", body, links, active="consumers")


def layout(title: str, body: str, links: Links, *, active: str) -> str:
    nav = "".join(
        f'<a class="{"active" if key == active else ""}" href="{escape(links.page(path))}">{label}</a>'
        for key, path, label in (
            ("overview", "/", "Overview"),
            ("batches", "/batches", "Batches"),
            ("consumers", "/consumers", "Consumers"),
            ("api", "/openapi.json", "API"),
        )
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<link rel="stylesheet" href="{escape(links.page("/static/ingestion.css"))}">
<script src="{escape(links.page("/static/theme.js"))}"></script>
</head><body><nav class="top">{nav}</nav><main>{body}</main></body></html>"""


def batches_page(links: Links, batches: list[BatchSummary], *, next_before: str | None, source: str | None) -> str:
    rows = "".join(
        f'<tr><td><a href="{escape(links.batch(b.batch_id))}"><code>{escape(b.batch_id[:8])}</code></a></td>'
        f"<td>{escape(b.source)}</td><td>{_status(b.status)}</td><td>{_time(b.started_at)}</td>"
        f"<td>{_seconds(b.seconds)}</td><td>{b.rows_read:,}</td><td>{b.rows_loaded:,}</td>"
        f"<td>{b.rows_quarantined:,}</td></tr>"
        for b in batches
    )
    more = ""
    if next_before:
        query = f"?before={quote(next_before)}" + (f"&source={quote(source)}" if source else "")
        more = f'<p><a href="{escape(links.page("/batches" + query))}">Older batches</a></p>'
    body = f"""
<h1>Batches{" of " + escape(source) if source else ""}</h1>
<table class="grid" id="batches"><thead><tr><th>Batch</th><th>Source</th><th>Status</th><th>Started</th>
<th>Duration</th><th>Read</th><th>Loaded</th><th>Quarantined</th></tr></thead><tbody>{rows}</tbody></table>{more}
"""
    return layout("Batches", body, links, active="batches")


# --- implementation details -------------------------------------------------------------------


def _source_row(links: Links, row: SourceRow, now: datetime) -> str:
    activity = row.activity
    committed = activity.last_committed
    if committed is not None:
        age = now - committed.committed_at
        last_committed = (
            f'<a href="{escape(links.batch(committed.batch_id))}">{_age(age)} ago</a>'
            f'<div class="muted">{_time(committed.committed_at)} &middot; {committed.rows_loaded:,} rows</div>'
        )
    else:
        last_committed = '<span class="muted">never</span>'
    last = activity.last
    last_html = (
        f'{_status(last.status)} <a href="{escape(links.batch(last.batch_id))}">{_time(last.started_at)}</a>'
        if last
        else '<span class="muted">no batch yet</span>'
    )
    cadence = f"expected every {_age(row.expect_every)}" if row.expect_every else "no expected cadence"
    spark = charts.sparkline(row.loaded_per_day, label=f"rows loaded per day by {row.name}")
    return (
        f'<tr data-source="{escape(row.name)}"><td><a href="{escape(links.page("/batches?source=" + row.name))}">'
        f'{escape(row.name)}</a><div class="muted">{escape(row.dag_id)}</div></td>'
        f"<td>{escape(row.kind)} / {escape(row.format)}</td><td>{escape(row.owner)}</td>"
        f'<td><span class="fresh fresh-{row.freshness.replace(" ", "-")}">{escape(row.freshness)}</span>'
        f'<div class="muted">{cadence}</div></td>'
        f"<td>{last_committed}</td><td>{last_html}</td><td>{spark}</td></tr>"
    )


def _count_tiles(s: BatchSummary) -> str:
    counts = [("read", s.rows_read), ("loaded", s.rows_loaded), ("quarantined", s.rows_quarantined)]
    counts.append(("deleted", s.rows_deleted))
    return (
        '<div class="tiles">'
        + "".join(
            f'<div class="tile"><div class="tile-value">{v:,}</div><div class="tile-label">{k}</div></div>'
            for k, v in counts
        )
        + "</div>"
    )


def _steps(record: BatchRecord) -> str:
    steps = {k: v for k, v in record.step_seconds.items() if k != "elapsed"}
    if not steps:
        return (
            '<section><h2>Timings per step</h2><p class="muted">Steps are timed when a batch commits; this batch '
            f"ran {_seconds(record.summary.seconds)} in all.</p></section>"
        )
    bars = charts.step_bars(steps)
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td class=num>{seconds:.2f} s</td><td>{bars[name]}</td></tr>"
        for name, seconds in steps.items()
    )
    total = record.step_seconds.get("elapsed", record.summary.seconds)
    return (
        f'<section><h2>Timings per step</h2><p class="muted">{_seconds(total)} in all; steps overlap (they run '
        f'side by side), so they add up to more.</p><table class="grid" id="steps"><tbody>{rows}</tbody></table>'
        "</section>"
    )


def _types(record: BatchRecord) -> str:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for f in record.files:
        if f.status == "loaded":
            t = totals[f.resource_type or f.file_name]
            t[0] += f.rows_read
            t[1] += f.rows_loaded
            t[2] += f.rows_quarantined
    for resource_type, deleted in record.deleted_by_type.items():
        totals[resource_type][3] += deleted
    if not totals:
        return ""
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td class=num>{r:,}</td><td class=num>{ld:,}</td><td class=num>{q:,}</td>"
        f"<td class=num>{d:,}</td></tr>"
        for name, (r, ld, q, d) in sorted(totals.items())
    )
    return (
        '<section><h2>Per resource type or table</h2><table class="grid" id="types"><thead><tr><th>Type or table</th>'
        "<th>Read</th><th>Loaded</th><th>Quarantined</th><th>Deleted</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></section>"
    )


def _files(record: BatchRecord) -> str:
    if not record.files:
        return (
            '<section><h2>Files</h2><p class="muted">No file is recorded: a batch that did not commit keeps only '
            "what it recorded before its rollback.</p></section>"
        )
    rows = "".join(
        f"<tr><td>{f.file_no}</td><td>{escape(f.file_name)}</td><td>{escape(f.resource_type or '-')}</td>"
        f"<td>{escape(f.status)}{' (' + escape(f.skip_reason) + ')' if f.skip_reason else ''}</td>"
        f"<td class=num>{f.bytes:,}</td><td class=num>{f.rows_read:,}</td><td class=num>{f.rows_loaded:,}</td>"
        f"<td class=num>{f.rows_quarantined:,}</td></tr>"
        for f in record.files
    )
    return (
        '<section><h2>Files</h2><table class="grid" id="files"><thead><tr><th>#</th><th>File</th><th>Type</th>'
        "<th>Status</th><th>Bytes</th><th>Read</th><th>Loaded</th><th>Quarantined</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></section>"
    )


def _quarantine(record: BatchRecord) -> str:
    if not record.quarantine:
        return '<section><h2>Quarantine</h2><p class="muted">No record quarantined.</p></section>'
    by_reason: dict[str, list] = defaultdict(list)
    for item in record.quarantine:
        by_reason[item.reason].append(item)
    rows = "".join(
        f"<tr><td><code>{escape(reason)}</code></td><td class=num>{sum(i.records for i in items):,}</td>"
        f"<td>{escape(', '.join(f'{i.file_name} ({i.records:,})' for i in items))}</td></tr>"
        for reason, items in sorted(by_reason.items(), key=lambda kv: -sum(i.records for i in kv[1]))
    )
    return (
        '<section><h2>Quarantine, by reason</h2><p class="muted">Reason codes and counts only: the records and '
        "their values stay in the ingestion zone.</p>"
        '<table class="grid" id="quarantine"><thead><tr><th>Reason</th><th>Records</th><th>Files</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></section>"
    )


def _quality(record: BatchRecord) -> str:
    if not record.quality:
        return '<section><h2>Data quality</h2><p class="muted">No expectation ran on this batch.</p></section>'
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for result in record.quality:
        groups[(result.category, result.table_name)].append(result)
    order = {c: i for i, c in enumerate(KAHN_CATEGORIES)}
    blocks = []
    failing = {c for (c, _), results in groups.items() if not all(r.success for r in results)}
    for category in sorted({c for c, _ in groups}, key=lambda c: (c not in failing, order.get(c, 9))):
        tables = sorted(
            (t for c, t in groups if c == category), key=lambda t: (all(r.success for r in groups[(category, t)]), t)
        )
        rows = []
        for table in tables:
            results = sorted(groups[(category, table)], key=lambda r: (r.success, r.severity != "error"))
            failed = sum(not r.success for r in results)
            for position, r in enumerate(results):
                head = (
                    f'<td rowspan="{len(results)}">{escape(table)}<div class="muted">{failed} failed of '
                    f"{len(results)}</div></td>"
                    if position == 0
                    else ""
                )
                rows.append(
                    f'<tr class="{"failed" if not r.success else "passed"}">{head}'
                    f"<td>{_status('passed' if r.success else 'failed')}</td><td>{escape(r.severity)}</td>"
                    f"<td><code>{escape(_expectation_name(r))}</code></td>"
                    f"<td>{escape(observed_text(r.observed))}</td></tr>"
                )
        failed_total = sum(not r.success for (c, _), rs in groups.items() if c == category for r in rs)
        blocks.append(
            f'<h3>{escape(category)} <span class="muted">({failed_total} failed)</span></h3>'
            f'<table class="grid quality" data-category="{escape(category)}"><thead><tr><th>Table</th><th>Result</th>'
            f"<th>Severity</th><th>Expectation</th><th>Observed</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
    return '<section id="quality"><h2>Data quality, by Kahn category and table</h2>' + "".join(blocks) + "</section>"


def _privacy(record: BatchRecord) -> str:
    if not record.privacy:
        return ""
    rows = "".join(
        f"<tr><td>{escape(p.check_name)}</td><td>{p.k}</td><td>{p.classes:,}</td><td>{p.classes_below_k:,}</td>"
        f"<td>{p.records_below_k:,}</td><td>{escape(p.action)}</td><td>{_status('passed' if p.passed else 'failed')}"
        "</td></tr>"
        for p in record.privacy
    )
    return (
        '<section><h2>Re-identification gate</h2><table class="grid"><thead><tr><th>Check</th><th>k</th>'
        "<th>Groups</th><th>Groups below k</th><th>Records below k</th><th>Action</th><th>Result</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></section>"
    )


def _expectation_name(result) -> str:
    kind, column = split_expectation(result.expectation)
    return f"{kind}({column})" if column else kind


def _status(status: str) -> str:
    return f'<span class="status status-{escape(status)}">{escape(status)}</span>'


def _time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return f'<time datetime="{value.isoformat()}">{value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()}</time>'


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _age(age: timedelta) -> str:
    seconds = age.total_seconds()
    if seconds < 3600:
        return f"{max(int(seconds // 60), 0)} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"
