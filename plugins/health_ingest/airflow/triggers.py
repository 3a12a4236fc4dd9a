"""Triggers for the triggerer: a delivery's `_READY` marker in a source's inbox, and a Bulk Data export whose
manifest is ready.

`DeliveryReadyTrigger` keeps the class path it was first serialised with (`health_ingest.sources.triggers`, an
alias of this module): Airflow databases hold it in their asset watchers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent

from health_ingest.sources.inbox import claim_next_ready


class DeliveryReadyTrigger(BaseEventTrigger):
    """Renames the marker `_READY` to `_QUEUED` before firing, so one delivery fires exactly once."""

    def __init__(self, inbox: str, poke_interval: float = 10.0) -> None:
        super().__init__()
        self.inbox = inbox
        self.poke_interval = poke_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "health_ingest.sources.triggers.DeliveryReadyTrigger",
            {"inbox": self.inbox, "poke_interval": self.poke_interval},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            if os.path.isdir(self.inbox):
                delivery = await asyncio.to_thread(claim_next_ready, self.inbox)
                if delivery is not None:
                    yield TriggerEvent({"inbox": self.inbox, "delivery": delivery})
                    return
            await asyncio.sleep(self.poke_interval)


class ExportReadyTrigger(BaseTrigger):
    """Polls a source's export in flight, honouring the server's Retry-After, until its manifest is ready: the
    task waits here instead of on a worker. Credentials are read again from the source's connection, never
    carried in the trigger (its arguments are stored in the metadata database)."""

    def __init__(self, source_name: str, status_url: str, deadline: float) -> None:
        super().__init__()
        self.source_name = source_name
        self.status_url = status_url
        self.deadline = deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "health_ingest.airflow.triggers.ExportReadyTrigger",
            {"source_name": self.source_name, "status_url": self.status_url, "deadline": self.deadline},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import time

        from health_ingest.errors import ExportError, ExportExpired
        from health_ingest.sources.bulk.pull import status_wait
        from health_ingest.sources.registry import get_source

        source = await asyncio.to_thread(get_source, self.source_name)
        attempt = 0
        while True:
            try:
                wait = await asyncio.to_thread(status_wait, source, self.status_url, attempt)
            except ExportExpired as expired:
                yield TriggerEvent({"status": "expired", "message": str(expired)})
                return
            except ExportError as error:
                yield TriggerEvent({"status": "error", "message": str(error)})
                return
            if wait is None:
                yield TriggerEvent({"status": "ready"})
                return
            if time.time() + wait > self.deadline:
                yield TriggerEvent({"status": "deadline"})
                return
            attempt += 1
            await asyncio.sleep(wait)
