"""Prometheus metrics of the API process; job counts are read from the job store at scrape time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from .db import ACTIVE, WAITING, Job

if TYPE_CHECKING:
    from .service import Service


class _JobCollector:
    """Jobs waiting and running per model and status, straight from the job store."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Any:
        gauge = GaugeMetricFamily("ndif_jobs", "Jobs not yet ended, by model and status.", labels=["model", "status"])
        with self.service.sessions() as session:
            rows = session.execute(
                select(Job.model, Job.status, func.count())
                .where(Job.status.in_(list(WAITING | ACTIVE)))
                .group_by(Job.model, Job.status)
            ).all()
        for model, status, count in rows:
            gauge.add_metric([model, status], count)
        yield gauge


class Metrics:
    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        self._http = Counter(
            "ndif_http_requests",
            "HTTP requests by route and status code.",
            ["method", "route", "code"],
            registry=self.registry,
        )
        self._submitted = Counter(
            "ndif_jobs_submitted", "Jobs accepted, by model and lane.", ["model", "lane"], registry=self.registry
        )
        self._refused = Counter(
            "ndif_submissions_refused",
            "Submissions refused by the service, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_JobCollector(service))

    def http(self, method: str, route: str, code: int) -> None:
        self._http.labels(method, route, str(code)).inc()

    def submitted(self, model: str, lane: str) -> None:
        self._submitted.labels(model, lane).inc()

    def refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
