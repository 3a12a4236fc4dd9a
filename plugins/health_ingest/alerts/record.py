"""Sent alerts kept in the warehouse (`ingest.alerts`): each event is sent once, whichever process or retry sees it."""

from __future__ import annotations

from datetime import datetime

from health_ingest.alerts.content import Alert


def claim(conn, alert: Alert) -> bool:
    """Record the event; False when it was already recorded (then it is not sent again)."""
    with conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO ingest.alerts (event_key, source, kind, severity, batch_id, subject)
            VALUES (%s, %s, %s, %s, %s, %s)
            ON CONFLICT (event_key) DO NOTHING
            RETURNING event_key
            """,
            (alert.event_key, alert.source, alert.kind, alert.severity, alert.batch_id, alert.subject),
        )
        return cur.fetchone() is not None


def record_delivery(conn, alert: Alert, delivered: list[str], undelivered: list[str]) -> None:
    with conn.cursor() as cur:
        cur.execute(
            "UPDATE ingest.alerts SET delivered = %s, undelivered = %s WHERE event_key = %s",
            (delivered, undelivered, alert.event_key),
        )


def last_cadence_alert(conn, source: str) -> tuple[str, str] | None:
    """The source's latest quiet or recovered alert, (kind, event_key): whether it is quiet now."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT kind, event_key FROM ingest.alerts
             WHERE source = %s AND kind IN ('quiet', 'recovered')
             ORDER BY created_at DESC, kind = 'recovered' DESC LIMIT 1
            """,
            (source,),
        )
        row = cur.fetchone()
    return (row[0], row[1]) if row else None


def last_commit(conn, source: str) -> tuple[str, datetime] | None:
    """The source's latest committed batch (id, commit time)."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT batch_id::text, committed_at FROM ingest.batches
             WHERE source = %s AND status = 'committed' ORDER BY commit_seq DESC LIMIT 1
            """,
            (source,),
        )
        row = cur.fetchone()
    return (row[0], row[1]) if row else None


def alerts_of(conn, *, source: str | None = None, batch_id: str | None = None) -> list[dict]:
    """Recorded alerts, newest first (for the CLI and the tests)."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT event_key, source, kind, severity, batch_id::text, subject, created_at, delivered, undelivered
              FROM ingest.alerts
             WHERE (%(source)s::text IS NULL OR source = %(source)s)
               AND (%(batch)s::uuid IS NULL OR batch_id = %(batch)s::uuid)
             ORDER BY created_at DESC
            """,
            {"source": source, "batch": batch_id},
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
