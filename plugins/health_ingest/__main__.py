"""`python -m health_ingest`; guarded because Airflow imports every module under `plugins/`."""

if __name__ == "__main__":
    from health_ingest.cli import main

    raise SystemExit(main())
