"""Prometheus metrics of the node (its own registry, served on `dicom.metrics_port`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class NodeMetrics:
    """Instances and bytes received, refusals by status, associations and their duration,
    Query/Retrieve requests by service, the spool backlog and the flow control's holds."""

    def __init__(self, site_id: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"site": site_id}
        self.instances = Counter(
            "dicom_gateway_dimse_instances_received_total",
            "Instances acknowledged with Success",
            ["site"],
            registry=self.registry,
        ).labels(**labels)
        self.bytes = Counter(
            "dicom_gateway_dimse_bytes_received_total",
            "Bytes of acknowledged instances",
            ["site"],
            registry=self.registry,
        ).labels(**labels)
        self._failures = Counter(
            "dicom_gateway_dimse_store_failures_total",
            "C-STORE requests refused, by status",
            ["site", "status"],
            registry=self.registry,
        )
        self._associations = Counter(
            "dicom_gateway_dimse_associations_total",
            "Associations closed, by outcome",
            ["site", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "dicom_gateway_dimse_association_seconds",
            "Association duration",
            ["site"],
            registry=self.registry,
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 1800),
        ).labels(**labels)
        self._queries = Counter(
            "dicom_gateway_dimse_queries_total",
            "Query/Retrieve requests, by service",
            ["site", "service"],
            registry=self.registry,
        )
        self.held = Counter(
            "dicom_gateway_dimse_store_held_seconds_total",
            "Seconds C-STORE answers waited for the worker to drain the spool "
            "backlog (flow control)",
            ["site"],
            registry=self.registry,
        ).labels(**labels)
        #: Instances spooled and not yet stored by the worker (all sites of this spool).
        self.backlog = Gauge(
            "dicom_gateway_spool_backlog_instances",
            "Instances in the spool, waiting for the worker",
            registry=self.registry,
        )
        self.site_id = site_id

    def failure(self, status: int) -> None:
        self._failures.labels(self.site_id, f"0x{status:04X}").inc()

    def association(self, outcome: str, seconds: float) -> None:
        self._associations.labels(self.site_id, outcome).inc()
        self.duration.observe(seconds)

    def query(self, service: str) -> None:
        self._queries.labels(self.site_id, service).inc()


__all__ = ["NodeMetrics"]
