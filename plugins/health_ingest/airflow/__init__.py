"""The Airflow adapters: task bodies, schedules, operators, triggers and the one connection reader. Business logic
stays in the packages below; nothing here is imported by them."""

from health_ingest.airflow import connections

connections.register()
