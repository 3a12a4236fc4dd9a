"""Named errors with exit codes, whose messages never carry record values.

Each says whether a retry can help (`retryable`): a bad configuration, a delivery that cannot be read and a batch a
gate rejected fail the same way every time, so Airflow must not retry them; a lost connection or a server that did
not answer may go better on the next try.
"""

from __future__ import annotations


class HealthIngestError(Exception):
    """Base of the project's errors; `exit_code` is what the CLI returns, `retryable` whether a retry can help."""

    exit_code = 1
    retryable = False

    def __init__(self, *args: object, retryable: bool | None = None) -> None:
        super().__init__(*args)
        if retryable is not None:
            self.retryable = retryable


class RecordProblem(HealthIngestError):
    """One record cannot be loaded: it goes to quarantine with `reason` and a message that quotes none of it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ConfigurationError(HealthIngestError):
    exit_code = 2


class KeyringError(ConfigurationError):
    pass


class JurisdictionRefused(ConfigurationError):
    """The hosting policy forbids this warehouse; the message names the rule."""


class ViewDefinitionError(ConfigurationError, ValueError):
    """A ViewDefinition is invalid, or a path returned what its column forbids."""


class DeliveryError(HealthIngestError):
    """The delivery cannot be read as a whole (missing folder, no files): nothing was loaded."""

    exit_code = 3


class MixedResourceTypes(DeliveryError):
    """A file holds records of two resource types (`line N: a resource of type X in a file of Y`): the batch
    refuses it whole, naming the file. Raised by the workers, which know the line but not the file's label."""


class LoadError(HealthIngestError):
    """The batch was rolled back: the warehouse holds nothing of it. Raised by the batch with its cause's
    `retryable`; raised as such (a lost connection, counts that did not reconcile) a retry may help."""

    exit_code = 4
    retryable = True


class BatchRejected(LoadError):
    """A gate refused the batch (privacy or data quality): it is marked 'rejected', not 'failed'.

    `evidence` is the gate's report, recorded after the rollback so the operator can see why.
    """

    exit_code = 5
    retryable = False

    def __init__(self, message: str, *, evidence: object = None, retryable: bool | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.evidence = evidence


class ExportError(HealthIngestError):
    """A Bulk Data export could not be pulled whole (server answer, manifest, download): nothing was loaded."""

    exit_code = 6
    retryable = True


class ExportExpired(ExportError):
    """The server no longer knows the export (status URL gone, files expired): a new one must be kicked off."""


def retryable(error: BaseException) -> bool:
    """Whether a retry can help: the project's errors say so; an error from elsewhere (a lost connection, a full
    disk, a bug) is given the benefit of the doubt, as Airflow would."""
    if isinstance(error, HealthIngestError):
        return error.retryable
    return not isinstance(error, KeyboardInterrupt)
