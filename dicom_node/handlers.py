"""DIMSE event handlers: plain functions, dependencies bound as data by server.py."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from dicom_node.audit import NodeAudit
from dicom_node.backlog import SpoolBacklog
from dicom_node.metrics import NodeMetrics
from dicom_node.policy import Caller, CallerPolicy, Right
from dicom_node.receive import ReceiveFolder
from imaging import (
    DEFAULT_DECODE_LIMITS,
    UNREADABLE_DATASET_ERRORS,
    DecodeLimitExceeded,
    DecodeLimits,
    EchoStatus,
    StoreStatus,
    check_complete,
    is_uid_shaped,
    read_bounded,
    text_of,
)
from spool import SPOOL_SUFFIX, BatchClaim, Spool, SpoolWriteError, hand_over, new_association_tag

log = logging.getLogger(__name__)


#: (site, batch) -> hands the batch to the worker; returns the broker's identity (see
#: `spool.claims.PendingRecord.epoch`) or None.
Enqueue = Callable[[str, str], str | None]


@dataclass
class _AssociationState:
    tag: str = field(default_factory=new_association_tag)
    batches: set[str] = field(default_factory=set)
    #: study -> (chunk number, instances in the open chunk)
    chunks: dict[str, tuple[int, int]] = field(default_factory=dict)
    stored: int = 0
    failed: int = 0
    bytes: int = 0
    last_size: int = 0
    site: str | None = None
    started: float = field(default_factory=time.monotonic)
    #: The last refusal's status (the association's audit event reports it).
    last_failure: int = 0
    #: The batches being written, each held until it is handed to the worker
    #: (`spool.claims`): a batch whose node died is seen at once by the recovery loop.
    claims: dict[str, BatchClaim] = field(default_factory=dict)


class SiteSpools:
    """The spool of each site this node receives for: a calling AE title mapped to a site
    spools there (its local IDs are then qualified by that site); others use the node's."""

    def __init__(self, root: Path, default_site: str, calling_ae_sites: Mapping[str, str]) -> None:
        self.default = Spool(root, default_site)
        self._by_site = {default_site: self.default}
        for site in sorted(set(calling_ae_sites.values())):
            self._by_site.setdefault(site, Spool(root, site))
        self._sites = {ae.strip(): site for ae, site in calling_ae_sites.items()}

    def site_for(self, calling_ae_title: str) -> str:
        """The site a calling AE's C-STOREs are filed under."""
        return self._sites.get(calling_ae_title.strip(), self.default.site_id)

    def for_caller(self, calling_ae_title: str) -> Spool:
        return self._by_site[self.site_for(calling_ae_title)]

    def all(self) -> list[Spool]:
        return list(self._by_site.values())

    def holds(self, sop_instance_uid: str, site_ids: frozenset[str] | None = None) -> bool:
        """True when an instance with this (original) UID is spooled, durably, at one of
        `site_ids` (None: at any site)."""
        if not is_uid_shaped(sop_instance_uid):
            return False
        return any(
            next(spool.site_dir.glob(f"*/{sop_instance_uid}{SPOOL_SUFFIX}"), None) is not None
            for spool in self.all()
            if site_ids is None or spool.site_id in site_ids
        )


class AssociationBatches:
    """The spool batches each open association has written to (thread-safe), and the
    node's metrics when it keeps any."""

    def __init__(self, metrics: NodeMetrics | None = None) -> None:
        self.metrics = metrics
        self._states: dict[int, _AssociationState] = {}
        self._lock = threading.Lock()

    def state(self, association: Any) -> _AssociationState:
        with self._lock:
            return self._states.setdefault(id(association), _AssociationState())

    def pop(self, association: Any) -> _AssociationState | None:
        with self._lock:
            return self._states.pop(id(association), None)


def handle_echo(event: Event) -> int:
    """C-ECHO: the node is alive."""
    return EchoStatus.SUCCESS


def _hand_over(
    state: _AssociationState, enqueue: Enqueue | None, site_id: str, batch_id: str
) -> None:
    """Send a written batch to the worker, record it, and let go of it. A failed send (the
    broker down) leaves it unrecorded: the workers' recovery loop sends it once it can."""
    claim = state.claims.pop(batch_id, None)
    if claim is None:
        return
    try:
        if enqueue is not None:
            hand_over(claim.directory, lambda batch: enqueue(site_id, batch))
    except Exception as exc:  # noqa: BLE001 - broker down: the recovery loop sends it
        log.error(
            "enqueue of batch %s failed (%s); the workers will send it again",
            batch_id,
            type(exc).__name__,
        )
    finally:
        claim.release()


#: Instances up to this size are parsed whole at the node (a truncated value is refused
#: with 0xC000); larger ones are parsed up to their Pixel Data, which stays on disk — the
#: worker's full parse quarantines such an instance if its pixel data is cut short.
FULL_CHECK_BYTES = 64 * 1024 * 1024


def handle_store(
    event: Event,
    spools: SiteSpools | Spool,
    batches: AssociationBatches,
    enqueue: Enqueue | None = None,
    chunk_size: int = 0,
    policy: CallerPolicy | None = None,
    limits: DecodeLimits = DEFAULT_DECODE_LIMITS,
    backlog: SpoolBacklog | None = None,
    receive: ReceiveFolder | None = None,
) -> int:
    """C-STORE (see `_store`) into the calling AE's site spool, counted in the metrics;
    with `policy`, a caller without the store right is refused (0x0124); an instance
    declaring more decoded pixels than `limits` is refused (0xA700). With `backlog`, a
    Success waits while the spool holds more than its limit and the worker drains it
    (see `dicom_node.backlog`). With `receive` (the folder pynetdicom wrote the data set
    in), a data set whose writing failed (disk full) is refused (0xA700)."""
    cut_short = receive.write_failed(event.dataset_path) if receive is not None else None
    spool = (
        spools.for_caller(event.assoc.requestor.ae_title)
        if isinstance(spools, SiteSpools)
        else spools
    )
    state = batches.state(event.assoc)
    state.site = spool.site_id
    if policy is not None and not caller_of(event.assoc, policy, spool.site_id).may(Right.STORE):
        state.failed += 1
        status: int = StoreStatus.NOT_AUTHORIZED
    elif cut_short is not None:
        state.failed += 1
        log.error("C-STORE refused: the data set could not be written (%s)", cut_short.strerror)
        status = StoreStatus.OUT_OF_RESOURCES
    else:
        status = _store(event, spool, batches, enqueue, chunk_size, limits)
    if status != StoreStatus.SUCCESS:
        state.last_failure = status
    if status == StoreStatus.SUCCESS and backlog is not None:
        backlog.added()
        held = backlog.hold()  # the instance is durable already: only the answer waits
        if held and batches.metrics is not None:
            batches.metrics.held.inc(held)
    if batches.metrics is not None:
        if status == StoreStatus.SUCCESS:
            batches.metrics.instances.inc()
            batches.metrics.bytes.inc(batches.state(event.assoc).last_size)
        else:
            batches.metrics.failure(status)
    return status


def _store(
    event: Event,
    spool: Spool,
    batches: AssociationBatches,
    enqueue: Enqueue | None = None,
    chunk_size: int = 0,
    limits: DecodeLimits = DEFAULT_DECODE_LIMITS,
) -> int:
    """C-STORE: check the data set parses and matches the request, spool it, then answer.

    Success only after the bytes are durable on disk; a spool failure answers 0xA700.
    With `chunk_size`, a study's batch is handed to the worker as soon as it holds that
    many instances, so processing overlaps with a long association.
    """
    state = batches.state(event.assoc)
    # pynetdicom wrote the data set to a temporary Part 10 file as it arrived (chunked
    # receive, in the spool's receive folder: dicom_node.receive); it is renamed into its
    # batch (copied, were it on another file system).
    path = Path(event.dataset_path)
    size = path.stat().st_size
    try:
        # A deflated data set is inflated only up to its pixel data, whose declared size is
        # checked: the node needs the header, and a small deflated file may hold gigabytes.
        dataset = read_bounded(
            path, limits, stop_before_pixels=size > FULL_CHECK_BYTES, inflate_pixels=False
        )
        check_complete(dataset)  # pydicom silently shortens a truncated value
        sop_class = text_of(dataset, "SOPClassUID")
        sop_instance = text_of(dataset, "SOPInstanceUID")
        study = text_of(dataset, "StudyInstanceUID")
    except DecodeLimitExceeded as exc:
        # PS3.4 B.2.3: Refused, Out of Resources — the instance may be valid, but decoding
        # it takes more than this gateway is configured to give; nothing is spooled.
        state.failed += 1
        log.warning("C-STORE refused: %s", exc)
        return StoreStatus.OUT_OF_RESOURCES
    except UNREADABLE_DATASET_ERRORS as exc:
        state.failed += 1
        log.warning("C-STORE refused: data set cannot be parsed (%s)", type(exc).__name__)
        return StoreStatus.CANNOT_UNDERSTAND
    request = cast(C_STORE, event.request)
    if (
        not sop_instance
        or not study
        or not text_of(dataset, "SeriesInstanceUID")
        or sop_class != str(request.AffectedSOPClassUID)
        or sop_instance != str(request.AffectedSOPInstanceUID)
    ):
        state.failed += 1
        log.warning("C-STORE refused: data set does not match the request or lacks UIDs")
        return StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    chunk, count = state.chunks.get(study, (0, 0))
    batch_id = spool.batch_id(state.tag, study) + (f"-{chunk:04d}" if chunk_size else "")
    try:
        if batch_id not in state.claims:  # held from its first instance to its hand-over
            state.claims[batch_id] = spool.claim(batch_id)
        spool.move_file(batch_id, sop_instance, path)
    except ValueError:
        state.failed += 1
        return StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    except SpoolWriteError as exc:
        state.failed += 1
        log.error("C-STORE refused: spool write failed (%s)", exc)
        return StoreStatus.OUT_OF_RESOURCES
    state.batches.add(batch_id)
    state.stored += 1
    state.bytes += size
    state.last_size = size
    count += 1
    if chunk_size and enqueue is not None and count >= chunk_size:
        state.batches.discard(batch_id)  # complete: handed over now, not at release
        _hand_over(state, enqueue, spool.site_id, batch_id)
        chunk, count = chunk + 1, 0
    state.chunks[study] = (chunk, count)
    return StoreStatus.SUCCESS


def caller_of(assoc: Any, policy: CallerPolicy, filing_site: str) -> Caller:
    """The credentials of an association's calling AE."""
    requestor = assoc.requestor
    return policy.caller(requestor.ae_title, str(requestor.address), filing_site)


def handle_connection_closed(
    event: Event,
    site_id: str,
    batches: AssociationBatches,
    enqueue: Enqueue,
    policy: CallerPolicy | None = None,
    audit: NodeAudit | None = None,
    pseudonymize_uid: Callable[[str], str] | None = None,
) -> None:
    """After release, abort or a dropped connection: enqueue one task per written batch,
    and write the association's audit events: counts, and the studies under their keyed
    pseudonym (`pseudonymize_uid`; without it, none named) — never an original UID.

    A failed enqueue is logged and left to the sweeper: the instances are on disk.
    """
    state = batches.pop(event.assoc)
    if state is None:
        return
    site_id = state.site or site_id
    for batch_id in sorted(state.batches):
        _hand_over(state, enqueue, site_id, batch_id)
    for claim in state.claims.values():  # none left, unless a write failed after the claim
        claim.release()
    assoc = event.assoc
    outcome = (
        "aborted"
        if getattr(assoc, "is_aborted", False)
        else ("released" if getattr(assoc, "is_released", False) else "dropped")
    )
    seconds = time.monotonic() - state.started
    if batches.metrics is not None:
        batches.metrics.association(outcome, seconds)
    if state.stored or state.failed:
        # One structured line per association: no PHI (AE titles and counts only).
        log.info(
            "association closed calling_ae=%s address=%s site=%s stored=%d refused=%d "
            "bytes=%d batches=%d duration_s=%.2f outcome=%s",
            assoc.requestor.ae_title.strip(),
            assoc.requestor.address,
            site_id,
            state.stored,
            state.failed,
            state.bytes,
            len(state.batches),
            seconds,
            outcome,
        )
        if audit is not None and policy is not None:
            studies = (
                {pseudonymize_uid(study) for study in state.chunks}
                if pseudonymize_uid is not None
                else set()
            )
            audit.record(
                "dimse.store",
                caller_of(assoc, policy, site_id),
                state.last_failure if state.failed else StoreStatus.SUCCESS,
                studies=studies,
                # some stored, some refused: a minor failure, whatever the status
                outcome=4 if state.failed and state.stored else None,
                # counts of the whole association, repeated in each study's event
                detail={
                    "site": site_id,
                    "association": {
                        "instances": state.stored,
                        "refused": state.failed,
                        "studies": len(state.chunks),
                        "bytes": state.bytes,
                        "outcome": outcome,
                    },
                },
            )
