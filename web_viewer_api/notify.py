"""Sending a share link to its recipient by e-mail (SMTP, e.g. an MSSanté operator's relay).
The PIN never travels with the link: the sender gives it through another channel."""

from __future__ import annotations

import datetime as dt
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int = 587
    sender: str = "dicom-gateway@localhost"
    #: STARTTLS after connecting (587); `use_ssl` for implicit TLS (465); neither for a
    #: trusted local relay.
    starttls: bool = True
    use_ssl: bool = False
    username: str | None = None
    password: str | None = None
    timeout_seconds: float = 15.0


class NotificationError(Exception):
    """The message could not be handed to the SMTP server."""


def share_message(
    config: SmtpConfig,
    recipient: str,
    url: str,
    expires_at: dt.datetime,
    *,
    has_pin: bool,
    sender_note: str = "",
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = config.sender
    message["To"] = recipient
    message["Subject"] = "Images médicales partagées / Shared medical images"
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=config.sender.rpartition("@")[2] or None)
    expiry = expires_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    pin_line = (
        "Un code PIN vous sera communiqué séparément par l'expéditeur. / "
        "The sender will give you a PIN separately.\n"
        if has_pin
        else ""
    )
    note = f"\nMessage de l'expéditeur / Sender's note:\n{sender_note}\n" if sender_note else ""
    message.set_content(
        "Des images médicales ont été partagées avec vous. / Medical images were shared with you.\n\n"
        f"{url}\n\n"
        f"Lien valable jusqu'au / Link valid until: {expiry}\n{pin_line}{note}\n"
        "Ne transférez pas ce message. / Do not forward this message.\n"
    )
    return message


def send(config: SmtpConfig, message: EmailMessage) -> None:
    """Hand the message to the configured SMTP server (TLS verified when used)."""
    context = ssl.create_default_context()
    try:
        client: smtplib.SMTP
        if config.use_ssl:
            client = smtplib.SMTP_SSL(
                config.host, config.port, timeout=config.timeout_seconds, context=context
            )
        else:
            client = smtplib.SMTP(config.host, config.port, timeout=config.timeout_seconds)
        with client:
            if config.starttls and not config.use_ssl:
                client.starttls(context=context)
            if config.username:
                client.login(config.username, config.password or "")
            client.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        raise NotificationError(f"SMTP delivery failed: {type(exc).__name__}") from exc


__all__ = ["NotificationError", "SmtpConfig", "send", "share_message"]
