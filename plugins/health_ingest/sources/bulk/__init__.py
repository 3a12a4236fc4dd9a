"""FHIR Bulk Data Access (`$export`) client: kick-off, polling, manifest, downloads, authorisation, resume."""
