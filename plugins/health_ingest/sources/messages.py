"""Delivery messages: a sender announces a delivery on the message queue by naming its source and its folder.

A message is `{"source": "<name>", "delivery": "<folder>"}` (JSON). It is routed to its source's DAG only when
the source is declared and the folder lies inside the source's allowed roots; any other message is refused and
logged, never loaded. Log lines and refusals never quote the folder: a sender's folder name may identify someone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from health_ingest.errors import ConfigurationError
from health_ingest.sources.registry import SOURCE_NAME, Source

log = logging.getLogger(__name__)


class RefusedMessage(ValueError):
    """A message that names no declared source, or a folder outside its source's allowed roots."""


@dataclass(frozen=True)
class DeliveryRoute:
    """Where an accepted message goes: the source's DAG, with the delivery as its `delivery_path`."""

    source: str
    dag_id: str
    delivery: Path

    def trigger_kwargs(self) -> dict:
        return {"trigger_dag_id": self.dag_id, "conf": {"delivery_path": str(self.delivery)}}


def route_message(data: str | bytes, sources: dict[str, Source]) -> DeliveryRoute:
    """The route of one message, or RefusedMessage saying why (without the folder)."""
    try:
        message = json.loads(data)
    except (TypeError, ValueError):
        raise RefusedMessage("not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("delivery"), str):
        raise RefusedMessage('not a delivery message ({"source": ..., "delivery": ...})')
    name = message.get("source")
    if not isinstance(name, str) or name not in sources:
        shown = f"'{name}'" if isinstance(name, str) and SOURCE_NAME.match(name) else "an invalid name"
        raise RefusedMessage(f"names a source that is not declared: {shown}")
    source = sources[name]
    try:
        folder = source.allowed_delivery(message["delivery"])
    except ConfigurationError as refused:
        raise RefusedMessage(str(refused)) from None
    return DeliveryRoute(source.name, source.dag_id, folder)


def route_messages(messages: list[str | bytes], sources: dict[str, Source]) -> list[DeliveryRoute]:
    """The routes of the accepted messages, in order; each refused one is logged with its reason."""
    routes = []
    for number, data in enumerate(messages, start=1):
        try:
            routes.append(route_message(data, sources))
        except RefusedMessage as refused:
            log.warning("delivery message %d of %d refused, not loaded: %s", number, len(messages), refused)
    log.info("%d delivery messages: %d routed, %d refused", len(messages), len(routes), len(messages) - len(routes))
    return routes
