"""The Airflow plugin of health-ingest: the Ingestion view, mounted by the API server and linked from the UI's
navigation. The app is built on its first request, so importing this module costs Airflow's components nothing."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from health_ingest.airflow.ui import URL_PREFIX
from health_ingest.airflow.ui.mount import LazyApp


class HealthIngestPlugin(AirflowPlugin):
    name = "health_ingest"
    fastapi_apps = [{"app": LazyApp(), "url_prefix": URL_PREFIX, "name": "Ingestion"}]
    external_views = [
        {
            "name": "Ingestion",
            "href": URL_PREFIX + "/",
            "destination": "nav",
            "url_route": "ingestion",
            "nav_top_level": True,
            "icon": URL_PREFIX + "/static/icon.svg",
            "icon_dark_mode": URL_PREFIX + "/static/icon-dark.svg",
        }
    ]
