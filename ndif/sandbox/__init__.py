"""The sandbox: untrusted trace bodies compiled under guards and run within limits (docs/sandbox.md)."""

from .guards import SandboxViolation
from .limits import JobLimits, LimitExceeded, MemoryLimitExceeded, SaveLimitExceeded, TimeLimitExceeded
from .runtime import run_request

__all__ = [
    "JobLimits",
    "LimitExceeded",
    "MemoryLimitExceeded",
    "SandboxViolation",
    "SaveLimitExceeded",
    "TimeLimitExceeded",
    "run_request",
]
