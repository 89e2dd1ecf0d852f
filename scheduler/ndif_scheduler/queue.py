"""The Celery app: one queue per deployment and lane, messages that carry only a job id.

Tasks are acknowledged late (after they return) and a message whose worker died is
given back to the broker. Whether a job runs is decided by the job store, not by the
message: a duplicate or redelivered message finds the job already claimed and does
nothing. The periodic tasks (``celery beat``, or ``worker -B``) recover jobs whose
lease ran out, expire old results and refresh what ``GET /v1/models`` reports.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_ready

from .service import Service, get_service

RUN_JOB = "ndif.run_job"


def make_celery(service: Service) -> Celery:
    settings = service.settings
    app = Celery("ndif", broker=settings.broker, set_as_current=False)
    app.conf.update(
        broker_transport_options=settings.broker_options(),
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,  # Ray needs the real stdout (fileno) in dispatchers
        task_default_queue=f"{settings.queue_prefix}.default",
        beat_schedule={
            "recover-expired-leases": {"task": "ndif.recover", "schedule": max(settings.lease_s / 4, 0.5)},
            "expire-results": {"task": "ndif.expire_results", "schedule": 60.0},
            "refresh-deployments": {"task": "ndif.refresh_deployments", "schedule": 5.0},
        },
    )
    return app


app = make_celery(get_service())


def enqueue(celery: Celery, service: Service, job_id: str, deployment_key: str, lane: str, delay: float = 0) -> None:
    """Send a job's message to its deployment's queue for its lane."""
    options: dict[str, Any] = {"queue": service.queue_name(deployment_key, lane)}
    if delay:
        options["countdown"] = delay
    celery.send_task(RUN_JOB, args=[job_id], **options)


@worker_ready.connect
def _connect_ray(**_: Any) -> None:
    """Dispatchers connect to Ray and to every replica as they start, not on their first job."""
    import threading

    from .dispatch import Dispatcher

    def connect() -> None:
        try:
            Dispatcher.get().refresh_deployments()  # connects, finds each replica, asks its health
        except Exception:  # retried by the first job, which reports it
            pass

    threading.Thread(target=connect, name="ndif-ray-connect", daemon=True).start()


@app.task(name=RUN_JOB, acks_late=True)
def run_job(job_id: str) -> None:
    from .dispatch import Dispatcher

    Dispatcher.get().run(job_id)


@app.task(name="ndif.recover")
def recover() -> None:
    from .dispatch import Dispatcher

    Dispatcher.get().recover()


@app.task(name="ndif.expire_results")
def expire_results() -> None:
    from .dispatch import Dispatcher

    Dispatcher.get().expire_results()


@app.task(name="ndif.refresh_deployments")
def refresh_deployments() -> None:
    from .dispatch import Dispatcher

    Dispatcher.get().refresh_deployments()
