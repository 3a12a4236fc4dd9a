"""Operators: the pull task of a Bulk Data source, which waits for the server's export in the triggerer, not on a
worker."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator

log = logging.getLogger(__name__)


class PullExportOperator(BaseOperator):
    """Kicks off (or resumes) the source's export, defers while the server prepares it, then downloads it.

    Returns the deliveries the run loads, as `find_deliveries` names them: the export's folder, then any pending
    inbox deliveries (or the `delivery_path` of the trigger form instead)."""

    def __init__(self, *, source_name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source_name = source_name

    def execute(self, context) -> list[dict[str, str]]:
        from health_ingest.airflow.tasks import failing_without_retry
        from health_ingest.airflow.triggers import ExportReadyTrigger
        from health_ingest.sources.bulk.pull import prepare_export
        from health_ingest.sources.references import given_delivery
        from health_ingest.sources.registry import get_source

        params = context["params"]
        with failing_without_retry():
            source = get_source(self.source_name)
            if params.get("delivery_path"):
                return [given_delivery(source.allowed_delivery(params["delivery_path"]))]
            prepared = prepare_export(source, full_refresh=bool(params.get("full_refresh")))
        if "delivery" in prepared:
            return self._deliveries(prepared["delivery"])
        self.defer(
            trigger=ExportReadyTrigger(self.source_name, prepared["status_url"], prepared["deadline"]),
            method_name="execute_complete",
        )

    def execute_complete(self, context, event: dict[str, Any]) -> list[dict[str, str]]:
        """The manifest is ready (or the export expired, which the pull starts again): download it."""
        from health_ingest.airflow.tasks import failing_without_retry
        from health_ingest.errors import ExportError
        from health_ingest.sources.bulk.pull import pull_export
        from health_ingest.sources.registry import get_source

        if event["status"] == "error":
            raise ExportError(event["message"])
        if event["status"] == "deadline":
            raise ExportError(
                f"source {self.source_name}: the export did not finish before its deadline; it stays recorded and "
                "the next run polls it again"
            )
        with failing_without_retry():
            export = pull_export(get_source(self.source_name))
        log.info(
            "source %s: export of %s downloaded, %d records", self.source_name, export.transaction_time, export.records
        )
        return self._deliveries(str(export.delivery))

    def _deliveries(self, export: str) -> list[dict[str, str]]:
        from health_ingest.airflow.tasks import find_deliveries
        from health_ingest.sources.references import EXPORTS, found_delivery
        from health_ingest.sources.registry import get_source

        found = found_delivery(get_source(self.source_name), Path(export), EXPORTS)
        return [found, *find_deliveries(self.source_name, {})]
