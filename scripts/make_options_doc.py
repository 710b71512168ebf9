"""Write docs/options.md from ``textadapt.config.RunOptions``, where every run option is declared once.

    python scripts/make_options_doc.py            # rewrite docs/options.md
    python scripts/make_options_doc.py --check    # exit 1 if docs/options.md is not what this would write

tests/test_options.py fails while the file is out of date.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "options.md"


def type_name(annotation) -> str:
    """A field's type as a reader wants it: ``int or unset``, ``one of: a, b``, ``list of: a, b, all``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of: " + ", ".join(f"`{a}`" for a in args)
    if origin is list:
        inner = type_name(args[0])
        return f"list of {inner}" if not inner.startswith("one of") else f"list of{inner.removeprefix('one of')}"
    if origin in (typing.Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or unset" if type(None) in args else "")
    return getattr(annotation, "__name__", str(annotation))


def _default(name: str) -> str:
    from textadapt.config import Settings, cli_meta, option_default

    meta, default = cli_meta()[name], option_default(name)
    if default is ...:
        return "(required)"
    if meta.settings:
        return f"Settings.{meta.settings} (`{Settings.model_fields[meta.settings].default}`)"
    if default is None:
        return "unset"
    if isinstance(default, list):
        return "`" + ",".join(default) + "`" if default else "none"
    return f"`{default}`"


def options_markdown() -> str:
    """The page: one row per run option, then the harness's adapters and losses (what ``methods`` accepts)."""
    from textadapt.config import RunOptions, cli_meta, flag_name
    from textadapt.methods import ALL_ADAPTERS, LOSSES, NO_OT

    lines = [
        "# Run options",
        "",
        "<!-- Written by scripts/make_options_doc.py from textadapt/config.py (RunOptions); do not edit by hand. -->",
        "",
        "Every run option is declared once, in `textadapt.config.RunOptions`: its type, default and",
        "description. The same options are the flags of `textadapt run` and `textadapt schedule`, the",
        "parameters of the Prefect flow `textadapt-adapt` (entrypoint `textadapt.flows.adapt.adapt`; in",
        "`prefect.yaml` and the Prefect UI each is a parameter of its own), and this table. Lists are",
        "comma-separated on the command line (`--methods tap-head,zs-head+ot`) and lists in a flow's parameters.",
        "",
        "| option (flow parameter) | flag | type | default | what it does |",
        "|---|---|---|---|---|",
    ]
    for name, field in RunOptions.model_fields.items():
        flag = name.upper() if cli_meta()[name].argument else f"`{flag_name(name)}`"
        constraints = "".join(
            f", {op} {getattr(c, attr)}"
            for c in field.metadata
            for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
            if hasattr(c, attr)
        )
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | {flag} | {type_name(field.annotation)}{constraints} | {_default(name)} | {description} |")
    lines += [
        "",
        "## `methods`: the harness's adapters and losses",
        "",
        f"ADAPTER is one of {', '.join(f'`{a}`' for a in ALL_ADAPTERS)}; LOSS one of {', '.join(f'`{x}`' for x in LOSSES)}",
        "(`ADAPTER` alone trains with the adapter's own recipe loss; `+ot` with OTTER's soft labels, not for",
        f"{', '.join(f'`{a}`' for a in NO_OT)}); `all` is every pair. They come from `textadapt/methods.py`, so a new",
        "adapter shows up here when this page is written again.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(REPO))
    text = options_markdown()
    if "--check" in sys.argv[1:]:
        if DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is out of date: run python scripts/make_options_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
