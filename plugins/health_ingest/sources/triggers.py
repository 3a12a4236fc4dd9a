"""An event trigger for the triggerer: fires when a delivery in a source's inbox gets its `_READY` marker."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

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
