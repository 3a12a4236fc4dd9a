"""Jurisdiction guard: refuse a warehouse that the hosting policy does not allow, before any row leaves."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from health_ingest import config
from health_ingest.errors import ConfigurationError, JurisdictionRefused

log = logging.getLogger(__name__)

ENV_HOSTING = config.ENV_WAREHOUSE_HOSTING
ON_PREMISES = {"provider": "on-premises", "region": "local", "jurisdiction": "local"}


@dataclass(frozen=True)
class Hosting:
    provider: str
    region: str
    jurisdiction: str

    @classmethod
    def parse(cls, declared: dict, where: str) -> Hosting:
        missing = [k for k in ("provider", "region", "jurisdiction") if not str(declared.get(k) or "").strip()]
        if missing:
            raise JurisdictionRefused(f"rule 'declaration-complete': {where} lacks {', '.join(missing)}")
        return cls(
            str(declared["provider"]).strip().lower(),
            str(declared["region"]).strip().lower(),
            str(declared["jurisdiction"]).strip().upper(),
        )


@dataclass(frozen=True)
class HostingPolicy:
    allowed_jurisdictions: frozenset[str]
    extraterritorial_providers: frozenset[str]
    exceptions: tuple[dict, ...] = ()
    require_verified_tls_for_remote_hosts: bool = True
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class HostingDecision:
    hosting: Hosting
    declared: bool
    justification: str | None = None

    def describe(self) -> str:
        h = self.hosting
        text = f"{h.provider} / {h.region} / jurisdiction {h.jurisdiction}"
        if not self.declared:
            text += " (undeclared loopback or embedded warehouse: on-premises)"
        if self.justification:
            text += f"; allowed by exception: {self.justification}"
        return text


def load_policy(path: Path | None = None) -> HostingPolicy:
    import yaml

    path = path or config.hosting_policy_file()
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigurationError(f"{path}: hosting policy not found; no warehouse can be allowed") from None
    exceptions = tuple(document.get("exceptions") or ())
    for number, exception in enumerate(exceptions, start=1):
        if not str(exception.get("justification") or "").strip() or not exception.get("provider"):
            raise ConfigurationError(f"{path}: exception #{number} needs a provider and a justification")
    return HostingPolicy(
        allowed_jurisdictions=frozenset(str(j).upper() for j in document.get("allowed_jurisdictions", ())),
        extraterritorial_providers=frozenset(str(p).lower() for p in document.get("extraterritorial_providers", ())),
        exceptions=exceptions,
        require_verified_tls_for_remote_hosts=bool(document.get("require_verified_tls_for_remote_hosts", True)),
        source=str(path),
    )


def check_warehouse(url: str, declared: dict | None, policy: HostingPolicy | None = None) -> HostingDecision:
    """Apply the policy's rules in order; the first that refuses raises with its name."""
    policy = policy or load_policy()
    where = f"hosting policy {policy.source}"
    endpoint = libpq_endpoint(url)
    remote = [h for h in endpoint.hosts if not _is_local(h)]
    host = ", ".join(remote) or (endpoint.hosts[0] if endpoint.hosts else "the local socket")
    if declared is None:
        if remote:
            raise JurisdictionRefused(
                f"rule 'declaration-required' ({where}): the warehouse at {host} declares no hosting; set "
                f"{ENV_HOSTING} or the connection's 'hosting' extra (provider, region, jurisdiction)"
            )
        return HostingDecision(Hosting(**ON_PREMISES), declared=False)

    hosting = Hosting.parse(declared, "the warehouse's hosting declaration")
    local_jurisdiction = hosting.jurisdiction == "LOCAL" and not remote
    if not local_jurisdiction and hosting.jurisdiction not in policy.allowed_jurisdictions:
        raise JurisdictionRefused(
            f"rule 'allowed_jurisdictions' ({where}): jurisdiction {hosting.jurisdiction} of {hosting.provider} "
            f"({hosting.region}) is not allowed; allowed: EU, EEA and member states"
        )
    justification = None
    if hosting.provider in policy.extraterritorial_providers:
        exception = next((e for e in policy.exceptions if _matches(e, hosting)), None)
        if exception is None:
            raise JurisdictionRefused(
                f"rule 'extraterritorial_providers' ({where}): {hosting.provider} is subject to extraterritorial "
                f"law (US CLOUD Act) and is refused even in region {hosting.region}; only an exception with a "
                "recorded justification in the policy can allow it"
            )
        justification = str(exception["justification"]).strip()
    if policy.require_verified_tls_for_remote_hosts and remote and endpoint.sslmode != "verify-full":
        raise JurisdictionRefused(
            f"rule 'require_verified_tls_for_remote_hosts' ({where}): {host} is not a loopback host, so the "
            "connection must use sslmode=verify-full"
        )
    decision = HostingDecision(hosting, declared=True, justification=justification)
    if justification:
        log.warning("warehouse allowed by a policy exception: %s", decision.describe())
    return decision


def declared_hosting_from_env() -> dict | None:
    raw = config.declared_hosting()
    if not raw:
        return None
    try:
        declared = json.loads(raw)
    except ValueError:
        raise JurisdictionRefused(f"rule 'declaration-complete': {ENV_HOSTING} is not valid JSON") from None
    if not isinstance(declared, dict):
        raise JurisdictionRefused(f"rule 'declaration-complete': {ENV_HOSTING} must be a JSON object")
    return declared


# --- implementation details -------------------------------------------------------------------


def _matches(exception: dict, hosting: Hosting) -> bool:
    if str(exception.get("provider", "")).lower() != hosting.provider:
        return False
    region = exception.get("region")
    return region is None or str(region).lower() == hosting.region


@dataclass(frozen=True)
class Endpoint:
    """Where libpq will connect: every host it may try, and the TLS mode it will use."""

    hosts: tuple[str, ...]
    sslmode: str | None


def libpq_endpoint(url: str, environ: Mapping[str, str] | None = None) -> Endpoint:
    """The hosts libpq will really connect to, found as libpq finds them: the connection string parsed by libpq
    itself (`?host=` and `?hostaddr=` override the URL's authority, several hosts are tried in turn), then a
    `service` (connection string or `PGSERVICE`) for what the string leaves out, then `PG*` variables. A host
    address (`hostaddr`) is what is connected to; the host name is then only what the certificate is checked
    against."""
    from psycopg2 import ProgrammingError
    from psycopg2.extensions import parse_dsn

    environ = os.environ if environ is None else environ
    try:
        options = {k: v for k, v in parse_dsn(url).items() if v != ""}
    except ProgrammingError:
        raise ConfigurationError("the warehouse URL is not a valid PostgreSQL connection string") from None
    service = options.get("service") or environ.get("PGSERVICE")
    if service:
        for key, value in _service_options(service, environ).items():
            options.setdefault(key, value)
    for key, variable in (("host", "PGHOST"), ("hostaddr", "PGHOSTADDR"), ("sslmode", "PGSSLMODE")):
        if key not in options and environ.get(variable):
            options[key] = environ[variable]
    names = options.get("host", "").split(",")
    addresses = options.get("hostaddr", "").split(",")
    count = max(len(names), len(addresses))
    hosts = []
    for position in range(count):
        name = names[position] if position < len(names) else ""
        address = addresses[position] if position < len(addresses) else ""
        hosts.append((address or name).strip())
    return Endpoint(tuple(hosts), options.get("sslmode"))


def _service_options(service: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The options of a connection service, from the user's service file, else the system's (as libpq looks)."""
    import configparser

    files = [Path(environ.get("PGSERVICEFILE") or Path(environ.get("HOME") or "~").expanduser() / ".pg_service.conf")]
    if environ.get("PGSYSCONFDIR"):
        files.append(Path(environ["PGSYSCONFDIR"]) / "pg_service.conf")
    files.append(Path("/etc/postgresql-common/pg_service.conf"))
    for path in files:
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read_string(path.read_text(encoding="utf-8"))
        except (OSError, configparser.Error):
            continue
        if parser.has_section(service):
            return {k: v.strip() for k, v in parser.items(service) if v.strip()}
    raise ConfigurationError(f"the warehouse's connection service {service!r} is in no service file")


def _is_local(host: str) -> bool:
    if not host or host.startswith(("/", "@")) or host == "localhost":
        return True  # a Unix socket (an abstract one too), or the loopback name
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
