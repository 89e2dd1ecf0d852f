"""The sandbox: untrusted trace bodies compiled under guards and run within limits (docs/sandbox.md)."""

from .guards import SandboxViolation
from .limits import (
    CancelToken,
    JobCancelled,
    JobLimits,
    LimitExceeded,
    MemoryLimitExceeded,
    SaveLimitExceeded,
    TimeLimitExceeded,
)
from .runtime import check_request, run_request

__all__ = [
    "JobLimits",
    "CancelToken",
    "JobCancelled",
    "LimitExceeded",
    "MemoryLimitExceeded",
    "SandboxViolation",
    "SaveLimitExceeded",
    "TimeLimitExceeded",
    "check_request",
    "run_request",
]
