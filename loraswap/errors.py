"""Domain errors. The gRPC edge maps each class to one status code; the CLI prints the message."""

from __future__ import annotations

from collections.abc import Iterable


class LoraswapError(Exception):
    """Base class of every error loraswap raises on purpose."""


class NotFoundError(LoraswapError):
    """An adapter, tag, version or model that does not exist (gRPC NOT_FOUND)."""


class _ProblemsError(LoraswapError):
    """An error that carries every problem found, not just the first: ``what`` then one line per problem."""

    def __init__(self, what: str, problems: Iterable[str] = ()) -> None:
        self.problems = list(problems)
        message = what if not self.problems else what + ":\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class InvalidArgumentError(_ProblemsError):
    """Bad input from the caller (gRPC INVALID_ARGUMENT). Carries every problem found, not just the first."""


class AdapterValidationError(InvalidArgumentError):
    """An adapter folder that fails validation (on push, pull or load)."""


class FailedPreconditionError(LoraswapError):
    """The request is well formed but this server cannot run it as configured (gRPC FAILED_PRECONDITION);
    retrying is useless until an operator changes something. The message says what."""


class MissingDependencyError(FailedPreconditionError):
    """A feature needs an optional package that is not installed; the message names the ``pip install``
    to run (``pip install 'loraswap[s3]'``)."""


class IncompatibleAdapterError(FailedPreconditionError, _ProblemsError):
    """A well-formed adapter that cannot run on the loaded base (gRPC FAILED_PRECONDITION). Carries every
    problem found."""


class ConflictError(LoraswapError):
    """A concurrent update won a race (compare-and-swap failed); retrying may succeed (gRPC ABORTED)."""


class IntegrityError(LoraswapError):
    """Stored content does not match its digest (gRPC DATA_LOSS)."""


class OverloadedError(LoraswapError):
    """The request queue is full (gRPC RESOURCE_EXHAUSTED)."""


class UnavailableError(LoraswapError):
    """Something the request needs cannot be reached now (the registry, or this server while it starts or
    drains); retrying later may succeed (gRPC UNAVAILABLE, HTTP 503). The message names what."""


class RegistryUnavailableError(UnavailableError):
    """The registry's store cannot be reached or answered with an error (network, credentials, a missing
    bucket, a read that broke off). The message names the registry's URL."""


class DrainingError(UnavailableError):
    """The server is starting or shutting down and takes no new work (gRPC UNAVAILABLE)."""


class CancelledError(LoraswapError):
    """The request was cancelled by its caller (gRPC CANCELLED)."""


class DeadlineExceededError(LoraswapError):
    """The caller's deadline passed before the request finished; its work was dropped."""


class UnauthenticatedError(LoraswapError):
    """No bearer token, or one the server does not know (gRPC UNAUTHENTICATED, HTTP 401)."""


class PermissionDeniedError(LoraswapError):
    """A valid token that does not allow this call (gRPC PERMISSION_DENIED, HTTP 403)."""
