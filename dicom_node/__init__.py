"""The DICOM node: DIMSE services (C-ECHO, C-STORE in front of a durable spool; C-FIND,
C-MOVE and C-GET over the de-identified archive)."""

from dicom_node.handlers import AssociationBatches, handle_echo, handle_store
from dicom_node.policy import LOOPBACK_NETWORKS, CallerPolicy
from dicom_node.query import MoveDestination
from dicom_node.server import DicomNode, NodeConfig, TlsConfig
from dicom_node.status import Status
from worker import Spool, SpoolError, SpoolWriteError

__all__ = [
    "LOOPBACK_NETWORKS",
    "AssociationBatches",
    "CallerPolicy",
    "DicomNode",
    "MoveDestination",
    "NodeConfig",
    "Spool",
    "SpoolError",
    "SpoolWriteError",
    "Status",
    "TlsConfig",
    "handle_echo",
    "handle_store",
]
