-- Flat analytic tables built from the SQL-on-FHIR ViewDefinitions kept in the repository.
CREATE SCHEMA IF NOT EXISTS flat;
GRANT USAGE ON SCHEMA flat TO health_ingest_reader;
GRANT USAGE, CREATE ON SCHEMA flat TO health_ingest_loader;
