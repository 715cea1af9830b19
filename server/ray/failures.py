"""What a caller sees when work on the engine replicas fails (imports ``ray`` when called).

A replica's own error comes back wrapped in Ray's ``RayTaskError`` and is raised as it was; a replica that
died, or a deployment with none running, is :class:`~loraswap.errors.DrainingError` (UNAVAILABLE: retry);
a wait that ran past the call's deadline is :class:`~loraswap.errors.DeadlineExceededError`. A request
whose replica died is sent again under :func:`replica_retry`.
"""

from __future__ import annotations

from loraswap.errors import DeadlineExceededError, DrainingError
from loraswap.retry import RetryPolicy


def domain_error(exc: BaseException) -> BaseException:
    """The error a caller should see for ``exc`` (others as they are)."""
    from ray import exceptions
    from ray.serve.exceptions import DeploymentUnavailableError

    if isinstance(exc, exceptions.RayTaskError) and isinstance(exc.cause, BaseException):
        return exc.cause
    if replica_died(exc):
        return DrainingError("the replica serving the request stopped; retry")
    if isinstance(exc, DeploymentUnavailableError):
        return DrainingError("no engine replica is running; retry")
    if isinstance(exc, TimeoutError):  # a wait bounded by the call's deadline (a replica's own is above)
        return DeadlineExceededError("the call's deadline passed while the replicas worked")
    return exc


def replica_died(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica under a request is gone (so the request may be sent again)."""
    return isinstance(exc, _replica_gone())


def replica_retry(retries: int) -> RetryPolicy:
    """A request sent ``retries`` more times, at once, while the replica under it dies before it answers."""
    return RetryPolicy(attempts=retries + 1, retry_on=_replica_gone())


def _replica_gone() -> tuple[type[BaseException], ...]:
    from ray import exceptions

    return (exceptions.RayActorError, exceptions.ActorUnavailableError)
