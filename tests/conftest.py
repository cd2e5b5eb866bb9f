"""Module-scoped fixtures of the tests/test_checkpoint_*.py files, read from the test module's FIXTURES (its
folder under tests/fixtures/), TINY (the tiny checkpoint), PROMPT_PHOTOS and QUESTION; see checkpoint_answers.py.
A module that defines a fixture of the same name uses its own."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def reference(request):
    """FIXTURES/reference.safetensors: what the reference script computed (input_ids, logits, greedy_ids, ...)."""
    from safetensors.torch import load_file

    return load_file(request.module.FIXTURES / "reference.safetensors")


@pytest.fixture(scope="module")
def loaded(request):
    """The tiny checkpoint, loaded as `vlmkit generate` loads it."""
    from vlmkit.load import load_model

    return load_model(str(request.module.TINY))


@pytest.fixture(scope="module")
def two_photos(request):
    """The photos of the reference's two-photo prompt, in order."""
    from reference.shared import photo  # the reference scripts' photos, by name

    return [photo(name) for name in request.module.PROMPT_PHOTOS]


@pytest.fixture(scope="module")
def answer_text(request, loaded, reference, two_photos) -> str:
    """The text of the reference's 20 greedy tokens, as vlmkit decodes them."""
    from checkpoint_answers import greedy_answer_text, two_photo_messages

    return greedy_answer_text(loaded, two_photo_messages(request.module.QUESTION), two_photos,
                              reference["greedy_ids"].tolist())


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory, two_photos) -> list[str]:
    """two_photos as PNG files."""
    from checkpoint_answers import save_photos

    return save_photos(tmp_path_factory.mktemp("photos"), two_photos)
