"""Imaging: what the node, the worker and the API all do with DICOM data, without Celery,
the anonymizer or the index — read an untrusted data set within limits, check it is whole,
encode it, compress and verify losslessly, decompress for a client, render a frame."""

from imaging.dataset import (
    UNREADABLE_DATASET_ERRORS,
    TruncatedDataSetError,
    check_complete,
    encode_dataset,
    is_uid_shaped,
    text_of,
)
from imaging.limits import (
    DEFAULT_DECODE_LIMITS,
    DeclaredSize,
    DecodeLimitExceeded,
    DecodeLimits,
    check_declared,
    read_bounded,
)
from imaging.render import RenderError, has_pixel_data, render_frame, render_thumbnail
from imaging.status import CommitmentStatus, EchoStatus, QueryRetrieveStatus, StoreStatus
from imaging.transcode import Codec, TranscodeStatus, decompress_for_serving, transcode_lossless

__all__ = [
    "DEFAULT_DECODE_LIMITS",
    "UNREADABLE_DATASET_ERRORS",
    "Codec",
    "CommitmentStatus",
    "DeclaredSize",
    "DecodeLimitExceeded",
    "DecodeLimits",
    "EchoStatus",
    "QueryRetrieveStatus",
    "RenderError",
    "StoreStatus",
    "TranscodeStatus",
    "TruncatedDataSetError",
    "check_complete",
    "check_declared",
    "decompress_for_serving",
    "encode_dataset",
    "has_pixel_data",
    "is_uid_shaped",
    "read_bounded",
    "render_frame",
    "render_thumbnail",
    "text_of",
    "transcode_lossless",
]
