"""The CLI and settings references in docs/reference/ are generated from the code
(scripts/generate_references.py): a command, an option or a setting added without
regenerating them fails here, so the documents cannot drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_references_are_what_the_code_says() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_references.py"),
                             "--check"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_setting_and_command_is_in_its_reference() -> None:
    from gateway.settings import Settings

    settings = (ROOT / "docs" / "reference" / "settings.md").read_text()
    for name in Settings.model_fields:
        assert f"DICOM_GATEWAY_{name.upper()}" in settings, name
    assert "DICOM_GATEWAY_DEID__CLEANED_DESCRIPTORS" in settings
    cli = (ROOT / "docs" / "reference" / "cli.md").read_text()
    for command in ("serve", "share create", "apikey create", "reindex", "import"):
        assert f"`dicom-gateway {command}`" in cli, command
