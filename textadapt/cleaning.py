"""Turn a raw LLM answer into a training description, or say why it is rejected.

Rejected answers are stored with their reason (``generations.rejected``) and never trained on.
"""

from __future__ import annotations

import re

REFUSALS = re.compile(
    r"^(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i'?m not able|i am not able|as an ai|i don'?t have|i do not have|"
    r"unfortunately, i|i'?m happy to|i'?d be happy to|i'?d be glad to|i'?m here to help)",
    re.I,
)
MARKUP = re.compile(r"(\*\*|__|^#+\s*)")
LEADING_JUNK = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d+[.)]|[a-z][.)](?=\s))\s*", re.I)
QUOTES = "\"'\u201c\u201d\u2018\u2019`"


def clean(raw: str | None) -> tuple[str | None, str | None]:
    """(description, None) for a usable answer, (None, reason) for a rejected one."""
    if raw is None:
        return None, "no answer"
    text = MARKUP.sub("", " ".join(raw.split()))
    text = LEADING_JUNK.sub("", text)
    text = text.strip().strip(QUOTES).strip()
    if text.lower().startswith(("caption:", "description:", "answer:")):
        text = text.split(":", 1)[1].strip().strip(QUOTES).strip()
    if not text or not any(ch.isalnum() for ch in text):
        return None, "empty"
    if REFUSALS.match(text):
        return None, "refusal"
    if len(text.split()) < 3:
        return None, "too short"
    return text, None
