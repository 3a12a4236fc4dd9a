"""Per-patient date shift from a keyed pseudorandom function: every date of a patient moves by one offset."""

from __future__ import annotations

import hmac
import re
from datetime import date, timedelta
from typing import Any

from health_ingest.privacy.keyring import Keyring

DATE_SHIFT_PURPOSE = "date-shift"
FULL_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?=$|T)")


class DateShifter:
    """offset = HMAC-SHA256(date-shift subkey, patient pseudonym) mapped to [-max_days, max_days] \\ {0}.

    Unlike an offset computed from the key by arithmetic, one known (date, shifted date) pair reveals nothing
    about another patient's offset.
    """

    def __init__(self, keyring: Keyring, max_days: int) -> None:
        if max_days < 1:
            raise ValueError("max_days must be at least 1")
        self._key = keyring.subkey(DATE_SHIFT_PURPOSE)
        self.max_days = max_days

    def offset_days(self, patient_pseudonym: str) -> int:
        mac = hmac.digest(self._key, patient_pseudonym.encode(), "sha256")
        span = 2 * self.max_days  # offsets -max..-1 and 1..max: never zero
        value = int.from_bytes(mac[:8], "big") % span
        return value - self.max_days if value < self.max_days else value - self.max_days + 1

    def shift(self, resource: dict[str, Any], days: int) -> None:
        """Shift, in place, every full date and dateTime; partial dates (YYYY, YYYY-MM) keep their precision."""
        _shift_node(resource, timedelta(days=days))


def shift_date_string(value: str, delta: timedelta) -> str:
    match = FULL_DATE.match(value)
    if not match:
        return value
    try:
        shifted = date(int(match[1]), int(match[2]), int(match[3])) + delta
    except (ValueError, OverflowError):
        return value
    return shifted.isoformat() + value[10:]


def _shift_node(node: Any, delta: timedelta) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if type(value) is str:
                if len(value) >= 10 and value[4:5] == "-" and key != "lastUpdated":
                    node[key] = shift_date_string(value, delta)
            else:
                _shift_node(value, delta)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            if type(item) is str:
                if len(item) >= 10 and item[4:5] == "-":
                    node[index] = shift_date_string(item, delta)
            else:
                _shift_node(item, delta)
