"""The deployment's Airflow settings (deploy/airflow.env, which docker-compose.yml reads) for the stack tests."""

from __future__ import annotations

from pathlib import Path

SETTINGS = Path(__file__).resolve().parents[1] / "deploy" / "airflow.env"


def deployment_settings() -> dict[str, str]:
    """`KEY=VALUE` lines as Compose reads an env_file: comments and blank lines skipped, values taken verbatim."""
    settings = {}
    for line in SETTINGS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value
    return settings
