"""Restated or changed: the decision for two texts whose embeddings are near-duplicates.

Sentence embeddings place "phone number is 555-1234" and "phone number is 555-9876" almost on top
of each other (cosine ≥ 0.95), so the vector alone cannot tell a fact said again from a fact that
changed. This module compares what embeddings blur, and nothing else:

- numbers, with number words ("two", "thirty-four", "a dozen", "3rd") and thousands
  separators normalised;
- clock times ("10am", "10:00 a.m.", "15:00"; "at 7" matches "at 7am"), ISO dates, weekdays
  and months;
- parts of the day and relative days ("morning", "tomorrow", "weekend");
- proper names: capitalised words past a sentence's first word, all-caps or mixed-case words
  anywhere, and a sentence's first word when a verb such as "is" or a possessive follows it
  ("Alice is…", "Google's…"); a name the other text has in lower case is not a difference;
- e-mail addresses and URLs;
- negation ("not", "n't", "no longer", "never", "no", "without"…): polarity, not wording.

Anything else (case, punctuation, word order, filler words, their synonyms) is a restatement,
which is also where the rule is blind: a changed common word ("vegetarian" → "vegan") or a
swapped order ("Python over Java" → "Java over Python") reads as restated.
Pure functions, no I/O; the labelled pairs in tests/data/restated_vs_changed.jsonl measure it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["FactSignature", "is_changed_fact", "signature"]

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"')\]]+", re.IGNORECASE)
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b")
_TIME = re.compile(
    r"\b(\d{1,2})(?:[:.](\d{2}))?\s*([ap])\.?\s?m\b\.?|\b(\d{1,2}):(\d{2})\b", re.IGNORECASE
)
_THOUSANDS = re.compile(r"\b\d{1,3}(?:,\d{3})+\b")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_WORD = re.compile(r"[^\W\d_][\w'’-]*")
_SENTENCE_END = re.compile(r"[.!?]\s+|\n+")
_NEGATED_VERB = re.compile(r"n[’']t\b", re.IGNORECASE)

_CARDINALS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90,
}
_MULTIPLIERS = {"hundred": 100, "thousand": 1000, "million": 1_000_000, "billion": 10**9}
# Words that name a number alone, never part of a spelled-out one.
_NUMBER_WORDS = {
    "dozen": 12, "twice": 2, "once": 1, "first": 1, "second": 2, "third": 3, "fourth": 4,
    "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10, "half": 0.5,
    "single": 1, "double": 2, "triple": 3, "both": 2,
}
_ORDINAL_SUFFIX = re.compile(r"\b(\d+)(?:st|nd|rd|th)\b", re.IGNORECASE)

_WEEKDAYS = {
    "monday": "mon", "mon": "mon", "tuesday": "tue", "tue": "tue", "tues": "tue",
    "wednesday": "wed", "wed": "wed", "thursday": "thu", "thu": "thu", "thur": "thu",
    "thurs": "thu", "friday": "fri", "fri": "fri", "saturday": "sat", "sat": "sat",
    "sunday": "sun", "sun": "sun",
}
_MONTHS = {
    "january": 1, "jan": 1, "february": 2, "feb": 2, "march": 3, "mar": 3, "april": 4,
    "apr": 4, "may": 5, "june": 6, "jun": 6, "july": 7, "jul": 7, "august": 8, "aug": 8,
    "september": 9, "sep": 9, "sept": 9, "october": 10, "oct": 10, "november": 11, "nov": 11,
    "december": 12, "dec": 12,
}
# Words that are also ordinary English words count only when capitalised.
_CASE_SENSITIVE_CALENDAR = frozenset(
    {"mon", "tue", "wed", "sat", "sun", "mar", "may", "jan", "jun", "aug", "sep", "oct", "dec",
     "march", "august"}
)
_DAY_PARTS = {
    "morning": "morning", "mornings": "morning", "afternoon": "afternoon",
    "afternoons": "afternoon", "evening": "evening", "evenings": "evening", "night": "night",
    "nights": "night", "tonight": "tonight", "today": "today", "tomorrow": "tomorrow",
    "yesterday": "yesterday", "weekend": "weekend", "weekends": "weekend",
    "weekday": "weekday", "weekdays": "weekday", "noon": "noon", "midday": "noon",
    "midnight": "midnight",
}
_NEGATIONS = frozenset(
    {"not", "no", "never", "none", "nobody", "nothing", "nowhere", "neither", "nor",
     "without", "cannot", "nope", "non"}
)
# A sentence's first word is a subject (so possibly a name) when one of these follows it.
_SUBJECT_VERBS = frozenset(
    {"is", "was", "are", "were", "has", "had", "will", "would", "can", "could", "does", "did"}
)
# Closed-class words and the user's own role: never names, wherever they stand.
_NOT_NAMES = frozenset(
    {"i", "the", "a", "an", "he", "she", "they", "it", "this", "that", "these", "those", "we",
     "you", "my", "his", "her", "their", "our", "your", "its", "there", "here", "user",
     "users", "someone", "everyone", "nobody", "who", "what", "when", "where", "which",
     "and", "or", "but", "if", "so", "also", "now", "then", "previously", "currently",
     "formerly", "recently", "still", "ok", "okay", "yes", "no", "not"}
)


@dataclass(frozen=True)
class FactSignature:
    """What two restatements of one fact must share."""

    numbers: frozenset[float]
    times: frozenset[str]
    weekdays: frozenset[str]
    months: frozenset[int]
    day_parts: frozenset[str]
    names: frozenset[str]
    addresses: frozenset[str]
    negated: bool
    words: frozenset[str]  # every word, casefolded: lets a name match the other text's word


def _strip_possessive(word: str) -> str:
    for suffix in ("'s", "’s", "'", "’"):
        if word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def _clock(hour: int, minute: int, half: str | None) -> str:
    if half is not None:
        hour = hour % 12 + (12 if half.lower() == "p" else 0)
    return f"{hour:02d}:{minute:02d}"


def _spelled_number(parts: list[str]) -> float:
    """ "thirty-four" → 34, "two hundred fifty" → 250, "ten thousand" → 10000."""
    total = current = 0
    for part in parts:
        if part in _CARDINALS:
            current += _CARDINALS[part]
        elif part == "hundred":
            current = max(current, 1) * 100
        else:
            total += max(current, 1) * _MULTIPLIERS[part]
            current = 0
    return float(total + current)


def _number_parts(word: str) -> list[str] | None:
    """The number words of a token ("thirty-four" → [thirty, four]), None if it is not one."""
    parts = word.split("-")
    if all(p in _CARDINALS or p in _MULTIPLIERS for p in parts):
        return parts
    return None


def _is_name_shape(word: str) -> bool:
    """All caps (2+ letters) or a capital after the first letter: IBM, iPhone, McDonald."""
    letters = [c for c in word if c.isalpha()]
    return (len(letters) >= 2 and all(c.isupper() for c in letters)) or any(
        c.isupper() for c in word[1:]
    )


def signature(text: str) -> FactSignature:
    """The comparable parts of one text (see the module docstring)."""
    addresses = {m.group().casefold().rstrip("/.") for m in _EMAIL.finditer(text)}
    addresses |= {m.group().casefold().rstrip("/.") for m in _URL.finditer(text)}
    rest = _URL.sub(" ", _EMAIL.sub(" ", text))

    numbers: set[float] = set()
    months: set[int] = set()
    for m in _ISO_DATE.finditer(rest):
        numbers.update((float(m.group(1)), float(int(m.group(3)))))
        months.add(int(m.group(2)))
    rest = _ISO_DATE.sub(" ", rest)

    times: set[str] = set()
    for m in _TIME.finditer(rest):
        if m.group(1) is not None:
            times.add(_clock(int(m.group(1)), int(m.group(2) or 0), m.group(3)))
        else:
            times.add(_clock(int(m.group(4)), int(m.group(5)), None))
    rest = _TIME.sub(" ", rest)
    rest = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), rest)
    rest = _ORDINAL_SUFFIX.sub(r"\1", rest)
    numbers.update(float(n) for n in _NUMBER.findall(rest))

    weekdays: set[str] = set()
    day_parts: set[str] = set()
    names: set[str] = set()
    words: set[str] = set()
    negated = bool(_NEGATED_VERB.search(rest)) or "no longer" in rest.casefold()
    for sentence in _SENTENCE_END.split(rest):
        tokens = _WORD.findall(sentence)
        spelled: list[str] = []  # consecutive number words make one number
        for i, raw in enumerate(tokens):
            word = _strip_possessive(raw)
            folded = word.casefold()
            words.add(folded)
            parts = _number_parts(folded)
            if parts is not None:
                spelled += parts
                continue
            if spelled:
                numbers.add(_spelled_number(spelled))
                spelled = []
            if folded in _NEGATIONS or folded.startswith("non-"):
                negated = True
            if folded in _NUMBER_WORDS:
                numbers.add(float(_NUMBER_WORDS[folded]))
                continue
            capitalised = word[:1].isupper()
            calendar_ok = capitalised or folded not in _CASE_SENSITIVE_CALENDAR
            if folded in _WEEKDAYS and calendar_ok:
                weekdays.add(_WEEKDAYS[folded])
                continue
            if folded in _MONTHS and calendar_ok:
                months.add(_MONTHS[folded])
                continue
            if folded in _DAY_PARTS:
                day_parts.add(_DAY_PARTS[folded])
                continue
            if not capitalised or folded in _NOT_NAMES:
                continue
            if i > 0 or _is_name_shape(word):
                names.add(folded)
            elif raw != word or (
                i + 1 < len(tokens) and tokens[i + 1].casefold() in _SUBJECT_VERBS
            ):
                names.add(folded)  # "Alice is…", "Google's…": a subject, not a verb
        if spelled:
            numbers.add(_spelled_number(spelled))
    return FactSignature(
        numbers=frozenset(numbers), times=frozenset(times), weekdays=frozenset(weekdays),
        months=frozenset(months), day_parts=frozenset(day_parts), names=frozenset(names),
        addresses=frozenset(addresses), negated=negated, words=frozenset(words),
    )


def is_changed_fact(old: str, new: str) -> bool:
    """True when `new` states a different fact from `old` (a number, time, date, weekday or
    month, name, address or negation differs); False when it only restates it."""
    a, b = signature(old), signature(new)
    # "at 7" and "at 7am" agree: a clock time also counts as its hour (and minutes) among the
    # numbers, and clock times are compared as such only when both texts have one.
    if _with_clock_parts(a) != _with_clock_parts(b) or (a.times and b.times and a.times != b.times):
        return True
    if (a.weekdays, a.months, a.day_parts, a.addresses, a.negated) != (
        b.weekdays, b.months, b.day_parts, b.addresses, b.negated
    ):
        return True
    # A name in one text that the other has only in lower case ("paris") is the same name.
    return bool((a.names - b.words) or (b.names - a.words))


def _with_clock_parts(sig: FactSignature) -> frozenset[float]:
    parts: set[float] = set(sig.numbers)
    for clock in sig.times:
        hour, minute = (int(x) for x in clock.split(":"))
        parts.add(float(hour))
        if minute:
            parts.add(float(minute))
    return frozenset(parts)
