"""The spec's code examples run as written (imports via `headroom.memory`), with the real local
model. The examples call `HierarchicalMemory.create(config)` with no embedder, so they wire the
product default themselves (MiniLM on ONNX Runtime, from the export the session already made);
the test written here passes the session's model in instead."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from headroom.memory.embedders import OnnxEmbedder
from headroom.memory.ports import Embedder


@pytest.mark.sqlite_only("checks the SQLite file the example names is created")
def test_advanced_usage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    local_embedder: OnnxEmbedder,
) -> None:
    monkeypatch.chdir(tmp_path)  # the example's relative db_path lands here
    out: dict[str, Any] = {}

    # --- the spec's "Advanced Usage: Direct HierarchicalMemory API", as written -------------
    import asyncio

    from headroom.memory import (
        EmbedderBackend,
        HierarchicalMemory,
        MemoryCategory,
        MemoryConfig,
    )
    from headroom.memory.ports import MemoryFilter, VectorFilter

    async def main():
        # Create with custom configuration
        config = MemoryConfig(
            db_path="my_memory.db",
            embedder_backend=EmbedderBackend.LOCAL,  # or OPENAI, OLLAMA
            vector_dimension=384,
            cache_max_size=2000,
        )
        memory = await HierarchicalMemory.create(config)

        # Add memory with full control
        mem = await memory.add(
            content="User prefers functional programming",
            user_id="alice",
            session_id="sess-123",
            agent_id="code-assistant",
            category=MemoryCategory.PREFERENCE,
            importance=0.9,
            entity_refs=["functional-programming", "coding-style"],
            metadata={"source": "conversation", "confidence": 0.95},
        )

        # Semantic search
        results = await memory.search(
            query="programming paradigm preferences",
            user_id="alice",
            top_k=5,
            min_similarity=0.5,
            categories=[MemoryCategory.PREFERENCE],
        )
        for r in results:
            print(f"[{r.similarity:.3f}] {r.memory.content}")

        # Full-text search
        text_results = await memory.text_search(
            query="functional",
            user_id="alice",
        )

        # Query with filters
        memories = await memory.query(MemoryFilter(
            user_id="alice",
            categories=[MemoryCategory.PREFERENCE, MemoryCategory.FACT],
            min_importance=0.7,
            limit=10,
        ))

        # Convenience methods
        await memory.remember("Likes coffee", user_id="alice", importance=0.6)
        relevant = await memory.recall("beverage preferences", user_id="alice")
        # ------------------------------------------------------------------------------------
        out.update(mem=mem, results=results, text_results=text_results, memories=memories,
                   relevant=relevant, memory=memory, VectorFilter=VectorFilter)
        await memory.close()

    asyncio.run(main())

    # the configured LOCAL backend is the product default: MiniLM on ONNX Runtime
    wired = out["memory"].embedder
    assert isinstance(wired, OnnxEmbedder) and wired is not local_embedder
    assert wired.model_id == "local:all-MiniLM-L6-v2"
    assert (tmp_path / "my_memory.db").exists()
    mem = out["mem"]
    assert out["memory"].cache.max_size == 2000
    assert out["memory"].vectors.dimension == 384
    # importance 0.9 is past the bubbling threshold: the preference holds in every session
    assert mem.scope_level.value == "user"
    assert mem.entity_refs == ["functional-programming", "coding-style"]
    assert mem.metadata == {"source": "conversation", "confidence": 0.95}
    assert [r.memory.id for r in out["results"]] == [mem.id]
    assert out["results"][0].similarity >= 0.5
    printed = capsys.readouterr().out
    assert "] User prefers functional programming" in printed
    assert [r.memory.id for r in out["text_results"]] == [mem.id]
    assert [m.id for m in out["memories"]] == [mem.id]
    # recall finds the coffee memory (it ranks second today: "preferences" stems to the same
    # FTS5 token as "prefers", and BM25's one hit outweighs the semantic match)
    assert "Likes coffee" in [m.content for m in out["relevant"]]
    assert out["VectorFilter"] is MemoryFilter


@pytest.mark.sqlite_only("checks the default SQLite file lands in the data directory")
def test_temporal_versioning(tmp_path: Path) -> None:
    from headroom.memory import HierarchicalMemory, MemoryCategory, MemoryFilter

    async def example() -> dict[str, Any]:
        # --- the spec's "Temporal Versioning (Supersession)", as written ----------------------
        memory = await HierarchicalMemory.create()

        # Original fact
        orig = await memory.add(
            content="User works at Google",
            user_id="alice",
            category=MemoryCategory.FACT,
        )

        # User changes jobs - supersede the old memory
        new = await memory.supersede(
            old_memory_id=orig.id,
            new_content="User now works at Anthropic",
        )

        # Query current state (excludes superseded)
        current = await memory.query(MemoryFilter(
            user_id="alice",
            include_superseded=False,  # Default
        ))
        # → Returns only "User now works at Anthropic"

        # Query full history (includes superseded)
        history = await memory.query(MemoryFilter(
            user_id="alice",
            include_superseded=True,
        ))
        # → Returns both memories with validity timestamps

        # Get the chain
        chain = await memory.get_history(new.id)
        # ------------------------------------------------------------------------------------
        db_path = Path(str(memory.config.db_path))
        model_id = memory.embedder.model_id
        await memory.close()
        return {"orig": orig, "new": new, "current": current, "history": history,
                "chain": chain, "db_path": db_path, "model_id": model_id}

    out = asyncio.run(example())
    # no db_path: the default data directory, which the test environment points into tmp_path
    assert out["db_path"].is_relative_to(tmp_path)
    assert out["model_id"] == "local:all-MiniLM-L6-v2"
    assert [m.content for m in out["current"]] == ["User now works at Anthropic"]
    assert sorted(m.content for m in out["history"]) == [
        "User now works at Anthropic", "User works at Google"
    ]
    assert all(m.valid_from is not None for m in out["history"])
    chain = out["chain"]
    assert [(m.content, m.is_current) for m in chain] == [
        ("User works at Google", False), ("User now works at Anthropic", True)
    ]
    assert chain[0].valid_until is not None and chain[0].valid_until == chain[1].valid_from
    assert chain[1].valid_until is None
    assert chain[0].superseded_by == out["new"].id and chain[1].supersedes == out["orig"].id


def test_go_preference_with_the_real_model(local_embedder: Embedder, tmp_path: Path) -> None:
    """The multi-session example's recall, with MiniLM: a question that shares no keyword
    with the stored preference still finds it from another session."""
    from headroom.memory import HierarchicalMemory, MemoryConfig, Scope, ScopeLevel
    from headroom.memory.models import AddOp, MemoryOps

    async def example() -> list:
        memory = await HierarchicalMemory.create(
            MemoryConfig(db_path=tmp_path / "m.db"), embedder=local_embedder
        )
        try:
            await memory.start()
            await memory.submit(
                MemoryOps(add=(
                    AddOp("Prefers Go for performance-critical code", scope=ScopeLevel.USER),
                    AddOp("Has a golden retriever named Biscuit", scope=ScopeLevel.USER),
                    AddOp("Is reading a novel about sailing", scope=ScopeLevel.USER),
                )),
                Scope("bob", "morning-session"),
            )
            await memory.drain(timeout=30)
            return await memory.recall(
                "What language for my new microservice?", "bob", "afternoon-session", top_k=1
            )
        finally:
            await memory.close()

    recalled = asyncio.run(example())
    assert [m.content for m in recalled] == ["Prefers Go for performance-critical code"]
