"""docs/admin/security/trust-model.md and its detail pages beside it name the test behind
every rule: each named test must exist (a renamed or deleted test would leave a rule without
its proof)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECURITY = ROOT / "docs" / "admin" / "security"
MAIN = SECURITY / "trust-model.md"
DOCS = [MAIN, *sorted(p for p in SECURITY.glob("*.md") if p != MAIN)]
#: `tests/…/file.py::name`, or `::name` after one (same file), or a bare test file.
_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+))?[^`]*`")


def _references() -> list[tuple[Path, str, str | None]]:
    found: list[tuple[Path, str, str | None]] = []
    for doc in DOCS:
        current: str | None = None
        for match in _REFERENCE.finditer(doc.read_text()):
            path, name = match.group(1), match.group(2)
            if path:
                current = path
            if current and (path or name):
                found.append((doc, current, name))
    return found


def test_every_test_the_trust_model_names_exists() -> None:
    references = _references()
    assert len(references) > 40  # the documents do name their tests
    missing = []
    for doc, path, name in references:
        source = ROOT / path
        if not source.is_file():
            missing.append(f"{doc.name}: {path}")
        elif name and not re.search(rf"^\s*(async )?def {name}\(", source.read_text(), re.M):
            missing.append(f"{doc.name}: {path}::{name}")
    assert missing == []
