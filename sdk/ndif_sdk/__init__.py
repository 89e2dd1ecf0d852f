"""ndif's client: ``remote=True``, job handles, batch experiments and the ``ndif`` command line.

    with model.trace(prompt, remote=True):          # runs on the service, blocks
        hidden = model.model.layers[5].output.save()

    with model.trace(prompt, remote=True, blocking=False) as tracer:
        logits = model.lm_head.output.save()
    job = tracer.job                                 # job.id, job.status(), job.result()

    with ndif_sdk.Batch("sweep") as batch:           # many traces, one submission
        for prompt in prompts:
            with model.trace(prompt, remote=batch):
                logits = model.lm_head.output.save()

``ndif.jobs`` and ``ndif.Batch`` are these same objects.
"""

from . import jobs
from .backend import RemoteBackend
from .batch import Batch
from .client import Client
from .errors import AuthenticationError, JobFailed, NotFound, QuotaExceeded, ServiceError
from .jobs import Job

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Batch",
    "Client",
    "Job",
    "JobFailed",
    "NotFound",
    "QuotaExceeded",
    "RemoteBackend",
    "ServiceError",
    "jobs",
]
