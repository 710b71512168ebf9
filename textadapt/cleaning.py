"""Turn a raw LLM answer into training descriptions, or say why it is rejected.

``clean(raw, parse)`` follows the template's ``parse`` mode:

- ``sentence``: one description; list markers, quotes and markup are stripped, and where the
  answer holds several sentences only the first is kept (the templates ask for one);
- ``list``: one descriptor per line, or JSON (``{"items": [...]}`` where the backend was asked for a JSON
  schema, a bare list, or a JSON answer cut short at max_tokens: its complete strings); each item is
  cleaned like a sentence;
- ``questions``: question templates with ``{}`` where the class goes (meta-prompting); the class
  is put in with its article ("a shirt", "an ankle boot").

Characters that are not text (U+FFFD where a server sent bytes that are not UTF-8, lone surrogates)
are dropped; a description longer than ``MAX_DESCRIPTION_CHARS`` is rejected as ``too long``.
Several items are returned joined by newlines (``generations.description``; the ``descriptions``
view has one row per item). Rejected answers are stored with their reason and never trained on.
Duplicates are not decided here: whether a text repeats another depends on what else a run uses,
so ``pipeline.training_sets`` marks them per run (``run_generations.excluded``).
"""

from __future__ import annotations

import json
import re

REFUSALS = re.compile(
    r"^(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i'?m not able|i am not able|as an ai|i don'?t have|i do not have|"
    r"unfortunately, i|i'?m happy to|i'?d be happy to|i'?d be glad to|i'?m here to help)",
    re.I,
)
MARKUP = re.compile(r"(\*\*|__|^#+\s*)")
LEADING_JUNK = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d+[.)]|[a-z][.)](?=\s))\s*", re.I)
LABEL = re.compile(r"^(caption|description|answer|question)\s*\d*\s*:\s*", re.I)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
QUOTES = "\"'\u201c\u201d\u2018\u2019`"
NOT_TEXT = re.compile("[\ufffd\ud800-\udfff]")  # undecodable bytes (U+FFFD) and lone surrogates from broken escapes
MAX_DESCRIPTION_CHARS = 1_000  # a longer "sentence" is a runaway answer, not a description (CLIP reads 77 tokens)
MAX_RAW_CHARS = 20_000  # the most of an answer the cache keeps (max_tokens keeps real answers far below it)
CLASS_SLOT = re.compile(r"\{\{?\s*(class_name|class|c|category|x)?\s*\}?\}|\[(class|class name|category)\]", re.I)


def stored_raw(raw: str) -> str:
    """An answer as ``generations.raw_text`` keeps it: lone surrogates (which no database can store) as
    U+FFFD, and at most ``MAX_RAW_CHARS`` characters, a longer answer cut with a note of its length."""
    text = re.sub("[\ud800-\udfff]", "\ufffd", raw)
    if len(text) > MAX_RAW_CHARS:
        text = f"{text[:MAX_RAW_CHARS]} [... cut: {len(text):,} characters in all]"
    return text


def _tidy(text: str) -> str:
    text = MARKUP.sub("", " ".join(NOT_TEXT.sub("", text).split()))
    text = LEADING_JUNK.sub("", text).strip().strip(QUOTES).strip()
    text = LABEL.sub("", text).strip().strip(QUOTES).strip()
    return text


def _sentence(raw: str) -> tuple[str | None, str | None]:
    text = _tidy(raw)
    if not text or not any(ch.isalnum() for ch in text):
        return None, "empty"
    if REFUSALS.match(text):
        return None, "refusal"
    text = SENTENCE_END.split(text, maxsplit=1)[0]
    if len(text.split()) < 3:
        return None, "too short"
    if len(text) > MAX_DESCRIPTION_CHARS:
        return None, "too long"
    return text, None


JSON_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"(?!\s*:)')  # a complete JSON string that is not an object's key


def _json_items(raw: str) -> list[str] | None:
    """The items of a JSON answer: ``{"items": [...]}`` (what a JSON schema asks for), a bare list, or any
    object holding a list; of one cut short at max_tokens, its complete strings. None: not JSON."""
    text = raw.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    if not text.startswith(("{", "[")):
        return None
    try:
        parsed = json.loads(text)
    except ValueError:  # cut short (or broken): the complete strings of its list
        start = text.find("[")
        items = []
        for m in JSON_STRING.finditer(text, start if start >= 0 else len(text)):
            try:
                items.append(json.loads(m.group(0)))
            except ValueError:
                pass
        return items
    if isinstance(parsed, dict):
        parsed = next((v for v in parsed.values() if isinstance(v, list)), [])
    return [str(x) for x in parsed] if isinstance(parsed, list) else None


def _items(raw: str) -> list[str]:
    """The items of a list answer: JSON (structured output, or a model that wrote JSON), else one per line."""
    lines = _json_items(raw)
    if lines is None:
        lines = raw.splitlines()
    items, seen = [], set()
    for line in lines:
        item = _tidy(line).rstrip(",;")
        key = item.lower().rstrip(".")
        if (
            item
            and any(ch.isalnum() for ch in item)
            and not REFUSALS.match(item)
            and key not in seen
            and not item.endswith(":")
            and len(item) <= MAX_DESCRIPTION_CHARS
        ):
            seen.add(key)
            items.append(item)
    return items


def _slot(question: str, category: str) -> str:
    """Mark where the class goes with a bare {}: the LLM's own slot, else the dataset's category noun."""
    q = CLASS_SLOT.sub("{}", question)
    if "{}" not in q and category:
        words = [category] + [w for w in category.split() if len(w) > 3]
        for w in words:
            q, n = re.subn(rf"\b(?:(?:a|an|the|this|that|your|one)\s+)?{re.escape(w)}s?\b", "{}", q, count=1, flags=re.I)
            if n:
                break
    return re.sub(r"\b(?:a|an|the)\s+\{\}", "{}", q, flags=re.I)


def clean(raw: str | None, parse: str = "sentence", category: str = "") -> tuple[str | None, str | None]:
    """(description, None) for a usable answer, (None, reason) for a rejected one.

    ``category`` (questions only): the dataset's category noun, taken as the class slot where the
    LLM wrote no ``{}``.
    """
    if raw is None:
        return None, "no answer"
    if parse == "sentence":
        return _sentence(raw)
    if parse == "list":
        items = _items(raw)
        return ("\n".join(items), None) if items else (None, "no items")
    if parse == "questions":
        questions = [_slot(q, category) for q in _items(raw)]
        questions = [q for q in questions if q.count("{}") == 1 and len(q.split()) >= 3]
        return ("\n".join(questions), None) if questions else (None, "no questions with a {} class slot")
    raise ValueError(f"unknown parse mode {parse!r}")
