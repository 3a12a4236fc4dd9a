"""The Ingestion view that the Airflow API server serves: sources, batches, quarantine and quality at a glance."""
