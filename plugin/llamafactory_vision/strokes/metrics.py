"""Draw&Guess answer matching: exact match and a normalised accuracy (articles, plurals, user synonyms)."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Mapping
from pathlib import Path

ARTICLES = frozenset({"a", "an", "the"})
# Trailing characters dropped before any comparison: whitespace, end punctuation and closing quotes.
_END_PUNCTUATION = ".,!?;:\"'`)]}" + string.whitespace
_IRREGULAR_PLURALS = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse", "geese": "goose",
    "teeth": "tooth", "feet": "foot", "leaves": "leaf", "knives": "knife", "wolves": "wolf", "fish": "fish",
    "sheep": "sheep", "deer": "deer",
}  # fmt: skip
_KEEP_S = ("ss", "us", "is")  # glass, bus, cactus, axis: not plurals of something shorter


def strip_answer(text: str) -> str:
    """Trim whitespace and end punctuation and lowercase: the ``exact_match`` comparison form."""
    return text.strip().rstrip(_END_PUNCTUATION).strip().lower()


def singular(word: str) -> str:
    """A conservative English singular: irregular table, -ies -> -y, -(s|x|z|ch|sh)es -> stem, -s -> stem."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(_KEEP_S):
        return word[:-1]
    return word


def normalize_answer(text: str) -> str:
    """The ``accuracy`` comparison form: stripped, lowercased, punctuation to spaces, articles dropped, each word
    singular."""
    words = re.sub(r"[^\w\s-]", " ", strip_answer(text)).split()
    return " ".join(singular(w) for w in words if w not in ARTICLES)


def load_synonyms(path: str | Path) -> dict[str, str]:
    """Read a synonyms file: JSON, either a list of groups (``[["car", "automobile"], ...]``) or an object mapping a
    canonical answer to its synonyms (``{"car": ["automobile", "auto"]}``). Returns normalised term -> canonical.

    Raises TypeError (not a list or object) or ValueError (bad group, term in two groups) naming file and entry.
    """
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(raw, Mapping):
        groups = [[key, *values] for key, values in raw.items()]
    elif isinstance(raw, list):
        groups = raw
    else:
        raise TypeError(f"{path}: expected a JSON list of groups or an object, got {type(raw).__name__}")
    table: dict[str, str] = {}
    for i, group in enumerate(groups):
        if not isinstance(group, list) or not group or not all(isinstance(t, str) for t in group):
            raise ValueError(f"{path}: group {i} must be a non-empty list of strings, got {group!r}")
        canonical = normalize_answer(group[0])
        for term in group:
            key = normalize_answer(term)
            if table.get(key, canonical) != canonical:
                raise ValueError(f"{path}: {term!r} is in two synonym groups ({table[key]!r} and {canonical!r})")
            table[key] = canonical
    return table


def canonical_answer(text: str, synonyms: Mapping[str, str] | None = None) -> str:
    key = normalize_answer(text)
    return (synonyms or {}).get(key, key)


def is_exact(predict: str, label: str) -> bool:
    return strip_answer(predict) == strip_answer(label)


def is_accurate(predict: str, label: str, synonyms: Mapping[str, str] | None = None) -> bool:
    return canonical_answer(predict, synonyms) == canonical_answer(label, synonyms)


def guess_scores(pairs: Iterable[tuple[str, str]], synonyms: Mapping[str, str] | None = None) -> dict[str, float]:
    """``n``, ``exact_match`` and ``accuracy`` (fractions in [0, 1]; 0.0 when there are no pairs) over
    ``(predict, label)`` pairs."""
    n = exact = accurate = 0
    for predict, label in pairs:
        n += 1
        exact += is_exact(predict, label)
        accurate += is_accurate(predict, label, synonyms)
    return {"n": n, "exact_match": exact / n if n else 0.0, "accuracy": accurate / n if n else 0.0}
