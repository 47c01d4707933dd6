"""Months and dates named in a question (memory.recall.query_windows): a time still ahead, or a
month the question leaves open, is never read as one in the past."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from headroom.memory.recall import month_year, query_tense, query_windows, strip_spans

JULY = datetime(2026, 7, 10, 18, 0, tzinfo=UTC)


def window_of(query: str, now: datetime = JULY) -> tuple[str, str] | None:
    windows = query_windows(query, now)
    if not windows:
        return None
    (w,) = windows
    return w.start.date().isoformat(), w.end.date().isoformat()


@pytest.mark.parametrize(
    "query",
    [
        "What should I pack for my hiking trip in August?",  # asked in July: this August
        "I'm going to Spain in September, any tips?",
        "We will move in December",
        "Remind me what I planned for the wedding in October",
        "Any ideas for my holiday in August?",
    ],
)
def test_a_month_ahead_gives_no_window(query: str) -> None:
    assert window_of(query) is None


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("What did I do in August?", ("2025-08-01", "2025-09-01")),  # past tense: last August
        ("How was the trip in last August?", ("2025-08-01", "2025-09-01")),
        ("Where did we go in March?", ("2026-03-01", "2026-04-01")),  # past, earlier this year
        ("What happened in March?", ("2026-03-01", "2026-04-01")),
        ("Anything for the party in July?", ("2026-07-01", "2026-08-01")),  # this month
        ("What did I buy in this June?", ("2026-06-01", "2026-07-01")),
    ],
)
def test_a_month_that_has_begun_is_read_as_such(query: str, expected: tuple[str, str]) -> None:
    assert window_of(query) == expected


def test_a_month_earlier_in_the_year_spoken_of_as_ahead_is_next_years() -> None:
    # "in March" asked in July with "will": next March, which holds no memories yet.
    assert window_of("Where will we be in March?") is None


def test_a_dated_month_or_day_in_the_future_gives_no_window() -> None:
    assert window_of("the conference in August 2027") is None
    assert window_of("book the flight on 3 March, 2030") is None
    assert window_of("the conference in August 2025") == ("2025-08-01", "2025-09-01")


def test_words_of_a_time_ahead_stay_in_the_text_search() -> None:
    query = "What should I pack for my hiking trip in August?"
    assert strip_spans(query, query_windows(query, JULY)) == query


@pytest.mark.parametrize(
    ("query", "tense"),
    [
        ("I'll visit Rome in May", "future"),
        ("We're planning a trip", "future"),
        ("What is on next week?", "future"),
        ("What did she say?", "past"),
        ("We went to Rome", "past"),
        ("Suggest a recipe", "unknown"),
    ],
)
def test_query_tense(query: str, tense: str) -> None:
    assert query_tense(query) == tense


def test_month_year_rules() -> None:
    assert month_year("in", 8, JULY, "unknown") is None
    assert month_year("in", 8, JULY, "future") is None
    assert month_year("in", 8, JULY, "past") == 2025
    assert month_year("last", 7, JULY, "unknown") == 2025  # "last July" in July: a year ago
    assert month_year("last", 6, JULY, "unknown") == 2026
    assert month_year("this", 8, JULY, "unknown") is None
    assert month_year("in", 3, JULY, "unknown") == 2026
    assert month_year("in", 3, JULY, "future") is None
