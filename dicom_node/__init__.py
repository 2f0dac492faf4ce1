"""The DICOM node: DIMSE services (C-ECHO, C-STORE in front of a durable spool; C-FIND,
C-MOVE and C-GET over the de-identified archive)."""

from dicom_node.audit import NodeAudit
from dicom_node.commitment import IsStored
from dicom_node.handlers import AssociationBatches, handle_echo, handle_store
from dicom_node.policy import (
    ALL_RIGHTS,
    LOOPBACK_NETWORKS,
    Caller,
    CallerCredential,
    CallerPolicy,
    Right,
)
from dicom_node.query import MoveDestination
from dicom_node.server import DicomNode, NodeConfig, TlsConfig
from spool import Spool, SpoolError, SpoolWriteError

__all__ = [
    "ALL_RIGHTS",
    "LOOPBACK_NETWORKS",
    "AssociationBatches",
    "Caller",
    "CallerCredential",
    "CallerPolicy",
    "DicomNode",
    "IsStored",
    "MoveDestination",
    "NodeAudit",
    "NodeConfig",
    "Right",
    "Spool",
    "SpoolError",
    "SpoolWriteError",
    "TlsConfig",
    "handle_echo",
    "handle_store",
]
