"""The `bulk:` section of a FHIR source: which server, what to export, how patiently."""

from __future__ import annotations

from dataclasses import dataclass

from health_ingest.formats.resource_types import RESOURCE_TYPES

LEVELS = {"system", "patient", "group"}
METHODS = {"get", "post"}
OUTPUT_FORMATS = {"application/fhir+ndjson", "application/ndjson", "ndjson"}


@dataclass(frozen=True)
class BulkSettings:
    """Defaults suit public servers: a day's deadline, Retry-After capped at ten minutes, four downloads at once."""

    url: str
    level: str = "system"
    group: str | None = None
    types: tuple[str, ...] = ()
    type_filters: tuple[str, ...] = ()
    method: str = "get"
    output_format: str = "application/fhir+ndjson"
    connection: str | None = None  # an Airflow connection holding the credentials; none for open servers
    deadline_minutes: float = 24 * 60
    max_retry_after_seconds: float = 600.0
    min_poll_seconds: float = 1.0
    parallel_downloads: int = 4
    download_retries: int = 4
    request_timeout_seconds: float = 120.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("'url' must be the server's http(s) base URL")
        if self.level not in LEVELS:
            raise ValueError(f"'level' must be one of {sorted(LEVELS)}")
        if (self.level == "group") != bool(self.group):
            raise ValueError("'group' (the Group id) is required with level group, and only then")
        unknown = [t for t in self.types if t not in RESOURCE_TYPES]
        if unknown:
            raise ValueError(f"'types' names no FHIR R4 resource type: {unknown}")
        if self.method not in METHODS:
            raise ValueError(f"'method' must be one of {sorted(METHODS)}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"'output_format' must be one of {sorted(OUTPUT_FORMATS)}")
        if self.parallel_downloads < 1 or self.download_retries < 0:
            raise ValueError("'parallel_downloads' must be at least 1 and 'download_retries' not negative")
        if min(self.deadline_minutes, self.max_retry_after_seconds, self.min_poll_seconds) < 0:
            raise ValueError("durations must not be negative")

    @property
    def export_url(self) -> str:
        base = self.url.rstrip("/")
        if self.level == "patient":
            return f"{base}/Patient/$export"
        if self.level == "group":
            return f"{base}/Group/{self.group}/$export"
        return f"{base}/$export"


def parse_bulk(options: object) -> BulkSettings | None:
    if options is None:
        return None
    if not isinstance(options, dict):
        raise ValueError("'bulk' must be a mapping")
    values = dict(options)
    for key in ("types", "type_filters"):
        if key in values:
            if not isinstance(values[key], list):
                raise ValueError(f"'{key}' must be a list")
            values[key] = tuple(str(v) for v in values[key])
    known = set(BulkSettings.__dataclass_fields__)
    if set(values) - known:
        raise ValueError(f"unknown bulk options {sorted(set(values) - known)}")
    return BulkSettings(**values)
