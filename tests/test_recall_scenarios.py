"""Recall on hand-built fact sets, shaped like what the proxy stores: short facts a model wrote in
`<memory>` blocks, with the importance it gave them, asked with an everyday request.

Every scenario runs the real local embedder (MiniLM on ONNX Runtime) through
`HierarchicalMemory.recall` with the proxy's top_k of 5 and the default configuration. Each one
failed on the previous default (the learned ranker fitted on chat turns: length prior above the
cosine, neighbours lifting facts of one block, importance and recency worth ~0.01, "in August"
read as last August); see bench/RESULTS.md "Recall for what the proxy stores".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from headroom.memory import HierarchicalMemory, MemoryConfig
from headroom.memory.models import MemoryCategory, MemoryDraft

NOW = datetime(2026, 7, 10, 18, 0, tzinfo=UTC)
TOP_K = 5  # what the proxy asks for


@dataclass(frozen=True)
class Fact:
    text: str
    importance: float = 0.5
    days_ago: float = 30.0  # facts with the same days_ago were written in one block
    category: MemoryCategory = MemoryCategory.FACT


# What a model would have written about one user over a few months: the distractors every
# scenario's own facts sit among.
LIFE = (
    Fact("Has a golden retriever named Biscuit who needs a walk every evening", 0.4, 120),
    Fact("Lives with a partner who works night shifts at the hospital", 0.5, 120),
    Fact("Is learning to play the piano and practises on Sunday mornings", 0.4, 90),
    Fact("Commutes to the office by bike, about twenty minutes each way", 0.3, 90),
    Fact("Enjoys science fiction novels, especially ones about space travel", 0.4, 60),
    Fact("Recently repainted the living room a pale shade of blue", 0.2, 45),
    Fact("Supports the local football club and watches most of its matches", 0.3, 20),
    Fact("Finds early morning meetings hard and prefers to start work at ten", 0.4, 10),
)


@dataclass(frozen=True)
class Scenario:
    name: str
    facts: tuple[Fact, ...]
    query: str
    # Each must be among the memories recall returns.
    present: tuple[str, ...] = ()
    # ... among the first `within` of them (None: anywhere in what recall returns, which the
    # proxy injects whole: the ranked top 5, then the core tier).
    within: int | None = None
    # (better, worse): `better` must come before `worse` (or `worse` not be returned at all).
    before: tuple[tuple[str, str], ...] = ()
    with_life: bool = True
    now: datetime = field(default=NOW)
    # False only where what failed is no longer reproducible by a preset (the date rules).
    failed_before: bool = True


SCENARIOS = (
    Scenario(
        "diet and allergy for a cooking request",
        (Fact("Is vegetarian", 0.9, 200), Fact("Allergic to peanuts", 0.95, 200)),
        "What should I cook for dinner tonight?",
        present=("Is vegetarian", "Allergic to peanuts"),
    ),
    Scenario(
        "diet and allergy for a recipe",
        (Fact("Is vegetarian", 0.9, 150), Fact("Allergic to peanuts", 0.95, 150)),
        "Suggest a recipe for me",
        present=("Is vegetarian", "Allergic to peanuts"),
        within=2,
    ),
    Scenario(
        "the user's stack for a tech question",
        (
            Fact("Prefers Go for backend services", 0.8, 60),
            Fact("Has two kids", 0.6, 60),
            Fact("Deploys everything on Kubernetes with PostgreSQL as the main database", 0.7, 40),
        ),
        "Which language should I write my new API server in?",
        before=(("Prefers Go for backend services", "Has two kids"),),
        present=("Prefers Go for backend services",
                 "Deploys everything on Kubernetes with PostgreSQL as the main database"),
        within=2,
    ),
    Scenario(
        "a relative's name for a gift",
        (Fact("Dad, Tom, collects vinyl records", 0.8, 80),),
        "I need a Father's Day present, any ideas?",
        present=("Dad, Tom, collects vinyl records",),
        within=1,
    ),
    Scenario(
        "a newer fact over a superseded one",
        (Fact("Lives in Manchester", 0.7, 500), Fact("Lives in Berlin", 0.7, 7)),
        "Which city do I live in?",
        before=(("Lives in Berlin", "Lives in Manchester"),),
    ),
    Scenario(
        "a health condition for a plan",
        (Fact("Has a knee injury and cannot run or jump", 0.9, 300),),
        "Make me a weekly workout plan",
        present=("Has a knee injury and cannot run or jump",),
    ),
    Scenario(
        "a hard constraint for a trip",
        (Fact("Uses a wheelchair", 0.95, 400),),
        "Plan a weekend trip to Lisbon for me",
        present=("Uses a wheelchair",),
    ),
    Scenario(
        "identity for a bio",
        (Fact("Name is Sam Rivera", 0.9, 365, MemoryCategory.ENTITY),),
        "Write a two-line introduction of me for the conference website",
        present=("Name is Sam Rivera",),
    ),
    Scenario(
        "importance decides between equally relevant facts",
        (
            Fact("Likes jazz music", 0.3, 30),
            Fact("Likes soul music", 0.9, 30),
        ),
        "Recommend an album for me to listen to",
        before=(("Likes soul music", "Likes jazz music"),),
    ),
    Scenario(
        "a fact is not lifted by its block",
        (
            Fact("Is training for a marathon and runs four times a week", 0.6, 15),
            Fact("Has a cat named Miso who sleeps on the sofa most of the day", 0.6, 15),
            Fact("Favourite colour is green, and the flat is full of plants", 0.6, 15),
            Fact("Goes swimming on Tuesdays", 0.5, 100),
        ),
        "How should I plan my running schedule for the next few weeks?",
        before=(
            ("Goes swimming on Tuesdays",
             "Has a cat named Miso who sleeps on the sofa most of the day"),
            ("Goes swimming on Tuesdays",
             "Favourite colour is green, and the flat is full of plants"),
        ),
    ),
    Scenario(
        "a month ahead is not last year's",
        (
            Fact("Is planning a hiking trip in the Alps in August", 0.6, 20),
            Fact("Went on a hiking trip in Scotland", 0.5, 340),
            Fact("Visited a friend in Porto", 0.5, 340),
        ),
        "What should I pack for my hiking trip in August?",
        failed_before=False,
        before=(("Is planning a hiking trip in the Alps in August",
                 "Went on a hiking trip in Scotland"),),
    ),
    Scenario(
        "a short relevant fact over long irrelevant ones",
        (Fact("Is vegan", 0.6, 200),),
        "What should I order at the steakhouse tonight?",
        present=("Is vegan",),
        within=2,
    ),
    Scenario(
        "a fear for a booking",
        (Fact("Afraid of flying", 0.6, 200),),
        "Book me a flight to Rome",
        present=("Afraid of flying",),
        within=1,
    ),
    Scenario(
        "a deadline for scheduling",
        (Fact("Must submit the thesis by 30 September", 0.9, 50),),
        "Help me plan my weekends for the next two months",
        present=("Must submit the thesis by 30 September",),
    ),
)


async def recalled(
    tmp_path: Path, embedder: Any, scenario: Scenario, **config: Any
) -> list[str]:
    """The contents recall returns for the scenario's query, on a fresh database."""
    mem = await HierarchicalMemory.create(
        MemoryConfig(db_path=tmp_path / "s.db", **config), embedder=embedder
    )
    try:
        facts = (*LIFE, *scenario.facts) if scenario.with_life else scenario.facts
        # Oldest block first, the facts of a block seconds apart, as the writer applies one.
        drafts = [
            MemoryDraft(
                fact.text, user_id="u", category=fact.category, importance=fact.importance,
                created_at=(when := scenario.now - timedelta(days=fact.days_ago, seconds=-j)),
                valid_from=when, dedup=False,
            )
            for j, fact in enumerate(sorted(facts, key=lambda f: -f.days_ago))
        ]
        await mem.add_many(drafts)
        found = await mem.recall(
            scenario.query, user_id="u", top_k=TOP_K, now=scenario.now, touch=False
        )
        return [m.content for m in found]
    finally:
        await mem.close()


def failures(scenario: Scenario, got: list[str]) -> list[str]:
    """What `got` (recall's answer) misses of the scenario's expectations."""
    out = [
        f"{text!r} not in the first {scenario.within or len(got)}"
        for text in scenario.present if text not in got[: scenario.within]
    ]
    for better, worse in scenario.before:
        if better not in got:
            out.append(f"{better!r} missing")
        elif worse in got and got.index(worse) < got.index(better):
            out.append(f"{worse!r} above {better!r}")
    return out


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_scenario(tmp_path: Path, local_embedder: Any, scenario: Scenario) -> None:
    got = await recalled(tmp_path, local_embedder, scenario)
    assert failures(scenario, got) == [], got


# The previous default: the turn-fitted ranker (kept as the `learned-turns` preset), no core
# tier. The month scenario is left out: the date rules changed for every preset (it failed
# before that change, see the module docstring).
BEFORE = {"recall_preset": "learned-turns", "recall_core_tokens": 0}


@pytest.mark.parametrize(
    "scenario", [s for s in SCENARIOS if s.failed_before],
    ids=[s.name for s in SCENARIOS if s.failed_before],
)
async def test_scenario_failed_under_the_previous_default(
    tmp_path: Path, local_embedder: Any, scenario: Scenario
) -> None:
    got = await recalled(tmp_path, local_embedder, scenario, **BEFORE)
    assert failures(scenario, got) != [], got


def test_there_are_at_least_twelve_scenarios() -> None:
    assert len(SCENARIOS) >= 12
