"""The class path under which Airflow databases hold the inbox trigger; the triggers live in `health_ingest.airflow`."""

from health_ingest.airflow.triggers import DeliveryReadyTrigger, ExportReadyTrigger  # noqa: F401
