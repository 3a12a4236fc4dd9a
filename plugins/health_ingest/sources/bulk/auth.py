"""Authorisation to a FHIR server: SMART Backend Services, a static bearer token, or none.

Credentials live in an Airflow connection (`bulk.connection` of the source): its `extra` says which kind
(`{"auth": "smart-backend-services", "client_id": ..., "kid": ..., "alg": "RS384", "scope": ...}`) and its
password holds the private key (PEM) or the bearer token. Outside Airflow the same connection is read from
`AIRFLOW_CONN_<ID>` in Airflow's JSON form. Tokens and keys never reach a log line or a message.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from health_ingest import config
from health_ingest.errors import ConfigurationError, ExportError

log = logging.getLogger(__name__)

ALGORITHMS = ("RS384", "ES384")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 300  # seconds; the specification allows at most five minutes
REFRESH_MARGIN = 60  # a token is renewed this many seconds before it expires (or at 80 % of a shorter life)


@dataclass(frozen=True)
class Credentials:
    kind: str  # none | bearer | smart-backend-services
    secret: str = field(default="", repr=False)
    client_id: str = ""
    kid: str = ""
    alg: str = "RS384"
    scope: str = "system/*.read"
    token_url: str | None = None


def load_credentials(connection_id: str | None) -> Credentials:
    """The credentials of an Airflow connection (under Airflow) or of `AIRFLOW_CONN_<ID>` (elsewhere)."""
    if not connection_id:
        return Credentials("none")
    connection = config.connection(connection_id)
    if connection is None:
        raise ConfigurationError(f"connection {connection_id} is not defined (Airflow connection or AIRFLOW_CONN_*)")
    extra = connection.extra_dict()
    kind = extra.get("auth", "bearer" if connection.password else "none")
    secret = connection.password or extra.get("private_key") or extra.get("token") or ""
    if kind not in {"none", "bearer", "smart-backend-services"}:
        raise ConfigurationError(
            f"connection {connection_id}: auth must be none, bearer or smart-backend-services, not {kind!r}"
        )
    if kind != "none" and not secret:
        raise ConfigurationError(f"connection {connection_id}: auth {kind} needs a secret in the password field")
    credentials = Credentials(
        kind,
        secret,
        client_id=str(extra.get("client_id") or connection.login or ""),
        kid=str(extra.get("kid", "")),
        alg=str(extra.get("alg", "RS384")),
        scope=str(extra.get("scope", "system/*.read")),
        token_url=extra.get("token_url"),
    )
    if kind == "smart-backend-services":
        if not credentials.client_id:
            raise ConfigurationError(f"connection {connection_id}: smart-backend-services needs a client_id")
        if credentials.alg not in ALGORITHMS:
            raise ConfigurationError(f"connection {connection_id}: alg must be one of {list(ALGORITHMS)}")
    return credentials


class Authoriser:
    """Gives the headers of each request; `invalidate()` after a 401 makes the next call fetch a new token."""

    def __init__(self, credentials: Credentials, base_url: str, session, *, source: str) -> None:
        self.credentials = credentials
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.source = source
        self.tokens_fetched = 0
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = threading.Lock()
        self._token_url = credentials.token_url

    @property
    def required(self) -> bool:
        return self.credentials.kind != "none"

    def headers(self) -> dict[str, str]:
        if self.credentials.kind == "none":
            return {}
        if self.credentials.kind == "bearer":
            return {"Authorization": f"Bearer {self.credentials.secret}"}
        with self._lock:
            if self._token is None or time.monotonic() >= self._renew_at:
                self._fetch_token()
            return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> bool:
        """Forget the cached token; False when there is nothing to renew (a static or absent credential)."""
        with self._lock:
            self._token = None
        return self.credentials.kind == "smart-backend-services"

    # --- SMART Backend Services ---------------------------------------------------------------

    def _fetch_token(self) -> None:
        token_url = self._token_url or self._discover_token_url()
        self._token_url = token_url
        response = self.session.post(
            token_url,
            data={
                "grant_type": "client_credentials",
                "scope": self.credentials.scope,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": self._client_assertion(token_url),
            },
            headers={"Accept": "application/json"},
            timeout=60,
        )
        if response.status_code != 200:
            raise ExportError(
                f"source {self.source}: the token endpoint {token_url} refused client "
                f"{self.credentials.client_id!r}: HTTP {response.status_code} {_oauth_error(response)}"
            )
        try:
            body = response.json()
            token = body["access_token"]
            lifetime = float(body.get("expires_in", 300))
        except (ValueError, KeyError, TypeError):
            raise ExportError(
                f"source {self.source}: the token endpoint {token_url} answered no access_token"
            ) from None
        self._token = token
        self._renew_at = time.monotonic() + max(0.0, min(lifetime - REFRESH_MARGIN, lifetime * 0.8))
        self.tokens_fetched += 1
        log.info("source %s: access token obtained for %s, valid %.0f s", self.source, self.credentials.scope, lifetime)

    def _discover_token_url(self) -> str:
        url = f"{self.base_url}/.well-known/smart-configuration"
        response = self.session.get(url, headers={"Accept": "application/json"}, timeout=60)
        try:
            document = response.json() if response.status_code == 200 else {}
        except ValueError:
            document = {}
        token_url = document.get("token_endpoint")
        if not token_url:
            raise ExportError(
                f"source {self.source}: {url} gave no token_endpoint (HTTP {response.status_code}); "
                "set token_url in the connection's extra"
            )
        supported = document.get("token_endpoint_auth_signing_alg_values_supported")
        if supported and self.credentials.alg not in supported:
            log.warning(
                "source %s: the server lists %s, not %s, for client assertions",
                self.source,
                supported,
                self.credentials.alg,
            )
        return token_url

    def _client_assertion(self, token_url: str) -> str:
        import jwt

        now = int(time.time())
        claims = {
            "iss": self.credentials.client_id,
            "sub": self.credentials.client_id,
            "aud": token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
            "jti": uuid.uuid4().hex,
        }
        headers: dict[str, Any] = {"typ": "JWT"}
        if self.credentials.kid:
            headers["kid"] = self.credentials.kid
        try:
            return jwt.encode(claims, self.credentials.secret, algorithm=self.credentials.alg, headers=headers)
        except (ValueError, TypeError, jwt.PyJWTError) as error:
            raise ConfigurationError(
                f"source {self.source}: the private key cannot sign {self.credentials.alg} ({type(error).__name__})"
            ) from None


def _oauth_error(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("error", ""))[:80] if isinstance(body, dict) else ""


def new_signing_key(alg: str = "RS384") -> tuple[bytes, dict]:
    """A private key (PEM) and the public JWKS to register with the server's authorisation service."""
    import jwt
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if alg == "RS384":
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        public = jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    elif alg == "ES384":
        private_key = ec.generate_private_key(ec.SECP384R1())
        public = jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    else:
        raise ConfigurationError(f"alg must be one of {list(ALGORITHMS)}")
    public["kid"] = _thumbprint(public, hashes)
    public.update({"alg": alg, "use": "sig", "key_ops": ["verify"]})
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, {"keys": [public]}


def _thumbprint(jwk: dict, hashes) -> str:
    """RFC 7638: the SHA-256 of the key's required members, canonical JSON, base64url."""
    import base64

    required = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True).encode()
    digest = hashes.Hash(hashes.SHA256())
    digest.update(canonical)
    return base64.urlsafe_b64encode(digest.finalize()).rstrip(b"=").decode()
