"""The sources file: which sources exist, where their deliveries land, and when they run."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from health_ingest import config
from health_ingest.alerts.settings import AlertSettings, parse_alerts
from health_ingest.errors import ConfigurationError
from health_ingest.privacy.element_plan import check_kept_paths
from health_ingest.privacy.policy import PrivacyPolicy
from health_ingest.quality.policy import QualityPolicy
from health_ingest.sources.bulk.settings import BulkSettings, parse_bulk

SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
KINDS = {"fhir", "claims"}
FORMATS = {"fhir": {"ndjson"}, "claims": {"snds", "synthea", "cms-rif"}}
DURATION = re.compile(r"^(?:(?P<w>\d+)w)?(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?$")


@dataclass(frozen=True)
class Source:
    """One declared source; the DAG generator and the CLI both read this."""

    name: str
    kind: str
    format: str
    description: str = ""
    schedule: str | None = None
    inbox: Path | None = None
    allowed_roots: tuple[Path, ...] = ()  # where a delivery named by hand or by a message may be (default below)
    owner: str = "health-ingest"
    retries: int = 2
    tags: tuple[str, ...] = ()
    id_space: str = ""
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    quality: QualityPolicy = field(default_factory=QualityPolicy)
    bulk: BulkSettings | None = None  # a FHIR server this source pulls `$export`s from
    expect_every: timedelta | None = None  # a committed batch is expected at least this often (none: no cadence)
    retry_delay: timedelta = timedelta(minutes=2)
    alerts: AlertSettings = field(default_factory=AlertSettings)

    @property
    def dag_id(self) -> str:
        return f"{self.kind}_{self.name}"

    @property
    def exports(self) -> Path:
        """Where the source's pulled `$export`s are downloaded, one folder each."""
        return _exports_folder(self.name)

    def allowed_delivery(self, path: str | Path) -> Path:
        """The delivery folder, resolved (symbolic links followed), if it lies inside one of the source's allowed
        roots; else ConfigurationError. A folder named from outside (trigger form, REST API, a message) is never
        read from anywhere the worker happens to be able to read."""
        folder = Path(path).resolve()
        if not any(folder.is_relative_to(root.resolve()) and folder != root.resolve() for root in self.allowed_roots):
            # the path itself is not quoted: a sender's folder name may identify someone
            raise ConfigurationError(f"source '{self.name}': the delivery is outside the source's allowed roots")
        if not folder.is_dir():
            raise ConfigurationError(f"source '{self.name}': the delivery is not a folder")
        return folder


def load_sources(path: Path | None = None) -> dict[str, Source]:
    """Parse and validate the sources file; errors name the file and the entry."""
    import yaml

    path = path or config.sources_file()
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigurationError(f"{path}: sources file not found") from None
    except yaml.YAMLError as error:
        raise ConfigurationError(f"{path}: not valid YAML ({error})") from None

    entries = document.get("sources")
    if not isinstance(entries, list):
        raise ConfigurationError(f"{path}: expected a top-level 'sources:' list")
    if set(document) - {"sources", "alerts"}:
        raise ConfigurationError(f"{path}: unknown top-level keys {sorted(set(document) - {'sources', 'alerts'})}")
    try:
        default_alerts = parse_alerts(document.get("alerts"), None, parse_duration)
    except ValueError as error:
        raise ConfigurationError(f"{path}: alerts: {error}") from None
    sources: dict[str, Source] = {}
    for position, entry in enumerate(entries, start=1):
        source = _parse_source(path, position, entry, default_alerts)
        if source.name in sources:
            raise ConfigurationError(f"{path}: source #{position} repeats the name '{source.name}'")
        sources[source.name] = source
    return sources


def get_source(name: str, path: Path | None = None) -> Source:
    sources = load_sources(path)
    if name not in sources:
        known = ", ".join(sorted(sources)) or "none"
        raise ConfigurationError(f"unknown source '{name}' (declared: {known})")
    return sources[name]


# --- implementation details -------------------------------------------------------------------


def _parse_source(path: Path, position: int, entry: object, default_alerts: AlertSettings) -> Source:
    where = f"{path}: source #{position}"
    if not isinstance(entry, dict):
        raise ConfigurationError(f"{where}: expected a mapping")
    name = entry.get("name")
    if not isinstance(name, str) or not SOURCE_NAME.match(name):
        raise ConfigurationError(f"{where}: 'name' must match {SOURCE_NAME.pattern}")
    where = f"{path}: source '{name}'"
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ConfigurationError(f"{where}: 'kind' must be one of {sorted(KINDS)}")
    fmt = entry.get("format", "ndjson" if kind == "fhir" else None)
    if fmt not in FORMATS[kind]:
        raise ConfigurationError(f"{where}: 'format' must be one of {sorted(FORMATS[kind])}")
    unknown = set(entry) - {
        "name",
        "kind",
        "format",
        "description",
        "schedule",
        "inbox",
        "allowed_roots",
        "owner",
        "retries",
        "tags",
        "id_space",
        "linking_identifiers",
        "privacy",
        "quality",
        "bulk",
        "expect_every",
        "retry_delay",
        "alerts",
    }
    if unknown:
        raise ConfigurationError(f"{where}: unknown keys {sorted(unknown)}")
    inbox = entry.get("inbox")
    inbox_path = _state_path(inbox) if inbox else None
    roots = entry.get("allowed_roots")
    if roots is not None and (not isinstance(roots, list) or not all(isinstance(r, str) and r for r in roots)):
        raise ConfigurationError(f"{where}: 'allowed_roots' must be a list of folders")
    bulk = _parse_bulk(where, kind, entry)
    declared = tuple(_state_path(r) for r in roots) if roots is not None else None
    allowed_roots = declared if declared is not None else _default_roots(name, inbox_path, bulk)
    retries = entry.get("retries", 2)
    if not isinstance(retries, int) or retries < 0:
        raise ConfigurationError(f"{where}: 'retries' must be a non-negative integer")
    return Source(
        name=name,
        kind=kind,
        format=fmt,
        description=str(entry.get("description", "")).strip(),
        schedule=entry.get("schedule"),
        inbox=inbox_path,
        allowed_roots=allowed_roots,
        owner=str(entry.get("owner", "health-ingest")),
        retries=retries,
        tags=tuple(str(tag) for tag in entry.get("tags", ())),
        id_space=str(entry.get("id_space") or name),
        privacy=_parse_privacy(where, entry),
        quality=_parse_quality(where, entry),
        bulk=bulk,
        expect_every=_parse_expect_every(where, entry.get("expect_every")),
        retry_delay=_parse_retry_delay(where, entry.get("retry_delay")),
        alerts=_parse_alerts(where, entry, default_alerts),
    )


def parse_duration(text: str) -> timedelta:
    """`26h`, `7d`, `1w`, `1d12h`, `90m`, `30s`: weeks, days, hours, minutes and seconds, each at most once, in that
    order."""
    match = DURATION.match(text.strip()) if isinstance(text, str) else None
    if not match or not any(match.groupdict().values()):
        raise ValueError(f"{text!r} is not a duration such as 26h, 7d, 1w or 1d12h")
    weeks, days, hours, minutes, seconds = (int(match[unit] or 0) for unit in "wdhms")
    duration = timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds)
    if not duration:
        raise ValueError(f"{text!r} is no time at all")
    return duration


def _parse_expect_every(where: str, value: object) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as error:
        raise ConfigurationError(f"{where}: expect_every: {error}") from None


def _exports_folder(name: str) -> Path:
    return config.state_dir() / "exports" / name


def _default_roots(name: str, inbox: Path | None, bulk: BulkSettings | None) -> tuple[Path, ...]:
    """Where a delivery named from outside may lie when the sources file does not say: the source's inbox, and the
    folder of its pulled exports for a source that pulls them."""
    return tuple(root for root in (inbox, _exports_folder(name) if bulk else None) if root is not None)


def _state_path(value: str) -> Path:
    """Relative paths of the sources file are under the state folder."""
    path = Path(value)
    return path if path.is_absolute() else config.state_dir() / path


def _parse_retry_delay(where: str, value: object) -> timedelta:
    if value is None:
        return timedelta(minutes=2)
    try:
        return parse_duration(value)
    except ValueError as error:
        raise ConfigurationError(f"{where}: retry_delay: {error}") from None


def _parse_alerts(where: str, entry: dict, default: AlertSettings) -> AlertSettings:
    try:
        return parse_alerts(entry.get("alerts"), default, parse_duration)
    except ValueError as error:
        raise ConfigurationError(f"{where}: alerts: {error}") from None


def _parse_bulk(where: str, kind: str, entry: dict) -> BulkSettings | None:
    if entry.get("bulk") is not None and kind != "fhir":
        raise ConfigurationError(f"{where}: 'bulk' (a FHIR server to pull from) applies to fhir sources only")
    try:
        return parse_bulk(entry.get("bulk"))
    except (TypeError, ValueError) as error:
        raise ConfigurationError(f"{where}: bulk: {error}") from None


def _parse_quality(where: str, entry: dict) -> QualityPolicy:
    options = entry.get("quality") or {}
    known = {"tolerance", "strict", "suites", "downgrade", "quarantine_ceiling", "quarantine_ceiling_by_type"}
    if not isinstance(options, dict) or set(options) - known:
        raise ConfigurationError(f"{where}: 'quality' takes only {sorted(known)}")
    try:
        return QualityPolicy(**options)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(f"{where}: quality: {error}") from None


def _parse_privacy(where: str, entry: dict) -> PrivacyPolicy:
    options = entry.get("privacy") or {}
    if not isinstance(options, dict):
        raise ConfigurationError(f"{where}: 'privacy' must be a mapping")
    known = {"birth_date_precision", "date_shift_days", "escrow", "k_anonymity", "k_anonymity_action", "providers"}
    known |= {"keep_free_text"}
    if set(options) - known:
        raise ConfigurationError(f"{where}: unknown privacy options {sorted(set(options) - known)}")
    try:
        policy = PrivacyPolicy(
            linking_identifiers=tuple(str(system) for system in entry.get("linking_identifiers", ())),
            **options,
        )
        if entry.get("kind", "fhir") == "fhir":
            check_kept_paths(policy.keep_free_text)  # a misspelt path would keep nothing, silently
        return policy
    except (TypeError, ValueError) as error:
        raise ConfigurationError(f"{where}: privacy: {error}") from None
