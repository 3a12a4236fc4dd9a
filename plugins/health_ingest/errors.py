"""Named errors with exit codes, whose messages never carry record values."""

from __future__ import annotations


class HealthIngestError(Exception):
    """Base of the project's errors; `exit_code` is what the CLI returns."""

    exit_code = 1


class ConfigurationError(HealthIngestError):
    exit_code = 2


class KeyringError(ConfigurationError):
    pass


class DeliveryError(HealthIngestError):
    """The delivery cannot be read as a whole (missing folder, no files): nothing was loaded."""

    exit_code = 3


class LoadError(HealthIngestError):
    """The batch was rolled back: the warehouse holds nothing of it."""

    exit_code = 4


class BatchRejected(LoadError):
    """A gate refused the batch (privacy or data quality): it is marked 'rejected', not 'failed'.

    `evidence` is the gate's report, recorded after the rollback so the operator can see why.
    """

    exit_code = 5

    def __init__(self, message: str, *, evidence: object = None) -> None:
        super().__init__(message)
        self.evidence = evidence


class ExportError(HealthIngestError):
    """A Bulk Data export could not be pulled whole (server answer, manifest, download): nothing was loaded."""

    exit_code = 6


class ExportExpired(ExportError):
    """The server no longer knows the export (status URL gone, files expired): a new one must be kicked off."""
