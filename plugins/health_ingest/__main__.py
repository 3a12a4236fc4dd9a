from health_ingest.cli import main

raise SystemExit(main())
