"""health-ingest: FHIR and claims exports, checked and pseudonymised, into a sovereign PostgreSQL warehouse."""

__version__ = "0.1.0"
