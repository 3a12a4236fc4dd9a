"""Deliveries land in a source's inbox; the marker written last makes them visible, exactly once."""

from __future__ import annotations

import asyncio

from health_ingest.sources.inbox import mark_done, pending_deliveries
from health_ingest.sources.triggers import DeliveryReadyTrigger


def test_trigger_fires_once_per_ready_delivery_and_ignores_unfinished_ones(tmp_path):
    (tmp_path / "writing").mkdir()
    (tmp_path / "ready").mkdir()
    (tmp_path / "ready" / "_READY").touch()
    trigger = DeliveryReadyTrigger(str(tmp_path), poke_interval=0.01)

    async def first_event():
        async for event in trigger.run():
            return event.payload

    assert asyncio.run(first_event()) == {"inbox": str(tmp_path), "delivery": "ready"}
    assert (tmp_path / "ready" / "_QUEUED").exists() and not (tmp_path / "ready" / "_READY").exists()
    assert pending_deliveries(tmp_path) == [tmp_path / "ready"]

    async def no_event_within(seconds: float):
        try:
            return await asyncio.wait_for(first_event(), seconds)
        except TimeoutError:
            return None

    assert asyncio.run(no_event_within(0.2)) is None, "a queued delivery does not fire again"
    mark_done(tmp_path / "ready")
    assert pending_deliveries(tmp_path) == []


def test_trigger_serialises_to_its_import_path():
    classpath, kwargs = DeliveryReadyTrigger("/inbox", poke_interval=3).serialize()
    assert classpath == "health_ingest.sources.triggers.DeliveryReadyTrigger"
    assert kwargs == {"inbox": "/inbox", "poke_interval": 3}
