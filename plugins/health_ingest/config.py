"""Where the project keeps its state, and the environment variables that configure it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

ENV_HOME = "HEALTH_INGEST_HOME"
ENV_STATE = "HEALTH_INGEST_STATE"
ENV_SOURCES = "HEALTH_INGEST_SOURCES"
ENV_WAREHOUSE_URL = "HEALTH_INGEST_WAREHOUSE_URL"
ENV_KEYRING = "HEALTH_INGEST_KEYRING"
ENV_DEMO = "HEALTH_INGEST_DEMO"

WAREHOUSE_CONN_ID = "health_ingest_warehouse"


def project_root() -> Path:
    """The checkout that holds `dags/`, `samples/` and `expectations/`."""
    return Path(os.environ.get(ENV_HOME, PROJECT_ROOT)).resolve()


def state_dir() -> Path:
    """Runtime state (embedded warehouse, landing zone, Airflow metadata), never committed."""
    path = Path(os.environ.get(ENV_STATE, project_root() / ".state")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sources_file() -> Path:
    return Path(os.environ.get(ENV_SOURCES, project_root() / "dags" / "sources.yml")).resolve()


def demo_mode() -> bool:
    """Demo mode allows a generated keyring; production refuses to run without a real one."""
    return os.environ.get(ENV_DEMO, "").lower() in {"1", "true", "yes"}


def running_under_airflow() -> bool:
    """True inside an Airflow process (a task, the triggerer): only then are Airflow connections consulted.

    Importing Airflow from a plain command would reconfigure its logging (onto stdout, which a filter owns).
    """
    return "airflow.sdk" in sys.modules
