"""The docs stay true to the code: every generated page is what its generator writes today, and every relative link in
the repository's Markdown (README.md, docs/, benchmarks/, ...) reaches a file that exists, and a heading where it names one."""

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", REPO / "scripts" / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_page_is_current():
    make_docs = _make_docs()
    assert {"docs/options.md", "docs/settings.md"} <= set(make_docs.GENERATED)
    assert make_docs.stale() == [], "run python scripts/make_docs.py (make docs)"


def test_the_settings_page_lists_every_setting_with_its_variable():
    from textadapt.config import Settings

    text = (REPO / "docs" / "settings.md").read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"| `{name}` | `TEXTADAPT_{name.upper()}` |" in text
    # defaults as a user without any TEXTADAPT_* variable gets them, whoever wrote the page
    assert "| `~/.local/share/textadapt` |" in text and "`prompts/` (shipped with textadapt)" in text


def test_a_stale_page_is_named_by_the_check(tmp_path, monkeypatch):
    """The check is not vacuous: a page that differs from its generator's text is reported, and --check exits 1."""
    make_docs = _make_docs()
    monkeypatch.setattr(make_docs, "REPO", tmp_path)
    for page, make in make_docs.GENERATED.items():
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        current = (REPO / page).read_text(encoding="utf-8")
        (tmp_path / page).write_text(make(current), encoding="utf-8")
    assert make_docs.stale() == []
    (tmp_path / "docs" / "settings.md").write_text("# Settings\n\nhand-edited\n", encoding="utf-8")
    assert make_docs.stale() == ["docs/settings.md"]
    monkeypatch.setattr("sys.argv", ["make_docs.py", "--check"])
    assert make_docs.main() == 1


# --- links ----------------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def _markdown_files() -> list[Path]:
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"], cwd=REPO, capture_output=True, text=True
    )
    names = tracked.stdout.split() if tracked.returncode == 0 and tracked.stdout.strip() else []
    found = [REPO / n for n in names] or sorted(p for p in REPO.rglob("*.md") if ".venv" not in p.parts)
    return [p for p in found if p.exists()]


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where a link is a link."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^(```|~~~).*?^\1", "", path.read_text(encoding="utf-8"), flags=re.S | re.M).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slugs_are_githubs():
    assert slug("CuPL (`cupl:SET`)") == "cupl-cuplset"
    assert slug("TaskRes (`taskres:SET`) and `tap-residual:SET`") == "taskres-taskresset-and-tap-residualset"
    assert slug("Reproduce TAP's table") == "reproduce-taps-table"
    assert slug("Running as a service: schedules, serving, Dask") == "running-as-a-service-schedules-serving-dask"


def broken_links(page: Path) -> list[str]:
    """Every relative link of a Markdown page whose file, or heading, does not exist (URLs with a scheme are not followed)."""
    broken = []
    for m in LINK.finditer(_prose(page.read_text(encoding="utf-8"))):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n[ok](other.md#a-code-heading) [self](#top) [web](https://example.org/x.md)\n"
        "`[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n"
        "[gone](missing.md) [bad anchor](other.md#b) ![img](pic.png)\n",
        encoding="utf-8",
    )
    assert broken_links(page) == ["missing.md: no such file", "other.md#b: no heading #b in other.md", "pic.png: no such file"]


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


TEST_REF = re.compile(r"(?<![\w/])(?:tests/)?(test_\w+\.py)(?:::([\w*]+))?")  # tests/test_x.py::name, test_x.py::name_*


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_test_a_page_names_exists(page: Path):
    """The reliability tables and methods.md cite tests by file and name: each must still be there."""
    missing = []
    for file, name in set(TEST_REF.findall(page.read_text(encoding="utf-8"))):
        source = REPO / "tests" / file
        if not source.exists():
            missing.append(file)
            continue
        pattern = re.escape(name).replace(r"\*", r"\w*")  # test_waffle_* names a family
        if name and not re.search(rf"^\s*(?:async )?def {pattern}\(", source.read_text(encoding="utf-8"), re.M):
            missing.append(f"{file}::{name}")
    assert not missing, f"{page.relative_to(REPO)} names tests that do not exist: {sorted(missing)}"
