"""Sources: the sources file, and landing deliveries into the ingestion zone."""
