"""PostgreSQL's BM25 ranks like FTS5's: the same documents first for the same queries, with
stems and diacritics matched the same way (recall quality must not depend on the backend)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from headroom.memory.adapters import FTS5TextIndex, SQLiteMemoryStore
from headroom.memory.adapters.postgres import PostgresFamily, fold_diacritics, open_postgres
from headroom.memory.db import Database
from headroom.memory.models import MemoryCategory
from tests.pg import pg_database, pg_schema_url, pg_server  # noqa: F401 (fixtures)

DOCS = [
    "I went running in the park with my dog yesterday",
    "My sister adopted a cat named Luna",
    "We are planning a trip to Kyoto in the spring",
    "The café near work serves great espresso",
    "I started learning the violin last month",
    "My dog loves the beach and the park",
    "Running a marathon is my goal for next year",
    "Luna the cat sleeps all day",
    "I had sushi in Kyoto last spring",
    "My favourite drink is a flat white espresso",
]
QUERIES = ["dog park", "running marathon", "Kyoto trip", "cafe espresso", "cat Luna",
           "violin lessons", "the sister"]


@pytest.fixture
def both(pg_schema_url: str, tmp_path: Path) -> Iterator[tuple[FTS5TextIndex, PostgresFamily]]:  # noqa: F811
    db = Database(tmp_path / "fts.db")
    SQLiteMemoryStore(db)
    fts = FTS5TextIndex(db)
    family = open_postgres(pg_schema_url, 8, pool_size=2)
    # Three copies of each document (and a marker word) so document frequencies differ.
    with db.transaction(), family.db.transaction():
        for copy in range(3):
            for i, doc in enumerate(DOCS):
                rid = copy * 100 + i + 1
                fts.add(rid, "u", "u", MemoryCategory.FACT, f"{doc} v{rid}")
                family.text.add(rid, "u", "u", MemoryCategory.FACT, f"{doc} v{rid}")
    yield fts, family
    family.close()
    db.close()


def documents(hits: list[tuple[int, float]]) -> list[int]:
    return [(rid - 1) % 100 for rid, _ in hits]


@pytest.mark.parametrize("query", QUERIES)
def test_the_same_documents_rank_first(
    both: tuple[FTS5TextIndex, PostgresFamily], query: str,
) -> None:
    fts, family = both
    expected = fts.search(query, "u", scope_keys=None, categories=None, k=6)
    got = family.text.search(query, "u", scope_keys=None, categories=None, k=6)
    assert expected  # every query shares a word with some document
    assert documents(got) == documents(expected)


def test_diacritics_fold_but_other_scripts_stay() -> None:
    assert fold_diacritics("Café Müller, naïve") == "Cafe Muller, naive"
    assert fold_diacritics("東京 Ærø") == "東京 Ærø"
