"""Every run option is declared once (textadapt.config.RunOptions), and the command line, the Prefect
flow's parameters and docs/options.md are made from it; the command line refuses a bad value as it
reads it, and prints what a user pipes elsewhere cleanly. No LLM, no Prefect server: fast."""

import ast
import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from typer.testing import CliRunner

from textadapt.cli import app
from textadapt.config import RunOptions, cli_meta, flag_name, option_default
from textadapt.store import Store

CLI = str(Path(sys.executable).parent / "textadapt")


def click_command(name: str):
    import typer

    return typer.main.get_command(app).commands[name]


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def test_every_run_option_is_a_flag_of_run_and_schedule_with_its_default():
    for command in ("run", "schedule"):
        params = {p.name: p for p in click_command(command).params}
        for name, field in RunOptions.model_fields.items():
            assert name in params, f"{command} has no flag for {name}"
            p = params[name]
            if cli_meta()[name].argument:
                assert p.param_type_name == "argument" and p.required
                continue
            assert p.opts == [flag_name(name)], (command, name)
            default = option_default(name)
            assert p.default == (",".join(default) if isinstance(default, list) else default), (command, name)
            assert field.description and p.help.replace("\\[", "[") == field.description, (command, name)


def test_every_run_option_is_a_flow_parameter_with_its_default_and_description():
    from textadapt.flows.adapt import adapt

    signature = inspect.signature(adapt)
    assert list(signature.parameters) == list(RunOptions.model_fields)
    schema = adapt.parameters.model_dump_for_openapi()
    for name, field in RunOptions.model_fields.items():
        p = signature.parameters[name]
        assert p.kind is p.KEYWORD_ONLY
        if field.is_required():
            assert p.default is p.empty and name in schema["required"]
        else:
            assert p.default == option_default(name) == schema["properties"][name]["default"], name
        assert schema["properties"][name]["description"] == field.description, name


def test_a_default_lives_in_one_place():
    """No run option's default is restated by the CLI, the flow or the harness: they read RunOptions."""
    sources = {f: (REPO / f).read_text() for f in ("textadapt/cli.py", "textadapt/flows/adapt.py", "textadapt/harness.py")}
    for path, source in sources.items():
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Option":
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                flags = {flag_name(n) for n in RunOptions.model_fields if not cli_meta()[n].argument}
                assert not set(names) & flags, f"{path} declares {names} itself"
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "HarnessConfig"):
            defaults = [t.target.id for t in cls.body if isinstance(t, ast.AnnAssign) and t.value is not None]
            assert set(defaults) <= {"prompt_steps", "epochs"}, f"HarnessConfig restates defaults of {defaults}"


def test_docs_option_table_is_current():
    spec = importlib.util.spec_from_file_location("make_options_doc", REPO / "scripts" / "make_options_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.options_markdown()
    assert (REPO / "docs" / "options.md").read_text(encoding="utf-8") == text, "run python scripts/make_options_doc.py"
    for name in RunOptions.model_fields:
        assert f"| `{name}` |" in text
    from textadapt.methods import ALL_ADAPTERS

    assert all(f"`{a}`" in text for a in ALL_ADAPTERS)  # what --methods accepts, from the harness itself


@pytest.mark.parametrize(
    "args, says",
    [
        (["run", "fashion-mnist", "--prior", "emty-text"], "Invalid value for '--prior'"),
        (["run", "fashion-mnist", "--scoring", "plain,iig"], "Invalid value for '--scoring'"),
        (["run", "fashion-mnist", "--methods", "tap-hed"], "unknown adapter 'tap-hed'"),
        (["run", "fashion-mnist", "--samples", "0"], "Invalid value for '--samples'"),
        (["run", "fashion-mnist", "--task-runner", "ray"], "Invalid value for '--task-runner'"),
        (["schedule", "fashion-mnist", "--cron", "0 3 * * *", "--prior", "none"], "Invalid value for '--prior'"),
        (["sql", "--format", "yaml", "SELECT 1"], "Invalid value for '--format'"),
        (["predict", "x.json", "y.png", "--format", "yaml"], "Invalid value for '--format'"),
    ],
)
def test_a_bad_choice_is_refused_as_the_command_line_is_read(home, args, says):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split()), result.output
    assert not home.exists()  # refused before anything was opened, let alone a run started


def test_known_adapters_are_listed_when_one_is_wrong():
    from textadapt.methods import ALL_ADAPTERS

    result = invoke("run", "fashion-mnist", "--methods", "tap-head,zs-hed+ot")
    assert result.exit_code == 2 and all(a in result.output for a in ALL_ADAPTERS), result.output


def test_help_shows_every_default_including_the_settings_ones(monkeypatch):
    monkeypatch.setenv("TEXTADAPT_BACKBONE", "RN50:openai")
    monkeypatch.setenv("COLUMNS", "250")
    text = invoke("run", "--help").output
    for shown in (
        "RN50:openai",
        "llama-cpp:smollm2",
        "generic,targeted",
        "[default: 7777]",
        "[default: empty-text]",
        "[default: threads]",
        "[default: tap-head]",
    ):
        assert shown in text, shown
    assert "Settings.backbone" in text  # where that default comes from


def test_version():
    from textadapt import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"textadapt {__version__}"


def test_csv_lines_end_with_a_newline_only(home):
    Store(home / "textadapt.duckdb").close()
    p = subprocess.run(
        [CLI, "sql", "--format", "csv", "SELECT 1 AS a, 'x,y' AS b UNION ALL SELECT 2, 'z'"],
        capture_output=True,
        env={**__import__("os").environ},
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == b'a,b\n1,"x,y"\n2,z\n'


def test_json_and_table_formats(home):
    Store(home / "textadapt.duckdb").close()
    assert json.loads(invoke("sql", "--format", "json", "SELECT 1 AS a").output) == [{"a": 1}]


def test_run_ids_are_never_cut(home, monkeypatch):
    run_id = "fashion-mnist-with-a-long-name-20261129-200553-3dc0"
    with Store(home / "textadapt.duckdb") as store:
        store.start_run(run_id, "fashion-mnist-with-a-long-name", {})
        store.finish_run(run_id, "completed")
    for columns in ("60", "200"):
        monkeypatch.setenv("COLUMNS", columns)
        for args in (["runs"], ["sql", "SELECT run_id, status, options FROM runs"]):
            output = invoke(*args).output
            assert run_id in output, (columns, args, output)  # whole, on one line
            assert "…" not in output, output


def test_only_the_flows_import_prefect():
    for path in (REPO / "textadapt").rglob("*.py"):
        if "flows" in path.relative_to(REPO / "textadapt").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not [n for n in names if n == "prefect" or n.startswith("prefect.")], f"{path} imports Prefect"


def test_the_wheel_ships_textadapt_only():
    import tomllib

    build = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert build["packages"] == ["textadapt"]
    assert not (REPO / "flows").exists()  # one flow package: textadapt.flows


def test_options_are_checked_together_once_all_are_read(home):
    result = invoke("run", "fashion-mnist", "--templates", "")  # nothing to train on: no template set, no source
    assert result.exit_code == 2 and "nothing to train on" in result.output, result.output
    # each flag alone is fine (an empty --templates with --sources trains on the sources): only all together decide
    assert RunOptions.check("template_sets", []) == []
    assert RunOptions.parse({"dataset": "fashion-mnist", "template_sets": [], "sources": ["cupl"]}).sources == ["cupl"]
