"""Outgoing events (`study.stored`) to configured webhooks, signed with HMAC-SHA256."""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

SIGNATURE_HEADER = "X-DicomGateway-Signature"
EVENT_HEADER = "X-DicomGateway-Event"
DELIVERY_HEADER = "X-DicomGateway-Delivery"


class WebhookDeliveryError(Exception):
    """The receiver did not accept the event (network error or non-2xx): retry later."""


@dataclass(frozen=True)
class Webhook:
    """A receiver of events and the secret both sides use to sign them."""

    url: str
    secret: str
    timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not self.url.lower().startswith(("https://", "http://")):
            raise ValueError("a webhook URL must be http(s)")


def sign(secret: str, body: bytes) -> str:
    """The signature header value: `sha256=<hex HMAC of the raw body>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """What a receiver does: constant-time comparison of the signature."""
    return hmac.compare_digest(sign(secret, body), signature)


def encode_event(event: dict[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":")).encode()


def deliver(webhook: Webhook, event_type: str, delivery_id: str, body: bytes) -> int:
    """POST one event; return the HTTP status, raise WebhookDeliveryError to be retried."""
    request = urllib.request.Request(
        webhook.url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            EVENT_HEADER: event_type,
            DELIVERY_HEADER: delivery_id,
            SIGNATURE_HEADER: sign(webhook.secret, body),
            "User-Agent": "dicom-gateway",
        },
    )
    try:
        # the URL's scheme is checked when the webhook is built (http/https only)
        with urllib.request.urlopen(request, timeout=webhook.timeout_seconds) as response:  # nosec B310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        raise WebhookDeliveryError(f"receiver answered {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise WebhookDeliveryError(f"receiver unreachable: {type(exc).__name__}") from exc
