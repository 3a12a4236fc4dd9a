"""The app the plugin hands to Airflow before anything of the view is imported."""

from __future__ import annotations

import threading


class LazyApp:
    """An ASGI app that builds the FastAPI app on its first request: importing the plugin (which every Airflow
    component does) then costs nothing, and only the API server, which serves it, pays for building it."""

    def __init__(self) -> None:
        self._app = None
        self._lock = threading.Lock()

    async def __call__(self, scope, receive, send) -> None:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    from health_ingest.airflow.ui.app import create_app

                    self._app = create_app()
        await self._app(scope, receive, send)
