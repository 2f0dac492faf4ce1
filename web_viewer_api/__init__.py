"""The HTTP face of the gateway: DICOMweb, share links, authentication, audit, health, metrics."""

from web_viewer_api.app import ApiConfig, create_app
from web_viewer_api.auth import FailureLimiter
from web_viewer_api.dicomweb.rendering import RenderLimits
from web_viewer_api.dicomweb.stow import StowTarget
from web_viewer_api.errors import ApiError
from web_viewer_api.lookup import OriginalIdentifiers, PseudonymLookup, find_studies, lookup_sites
from web_viewer_api.notify import SmtpConfig
from web_viewer_api.oidc import OidcConfig
from web_viewer_api.proxies import parse_networks
from web_viewer_api.request_limits import RequestLimits

__all__ = [
    "ApiConfig",
    "ApiError",
    "FailureLimiter",
    "OidcConfig",
    "OriginalIdentifiers",
    "PseudonymLookup",
    "RenderLimits",
    "RequestLimits",
    "SmtpConfig",
    "StowTarget",
    "create_app",
    "find_studies",
    "lookup_sites",
    "parse_networks",
]
