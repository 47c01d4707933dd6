"""The `Embedder` contract, run over every embedder in tests/contracts/backends.py (the fake, the
query cache in front of it, the OpenAI and Ollama clients against a fake server, and the real
MiniLM on ONNX Runtime and on torch).

An embedder passes when it names its model, returns one L2-normalised float32 row per text in the
input's order, gives the same vector for a text alone or in any batch, handles empty, non-ASCII and
over-long input, refuses a bare string, and puts texts that share their words closer together than
unrelated ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from headroom.memory.ports import Embedder

TEXTS = [
    "I prefer Python with FastAPI for backend services.",
    "hi",
    "",
    "Ünïcödé text: 東京 is the capital of Japan 🎉",
    "The user's dog is called Biscuit and is afraid of thunderstorms. " * 40,  # > 256 tokens
]


def test_is_an_embedder_with_a_model_and_a_size(embedder: Embedder) -> None:
    assert isinstance(embedder, Embedder)
    assert isinstance(embedder.model_id, str) and embedder.model_id
    assert isinstance(embedder.dimension, int) and embedder.dimension > 0


def test_one_unit_float32_row_per_text(embedder: Embedder) -> None:
    vectors = embedder.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), embedder.dimension)
    assert vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_no_texts_give_an_empty_matrix(embedder: Embedder) -> None:
    out = embedder.embed([])
    assert out.shape == (0, embedder.dimension)
    assert out.dtype == np.float32


def test_a_text_gets_the_same_vector_alone_in_any_batch_and_order(embedder: Embedder) -> None:
    batch = embedder.embed(TEXTS)
    singles = np.vstack([embedder.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(batch, singles, atol=1e-5)
    reversed_batch = embedder.embed(TEXTS[::-1])
    np.testing.assert_allclose(reversed_batch[::-1], batch, atol=1e-5)


def test_a_bare_string_is_refused(embedder: Embedder) -> None:
    # A str is a Sequence[str]: accepting it would embed each character as a text.
    with pytest.raises(TypeError):
        embedder.embed("what language should I use?")  # type: ignore[arg-type]


def test_texts_sharing_words_are_closer_than_unrelated_ones(embedder: Embedder) -> None:
    a, b, c = embedder.embed(
        [
            "My favourite programming language is Python.",
            "Python is my favourite programming language",
            "The recipe needs two eggs and a cup of flour.",
        ]
    )
    assert float(a @ b) > 0.8
    assert float(a @ b) > float(a @ c) + 0.3
