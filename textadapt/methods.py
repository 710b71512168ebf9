"""The methods a run may ask for, by name: ``--methods`` and ``--scoring`` parsed without importing torch.

Names are data, apart from the code that trains them (as open_clip keeps name parsing apart from model
building): the CLI checks a run's options with this module before Prefect or torch is imported, and the
harness (``harness.py``) trains what it returns.
"""

from __future__ import annotations

from textadapt import TextadaptError
from textadapt.scoring import SCORINGS

HEADS = ("tap-head", "zs-head", "tap-residual", "taskres")  # trained on text embeddings alone (adapters.py)
PROMPTED = ("tap-coop", "protext")  # prompt learners: they run the text tower (prompt_learning.py)
ALL_ADAPTERS = (*HEADS, *PROMPTED)
LOSSES = ("ce", "ot")  # what ``+LOSS`` may name: ce, the adapter's own recipe loss (the default); ot, OTTER's soft labels
OWN_LOSS = {"protext": "l1"}  # an adapter's own loss, as stored in results.loss, where it is not a cross-entropy
NO_OT = ("protext",)  # adapters without logits to put soft labels on
ALIASES = {"tap": "tap-head", "residual": "tap-residual", "prompt": "tap-coop"}  # short and old names


def parse_methods(items: list[str]) -> list[tuple[str, str]]:
    """``["all"]`` or items ``ADAPTER[+LOSS]`` (ALIASES accepted) -> (adapter, loss) pairs, loss as stored in results."""
    out: list[tuple[str, str]] = []
    for item in items:
        item = item.strip()
        if item == "all":
            out += parse_methods([m for a in ALL_ADAPTERS for m in ([a] if a in NO_OT else [a, f"{a}+ot"])])
            continue
        adapter, _, loss = item.partition("+")
        adapter = ALIASES.get(adapter, adapter)
        loss = loss or "ce"
        if adapter not in ALL_ADAPTERS:
            raise TextadaptError(f"--methods: unknown adapter {adapter!r} in {item!r}; known: {', '.join(ALL_ADAPTERS)}, or all")
        if loss not in LOSSES:
            raise TextadaptError(f"--methods: unknown loss {loss!r} in {item!r}; known: {', '.join(LOSSES)}")
        if loss == "ot" and adapter in NO_OT:
            raise TextadaptError(
                f"--methods: {item!r}: {adapter} pulls prompted class embeddings towards the descriptions "
                f"(an L1 loss, no logits), so OTTER's soft labels do not apply; use {adapter}"
            )
        out.append((adapter, OWN_LOSS.get(adapter, "ce") if loss == "ce" else loss))
    return list(dict.fromkeys(out).keys())


def parse_scorings(items: list[str]) -> list[str]:
    scorings = list(SCORINGS) if "all" in items else list(dict.fromkeys(items))
    for s in scorings:
        if s not in SCORINGS:
            raise TextadaptError(f"--scoring: unknown scoring {s!r}; known: {', '.join(SCORINGS)}, or all")
    return scorings


def method_name(adapter: str, loss: str, text_set: str) -> str:
    """``ADAPTER:SET``, or ``ADAPTER+ot:SET`` with OTTER's soft labels; the adapter's canonical name, never an alias."""
    return f"{adapter}{'+ot' if loss == 'ot' else ''}:{text_set}"
