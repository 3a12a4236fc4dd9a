"""docker-compose.yml describes the stack the tests run: its services, Airflow settings and images hold together."""

from __future__ import annotations

from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"
AIRFLOW_SERVICES = {
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
}


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_the_stack_has_every_airflow_component_its_metadata_database_broker_and_warehouse():
    services = _compose()["services"]
    assert AIRFLOW_SERVICES | {"airflow-init", "airflow-db", "redis", "warehouse"} <= set(services)
    assert services["warehouse"]["image"] == "postgres:15", "the version CI's integration pass runs against"
    commands = {name: services[name]["command"] for name in AIRFLOW_SERVICES}
    assert commands["airflow-worker"] == ["airflow", "celery", "worker"]
    assert "health-ingest warehouse migrate" in " ".join(services["airflow-init"]["command"])


def test_every_airflow_setting_of_the_stack_exists_and_its_executor_imports():
    from importlib import import_module

    from airflow.configuration import conf
    from airflow.providers_manager import ProvidersManager

    provider_options = {
        (section, option)
        for _, config in ProvidersManager().provider_configs
        for section, content in config.items()
        for option in content.get("options", {})
    }
    environment = _compose()["x-airflow"]["environment"]
    for key in (k for k in environment if k.startswith("AIRFLOW__")):
        section, option = key.removeprefix("AIRFLOW__").lower().split("__", 1)
        described = option in conf.configuration_description.get(section, {}).get("options", {})
        assert described or (section, option) in provider_options, key
    assert environment["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert import_module("airflow.providers.celery.executors.celery_executor").CeleryExecutor
    assert environment["HEALTH_INGEST_KEYRING"].startswith("/run/secrets/"), "keys come from a secret, not the image"
