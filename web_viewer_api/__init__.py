"""The HTTP face of the gateway: DICOMweb, health, metrics (shares and viewer to come)."""

from web_viewer_api.app import ApiConfig, create_app
from web_viewer_api.dicomweb.stow import StowTarget
from web_viewer_api.errors import ApiError

__all__ = ["ApiConfig", "ApiError", "StowTarget", "create_app"]
