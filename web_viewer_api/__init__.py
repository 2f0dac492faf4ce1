"""The HTTP face of the gateway: DICOMweb, share links, authentication, audit, health, metrics."""

from web_viewer_api.app import ApiConfig, create_app
from web_viewer_api.audit import entry as audit_entry
from web_viewer_api.auth import FailureLimiter, utc_now
from web_viewer_api.dicomweb.rendering import RenderLimits
from web_viewer_api.dicomweb.stow import StowTarget
from web_viewer_api.errors import ApiError
from web_viewer_api.lookup import OriginalIdentifiers, PseudonymLookup, find_studies, lookup_sites
from web_viewer_api.notify import SmtpConfig
from web_viewer_api.oidc import OidcConfig
from web_viewer_api.proxies import parse_networks
from web_viewer_api.request_limits import RequestLimits
from web_viewer_api.security import hash_pin, new_api_key, new_pin, sha256_hex
from web_viewer_api.share_errors import ShareError
from web_viewer_api.shares import CreatedShare, SharePolicy, ShareRequest, ShareService

__all__ = [
    "ApiConfig",
    "ApiError",
    "CreatedShare",
    "FailureLimiter",
    "OidcConfig",
    "OriginalIdentifiers",
    "PseudonymLookup",
    "RenderLimits",
    "RequestLimits",
    "ShareError",
    "SharePolicy",
    "ShareRequest",
    "ShareService",
    "SmtpConfig",
    "StowTarget",
    "audit_entry",
    "create_app",
    "find_studies",
    "hash_pin",
    "lookup_sites",
    "new_api_key",
    "new_pin",
    "parse_networks",
    "sha256_hex",
    "utc_now",
]
