"""`BatchingEmbedder`: queries that arrive while a model call runs share the next call, get the
vectors they would get alone, and a lone query never waits; and the engine's query path uses it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headroom.memory import HierarchicalMemory, MemoryConfig
from headroom.memory.candidates import CandidateRows
from headroom.memory.embedders import BatchingEmbedder, OnnxEmbedder
from headroom.memory.errors import EmbedderError
from headroom.memory.models import MemoryFilter, Scope
from headroom.memory.ports import Embedder
from headroom.memory.recall import drop_words
from tests.fakes import FakeEmbedder, record_submits

QUERIES = [
    "what language should I use for my microservice?",
    "where does my sister live",
    "hi",
    "which database did we pick for the billing service and why",
    "Ünïcödé: 東京 trip plans 🎉",
    "my dog's name",
    "remind me of the deadline we agreed on last week",
    "favourite food",
]


class GatedEmbedder:
    """Its first call blocks until `release` is set, so the test controls what overlaps it."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.release = threading.Event()
        self.calls: list[list[str]] = []
        self._armed = True

    def arm(self) -> None:
        """Make the next call the blocking one again."""
        self.release.clear()
        self._armed = True

    @property
    def dimension(self) -> int:
        return self.inner.dimension

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if self._armed:
            self._armed = False
            assert self.release.wait(10), "the test never released the first call"
        return self.inner.embed(texts)


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.002)


def _embed_concurrently(
    batcher: BatchingEmbedder, gate: GatedEmbedder, calls: list[list[str]]
) -> list[np.ndarray | BaseException]:
    """The first call starts alone and blocks in the model; the others queue behind it; then the
    gate opens. Returns each call's vectors (or error) in the order of `calls`."""
    results: list[np.ndarray | BaseException] = [RuntimeError("not run")] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = batcher.embed(calls[i])
        except BaseException as exc:  # the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(0,))]
    threads[0].start()
    _wait_until(lambda: len(gate.calls) == 1)
    threads += [threading.Thread(target=run, args=(i,)) for i in range(1, len(calls))]
    for thread in threads[1:]:
        thread.start()
    _wait_until(lambda: batcher.stats()["queued"] == len(calls) - 1)
    gate.release.set()
    for thread in threads:
        thread.join(10)
    return results


def test_queries_arriving_during_a_call_share_the_next_one_and_get_their_own_vectors() -> None:
    fake = FakeEmbedder()
    gate = GatedEmbedder(fake)
    batcher = BatchingEmbedder(gate, max_batch=16)
    results = _embed_concurrently(batcher, gate, [[q] for q in QUERIES])
    for query, got in zip(QUERIES, results, strict=True):
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, FakeEmbedder().embed([query]))
    # The first alone, then all seven that queued behind it in one call.
    assert gate.calls == [QUERIES[:1], QUERIES[1:]]
    assert batcher.stats() == {"model_calls": 2, "texts": len(QUERIES), "queued": 0}


def test_a_lone_call_runs_at_once_with_exactly_its_texts() -> None:
    fake = FakeEmbedder()
    batcher = BatchingEmbedder(fake, max_batch=4)
    out = batcher.embed(["a", "b"])
    assert fake.calls == [["a", "b"]]
    np.testing.assert_array_equal(out, FakeEmbedder().embed(["a", "b"]))
    assert batcher.embed([]).shape == (0, fake.dimension)
    with pytest.raises(TypeError):
        batcher.embed("a bare string")  # type: ignore[arg-type]
    assert fake.calls == [["a", "b"]]


def test_batches_are_capped_in_order_and_a_big_call_runs_alone() -> None:
    gate = GatedEmbedder(FakeEmbedder())
    batcher = BatchingEmbedder(gate, max_batch=3)
    calls = [["first"], ["q1"], ["q2"], ["big1", "big2", "big3", "big4"], ["q3"], ["q4", "q5"]]
    results = _embed_concurrently(batcher, gate, calls)
    for texts, got in zip(calls, results, strict=True):
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, FakeEmbedder().embed(texts))
    assert gate.calls == [
        ["first"], ["q1", "q2"], ["big1", "big2", "big3", "big4"], ["q3", "q4", "q5"]
    ]


def test_a_failed_batch_fails_each_of_its_callers_and_the_next_call_works() -> None:
    fake = FakeEmbedder()
    gate = GatedEmbedder(fake)
    batcher = BatchingEmbedder(gate)

    original = gate.embed

    def failing_second_call(texts: Sequence[str]) -> np.ndarray:
        if len(gate.calls) == 1 and texts != ["first"]:
            gate.calls.append(list(texts))
            raise EmbedderError("model fell over")
        return original(texts)

    gate.embed = failing_second_call  # type: ignore[method-assign]
    results = _embed_concurrently(batcher, gate, [["first"], ["x"], ["y"]])
    assert isinstance(results[0], np.ndarray)
    assert all(isinstance(r, EmbedderError) for r in results[1:])
    np.testing.assert_array_equal(batcher.embed(["after"]), FakeEmbedder().embed(["after"]))


def test_real_model_vectors_match_single_calls(local_embedder: OnnxEmbedder) -> None:
    gate = GatedEmbedder(local_embedder)
    batcher = BatchingEmbedder(gate)
    results = _embed_concurrently(batcher, gate, [[q] for q in QUERIES])
    singles = np.vstack([local_embedder.embed([q]) for q in QUERIES])
    np.testing.assert_allclose(np.vstack(results), singles, atol=1e-5)  # type: ignore[arg-type]
    assert len(gate.calls) == 2


async def _until(condition: Callable[[], bool], what: Callable[[], object]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what()
        await asyncio.sleep(0.002)


async def test_the_engine_batches_concurrent_query_embeddings(tmp_path: Path) -> None:
    gate = GatedEmbedder(FakeEmbedder())
    memory = await HierarchicalMemory.create(MemoryConfig(db_path=tmp_path / "m.db"), embedder=gate)
    try:
        gate.calls.clear()
        gate.arm()
        batcher = memory._executors.query_batcher
        # One query finds the model idle and goes at once; seven asked while it runs queue.
        first = asyncio.create_task(memory.embed_query(QUERIES[0]))
        await _until(lambda: len(gate.calls) == 1, batcher.stats)
        rest = [asyncio.create_task(memory.embed_query(q)) for q in QUERIES[1:]]
        await _until(lambda: batcher.stats()["queued"] == 1, batcher.stats)
        gate.release.set()
        vectors = await asyncio.gather(first, *rest)
        for query, vector in zip(QUERIES, vectors, strict=True):
            np.testing.assert_array_equal(vector, FakeEmbedder().embed([query])[0])
        assert gate.calls == [QUERIES[:1], QUERIES[1:]]  # one alone, seven together
        # Repeats come from the query cache in front of the batcher: no model call at all.
        await asyncio.gather(*(memory.embed_query(q) for q in QUERIES))
        assert len(gate.calls) == 2
    finally:
        await memory.close()


async def test_queries_asked_in_one_loop_turn_make_one_model_call(tmp_path: Path) -> None:
    """asyncio.gather of 8 queries on an idle model: one call with all 8, each caller its row;
    a lone query still goes out alone, without waiting for company."""
    fake = FakeEmbedder()
    memory = await HierarchicalMemory.create(MemoryConfig(db_path=tmp_path / "m.db"), embedder=fake)
    try:
        fake.calls.clear()
        vectors = await asyncio.gather(*(memory.embed_query(q) for q in QUERIES))
        assert fake.calls == [QUERIES]
        for query, vector in zip(QUERIES, vectors, strict=True):
            np.testing.assert_array_equal(vector, FakeEmbedder().embed([query])[0])
        alone = await memory.embed_query("a query on its own")
        assert fake.calls[-1] == ["a query on its own"]
        np.testing.assert_array_equal(alone, FakeEmbedder().embed(["a query on its own"])[0])
        # A caller that gives up does not break the others asked beside it.
        tasks = [asyncio.create_task(memory.embed_query(f"fresh {i}")) for i in range(3)]
        await asyncio.sleep(0)
        tasks[0].cancel()
        got = await asyncio.gather(*tasks[1:])
        np.testing.assert_array_equal(got[1], FakeEmbedder().embed(["fresh 2"])[0])
        # The model's error reaches every caller of the group.
        fake.fail_with = EmbedderError("model fell over")
        results = await asyncio.gather(
            memory.embed_query("x1"), memory.embed_query("x2"), return_exceptions=True
        )
        assert all(isinstance(r, EmbedderError) for r in results), results
    finally:
        await memory.close()


async def test_the_engine_embeds_queries_on_the_embedders_query_twin(tmp_path: Path) -> None:
    """An embedder with a `query_embedder` (OnnxEmbedder(int8_queries=True)) gets memory
    contents; its twin gets the queries."""
    contents, queries = FakeEmbedder(), FakeEmbedder()
    contents.query_embedder = queries  # type: ignore[attr-defined]
    memory = await HierarchicalMemory.create(
        MemoryConfig(db_path=tmp_path / "m.db"), embedder=contents
    )
    try:
        await memory.add("I keep bees on the roof", user_id="u1")
        contents_calls = len(contents.calls)
        assert contents_calls >= 1
        queries.calls.clear()
        await memory.recall("bees", user_id="u1")
        assert [call for call in queries.calls if call == ["bees"]]
        assert len(contents.calls) == contents_calls
    finally:
        await memory.close()


async def test_queries_from_a_second_event_loop_are_answered_too(tmp_path: Path) -> None:
    """An engine used from another loop (a background loop in a thread) while this one asks too:
    each loop's queries go out from that loop and none is lost."""
    fake = FakeEmbedder()
    memory = await HierarchicalMemory.create(MemoryConfig(db_path=tmp_path / "m.db"), embedder=fake)
    try:
        async def both() -> list[np.ndarray]:
            return list(await asyncio.gather(*(memory.embed_query(f"other {i}") for i in range(3))))

        other = asyncio.get_running_loop().run_in_executor(None, asyncio.run, both())
        mine = await asyncio.gather(*(memory.embed_query(f"mine {i}") for i in range(3)))
        theirs = await asyncio.wait_for(other, 10)
        for i in range(3):
            np.testing.assert_array_equal(mine[i], FakeEmbedder().embed([f"mine {i}"])[0])
            np.testing.assert_array_equal(theirs[i], FakeEmbedder().embed([f"other {i}"])[0])
    finally:
        await memory.close()


async def test_a_recall_hands_its_query_to_the_model_before_any_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the user's common words are counted, recall reads nothing before its query leaves
    for the model, so the model call (no GIL) runs beside the BM25 search and the core tier's
    read instead of queueing behind their Python; and the common words cost no read at all."""
    memory = await HierarchicalMemory.create(
        MemoryConfig(db_path=tmp_path / "m.db"), embedder=FakeEmbedder()
    )
    try:
        for i in range(25):  # past `common_min_memories`, so the user has common words
            await memory.add(f"I keep bees on the roof of house {i}", user_id="u1")
        await memory.recall("bees on the roof", user_id="u1")  # counts them
        handed: list[str] = []
        executors = memory._executors
        record_submits(monkeypatch, executors._query_embedding, "query", handed)
        record_submits(monkeypatch, executors._readers, "read", handed)
        recalled = await memory.recall("where do I keep the bees", user_id="u1")
        assert recalled and all("bees" in m.content for m in recalled)
        # The query first; then BM25 (and, waiting for the vector in the same job, the
        # ranking) and the core tier beside it.
        assert handed == ["query", "read", "read"], handed
        handed.clear()
        again = await memory.recall("where do I keep the bees", user_id="u1")
        # A repeated query's vector comes from the cache on the loop: no thread hop for it.
        assert handed == ["read", "read"], handed
        assert [m.id for m in again] == [m.id for m in recalled]
    finally:
        await memory.close()


class _HeldQueries(FakeEmbedder):
    """Query embeddings wait for `release` once `hold` is set (memory contents do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = threading.Event()
        self.release = threading.Event()
        self.held = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.hold.is_set() and threading.current_thread().name.startswith(
            "headroom-query-embed"
        ):
            self.held += 1
            self.release.wait(timeout=30)
        return super().embed(texts)


async def _bees(tmp_path: Path, embedder: FakeEmbedder) -> HierarchicalMemory:
    memory = await HierarchicalMemory.create(
        MemoryConfig(db_path=tmp_path / "m.db"), embedder=embedder
    )
    for i in range(25):
        await memory.add(f"I keep bees on the roof of house {i}", user_id="u1")
    await memory.add("The bees make honey in May", user_id="u1", importance=0.9)
    await memory.add("My bike is red", user_id="u1")
    await memory.recall("bees on the roof", user_id="u1")  # counts the common words
    return memory


async def test_a_recall_ranks_the_same_when_the_bm25_rows_were_read_before_its_vector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the model is busy, the reader reads the BM25 hits' rows; the ranking reads the
    rest and weighs the two reads as one: the same list as a recall given its vector."""
    embedder = _HeldQueries()
    memory = await _bees(tmp_path, embedder)
    try:
        retrieval = memory._retrieval
        scope = Scope("u1", None, None, None)
        query = "where do the bees make honey"
        joins: list[int] = []
        join = CandidateRows.joined

        def spy(rows: CandidateRows, other: CandidateRows, rowids: Any) -> CandidateRows:
            joins.append(len(rows))
            return join(rows, other, rowids)

        monkeypatch.setattr(CandidateRows, "joined", spy)
        embedder.hold.set()
        pending = asyncio.ensure_future(retrieval.hybrid_search(query, scope, 10, None))
        while embedder.held == 0:  # the model holds the query: the reader is on its own
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)  # BM25 and its rows are read by now
        embedder.release.set()
        early = await pending
        assert len(joins) == 1 and joins[0] > 0  # the BM25 hits' rows came from the early read
        common = retrieval._common_terms(query, "u1", retrieval.preset)
        vector = await memory._executors.embed_query(drop_words(query, common))
        given = await retrieval.hybrid_search(query, scope, 10, None, query_vector=vector)
        assert len(joins) == 1  # a recall given its vector reads its rows at once
        assert [r.memory.id for r in early] == [r.memory.id for r in given]
        # (`now` differs by a few ms between the two: recency moves the scores by ~1e-9)
        assert [r.score for r in early] == pytest.approx([r.score for r in given], rel=1e-6)
        assert early[0].memory.content == "The bees make honey in May"
    finally:
        embedder.release.set()
        await memory.close()


async def test_a_slow_query_model_holds_no_reader(tmp_path: Path) -> None:
    """Recalls waiting for a slow model give their readers back: more of them than there are
    readers still leave other reads free, and each recall ranks once its vector comes."""
    embedder = _HeldQueries()
    memory = await _bees(tmp_path, embedder)
    try:
        readers = memory.config.reader_threads
        embedder.hold.set()
        recalls = [
            asyncio.ensure_future(memory.recall(f"bees question {i}", user_id="u1"))
            for i in range(readers + 2)
        ]
        while embedder.held == 0:
            await asyncio.sleep(0.001)
        # Every reader has searched and handed its wait back to the loop: a read runs now.
        flt = MemoryFilter(user_id="u1", min_importance=0.85)
        listed = await asyncio.wait_for(memory.query(flt), timeout=10)
        assert [m.content for m in listed] == ["The bees make honey in May"]
        assert not any(r.done() for r in recalls)  # all still wait for the model
        embedder.release.set()
        for recalled in await asyncio.gather(*recalls):
            assert recalled and any("bees" in m.content for m in recalled)
    finally:
        embedder.release.set()
        await memory.close()


async def test_a_recall_whose_queued_vector_is_cancelled_at_close_fails_as_a_recall(
    tmp_path: Path,
) -> None:
    """Closing cancels query embeddings the model has not started. A recall waiting on one gets
    an EmbedderError (the proxy sends its request on without memories), not a cancellation of
    its own task, which would drop the client's answer."""
    embedder = _HeldQueries()
    memory = await _bees(tmp_path, embedder)
    running: list[asyncio.Future[Any]] = []
    try:
        embedder.hold.set()
        # The model takes one query at a time; the others wait on its threads, and a query
        # beyond those threads waits in the pool's queue, which closing cancels.
        model_threads = memory._executors._query_embedding._max_workers
        for i in range(model_threads):
            running.append(asyncio.ensure_future(memory.recall(f"bees {i}", user_id="u1")))
        queued = asyncio.ensure_future(memory.recall("bees in line", user_id="u1"))
        await asyncio.sleep(0.5)  # every reader searched and handed its wait to the loop
        assert embedder.held == 1
        memory._executors.shutdown()  # what close() does to the model's queue
        with pytest.raises(EmbedderError, match="cancelled"):
            await asyncio.wait_for(queued, timeout=10)
        assert not queued.cancelled()
    finally:
        embedder.release.set()
        await asyncio.gather(*running, return_exceptions=True)  # their rankings find no readers
        await memory.close()
