"""The sealed share context's format: what the site seals, only its key opens."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidTag

from access.sealed_context import MAX_SEALED_LENGTH, check_sealed, seal, unseal

CONTEXT = {"patient_name": "DUPONT^Marie", "exam_date": "2026-03-01", "clinical_question": "Nodule ?"}


def test_sealed_under_a_fresh_key_and_opened_only_by_it() -> None:
    sealed, key = seal(CONTEXT)
    again, other_key = seal(CONTEXT)
    assert sealed != again and key != other_key  # a fresh key and IV each time
    assert "DUPONT" not in sealed and check_sealed(sealed) == sealed
    assert unseal(sealed, key) == CONTEXT
    with pytest.raises(InvalidTag):
        unseal(sealed, other_key)
    version, iv, body = sealed.split(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with pytest.raises(InvalidTag):
        unseal(f"{version}.{iv}.{flipped}", key)


@pytest.mark.parametrize("value", [
    '{"patient_name": "DUPONT^Marie"}', "v2.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
    "v1.short.AAAAAAAAAAAAAAAAAAAAAA", "v1.AAAAAAAAAAAAAAAA.A", "",
    "v1.AAAAAAAAAAAAAAAA." + "A" * MAX_SEALED_LENGTH,
])
def test_anything_but_the_sealed_form_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="sealed_context"):
        check_sealed(value)


def test_only_an_object_of_texts_is_sealed() -> None:
    for context in ({}, {"age": 64}, {"name": ["a"]}):
        with pytest.raises(ValueError):
            seal(context)  # type: ignore[arg-type]
