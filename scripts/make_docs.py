"""Write the pages of docs/ that restate code, or check that each is what the code says today.

    python scripts/make_docs.py            # rewrite them (make docs)
    python scripts/make_docs.py --check    # exit 1 naming every page that is out of date

tests/test_docs.py runs the check, so CI fails while a page is stale. Each page in ``GENERATED`` has one
generator: a function from the page's current text to the text it should have. A whole generated page
ignores its current text; a page with hand-written prose around a generated part replaces that part only.
"""

from __future__ import annotations

import os
import sys
import typing
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]  # this checkout's textadapt, and the other generators beside this file

import make_options_doc  # noqa: E402
import schema_doc  # noqa: E402

FAKE_HOME = Path("/nonexistent-home")  # factories run under it, so the page says ~/... whoever writes it


@contextmanager
def _plain_environment():
    """Defaults as a user without TEXTADAPT_*, OPENAI_* or XDG_DATA_HOME gets them (a factory may read them)."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(("TEXTADAPT_", "OPENAI_")) or name == "XDG_DATA_HOME":
            del os.environ[name]
    os.environ["HOME"] = str(FAKE_HOME)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _shown(value) -> str:
    """A default as a reader wants it: paths as ~/... or relative to the checkout, JSON-ish containers, unset for None."""
    if value is None:
        return "unset"
    if isinstance(value, Path):
        if value.is_relative_to(FAKE_HOME):
            return f"`~/{value.relative_to(FAKE_HOME)}`"
        if value.is_relative_to(REPO):
            return f"`{value.relative_to(REPO)}/` (shipped with textadapt)"
        return f"`{value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, dict)) and not value:
        return f"`{'[]' if isinstance(value, list) else '{}'}`"
    return f"`{value}`"


def _type(annotation) -> str:
    """make_options_doc's type names, and what an environment variable must hold for a list, a dict or a secret."""
    origin = typing.get_origin(annotation)
    if origin is dict:
        return "JSON object"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is list:
        text = f"JSON list of {make_options_doc.type_name(args[0])}"
    elif len(args) == 1 and getattr(args[0], "__name__", "") == "SecretStr":
        text = "str (secret) or unset"
    else:
        text = make_options_doc.type_name(annotation)
    return text.replace("Path", "path")


def settings_markdown() -> str:
    """docs/settings.md: one row per ``Settings`` field, its environment variable, type, default and description."""
    from pydantic_core import PydanticUndefined

    from textadapt.config import Settings

    prefix = Settings.model_config["env_prefix"]
    lines = [
        "# Settings",
        "",
        "<!-- Written by scripts/make_docs.py from textadapt/config.py (Settings); do not edit by hand. -->",
        "",
        "`textadapt.config.Settings` holds where textadapt keeps things and what a run uses unless it says",
        "otherwise. Each setting comes from, first to last: its environment variable, the TOML file",
        "`$TEXTADAPT_HOME/config.toml` (or the file `TEXTADAPT_CONFIG` names; keys are the setting names,",
        "e.g. `llm_concurrency = 16`), then the default below. A run's own options (flags of `textadapt run`,",
        "[options.md](options.md)) sit on top; `textadapt --home DIR` and `--db FILE` set `TEXTADAPT_HOME` and",
        "`TEXTADAPT_DB` for one command. Lists and objects in an environment variable are JSON",
        "(`TEXTADAPT_DATASETS_DIRS='[\"/data/specs\"]'`). A key of the config file that is no setting is an error; an",
        "unknown `TEXTADAPT_*` variable is ignored (`TEXTADAPT_CONFIG` names the file; it is no setting).",
        "How the LLM settings are used: [configuration.md](configuration.md).",
        "",
        "| setting | environment variable | type | default | what it does |",
        "|---|---|---|---|---|",
    ]
    with _plain_environment():
        for name, field in Settings.model_fields.items():
            if field.default is not PydanticUndefined:
                default = _shown(field.default)
            else:
                default = _shown(field.default_factory())
            constraints = "".join(
                f", {op} {getattr(c, attr)}"
                for c in field.metadata
                for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                if hasattr(c, attr)
            )
            description = (field.description or "").replace("|", "\\|")
            lines.append(
                f"| `{name}` | `{prefix}{name.upper()}` | {_type(field.annotation)}{constraints} | {default} | {description} |"
            )
    return "\n".join(lines) + "\n"


# Every generated page of docs/, relative to the repository root, and its generator (current text -> new text).
GENERATED: dict[str, Callable[[str], str]] = {
    "docs/options.md": lambda _current: make_options_doc.options_markdown(),
    "docs/settings.md": lambda _current: settings_markdown(),
    "docs/schema.md": schema_doc.updated,  # the tables and views, between its markers; the prose is hand-written
}


def stale() -> list[str]:
    """The generated pages whose committed text is not what their generator writes."""
    return [
        page
        for page, make in GENERATED.items()
        if (REPO / page).read_text(encoding="utf-8") != make((REPO / page).read_text(encoding="utf-8"))
    ]


def main() -> int:
    if "--check" in sys.argv[1:]:
        out_of_date = stale()
        for page in out_of_date:
            print(f"{page} is out of date: run python scripts/make_docs.py", file=sys.stderr)
        return 1 if out_of_date else 0
    for page, make in GENERATED.items():
        path = REPO / page
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        text = make(current)
        if text != current:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
