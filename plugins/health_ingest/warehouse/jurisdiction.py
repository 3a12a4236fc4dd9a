"""Jurisdiction guard: refuse a warehouse that the hosting policy does not allow, before any row leaves."""

from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

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
    host = _host_of(url)
    if declared is None:
        if not _is_local(host):
            raise JurisdictionRefused(
                f"rule 'declaration-required' ({where}): the warehouse at {host} declares no hosting; set "
                f"{ENV_HOSTING} or the connection's 'hosting' extra (provider, region, jurisdiction)"
            )
        return HostingDecision(Hosting(**ON_PREMISES), declared=False)

    hosting = Hosting.parse(declared, "the warehouse's hosting declaration")
    local_jurisdiction = hosting.jurisdiction == "LOCAL" and _is_local(host)
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
    if policy.require_verified_tls_for_remote_hosts and not _is_local(host) and _sslmode(url) != "verify-full":
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


def _host_of(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host:
        host = (parse_qs(parts.query).get("host") or [""])[0]
    return host


def _is_local(host: str) -> bool:
    if not host or host.startswith("/") or host == "localhost":
        return True  # a Unix socket, or the loopback name
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _sslmode(url: str) -> str | None:
    return (parse_qs(urlsplit(url).query).get("sslmode") or [None])[0]
