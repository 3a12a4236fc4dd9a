"""The environment under which the project runs Airflow locally: metadata in SQLite under the state folder."""

from __future__ import annotations

import os

from health_ingest import config


def airflow_environment() -> dict[str, str]:
    """Variables for `airflow` commands and `dag.test()`; values already set by the caller win."""
    root = config.project_root()
    home = config.state_dir() / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    defaults = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(root / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": (
            '[{"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle", '
            f'"kwargs": {{"path": "{root / "dags"}"}}}}]'
        ),
    }
    return {key: os.environ.get(key, value) for key, value in defaults.items()}
