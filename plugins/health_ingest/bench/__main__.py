"""`make bench`: build the scaled datasets, measure each size in its own process, print and save the figures."""

if __name__ == "__main__":
    from health_ingest.bench.report import main

    raise SystemExit(main())
