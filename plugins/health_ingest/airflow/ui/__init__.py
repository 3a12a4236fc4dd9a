"""The Ingestion view that the Airflow API server serves: sources, batches, quarantine and quality at a glance."""

URL_PREFIX = "/ingestion"  # where the API server mounts the view's app
