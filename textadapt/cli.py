"""The command line: a thin layer over the library and the flow."""

from __future__ import annotations

import atexit
import csv
import gc
import inspect
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Literal, Optional, get_origin

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from textadapt import TextadaptError, __version__
from textadapt.config import RunOptions, Settings, cli_meta, flag_name, option_default, validation_message

app = typer.Typer(help="Adapt CLIP to a new dataset from text alone.", no_args_is_help=True, pretty_exceptions_enable=False)
out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
Format = Literal["table", "csv", "json"]


def _version(value: bool) -> None:
    if value:
        print(f"textadapt {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    home: Path | None = typer.Option(None, help="Where the cache and reports live (env TEXTADAPT_HOME).", show_default=False),
    db: Path | None = typer.Option(
        None, help="The DuckDB cache file (env TEXTADAPT_DB; default HOME/textadapt.duckdb).", show_default=False
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print textadapt's version and exit."
    ),
) -> None:
    # Flags sit on top of env and config file; setting the env passes them on to the flow.
    if home:
        os.environ["TEXTADAPT_HOME"] = str(home.expanduser().resolve())
    if db:
        os.environ["TEXTADAPT_DB"] = str(db.expanduser().resolve())


def _fail(e: Exception) -> None:
    err.print("[bold red]error:[/]", end=" ")
    err.print(str(e), markup=False, highlight=False)  # messages quote user text: never read it as markup
    raise typer.Exit(2)


# --- the run options as flags: one per RunOptions field (textadapt/config.py) ------------------------


def _settings_default(name: str) -> str:
    """The effective default of a run option that comes from Settings, for --help (env and config file included)."""
    try:
        return str(getattr(Settings(), name))
    except Exception:  # noqa: BLE001 - a broken config file is reported by the command that reads it, not by --help
        return f"Settings.{name}"


def _check(name: str, is_list: bool):
    """A flag's callback: split a comma-separated list, then validate the value as the run would, naming the flag."""

    def check(value):
        if value is None:
            return None
        if is_list:
            value = [t.strip() for t in value.split(",") if t.strip()]
        try:
            return RunOptions.check(name, value)
        except ValidationError as e:
            raise typer.BadParameter(validation_message(e).split(": ", 1)[-1]) from None

    return check


def run_option_flags() -> list[inspect.Parameter]:
    """`run`'s (and `schedule`'s) parameters: the dataset argument and one flag per other RunOptions field, each with
    the field's type (choices checked as the command line is read), description and default."""
    params = []
    for name, field in RunOptions.model_fields.items():
        meta, help = cli_meta()[name], escape(field.description or "")  # help is Rich markup: "[...]" must stay text
        if meta.argument:
            info, annotation = typer.Argument(..., help=help, show_default=False, metavar=name.upper()), field.annotation
        else:
            default, annotation, is_list = option_default(name), field.annotation, get_origin(field.annotation) is list
            if is_list:  # a comma-separated list on the command line
                default, annotation = ",".join(default), str
            # a Settings default is filled in when help is shown (_RunOptionsCommand)
            show_default = f"Settings.{meta.settings}" if meta.settings else bool(default) or default in (0, 0.0)
            info = typer.Option(
                default,
                flag_name(name),
                help=help,
                show_default=show_default,
                callback=_check(name, is_list),
                metavar="A,B,..." if is_list else None,
            )
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
    return params


class _RunOptionsCommand(typer.core.TyperCommand):
    """A command with the run options' flags: its help shows the Settings-backed defaults (backbone, llm) as they
    are when help is asked for (environment, config file, --home)."""

    def format_help(self, ctx, formatter) -> None:
        for p in self.params:
            meta = cli_meta().get(p.name)
            if meta is not None and meta.settings:
                p.show_default = _settings_default(meta.settings)
        super().format_help(ctx, formatter)


def _takes_run_options(fn):
    fn.__signature__ = inspect.Signature(run_option_flags())
    fn.__annotations__ = {p.name: p.annotation for p in fn.__signature__.parameters.values()}
    return fn


@app.command(cls=_RunOptionsCommand)
@_takes_run_options
def run(**flags) -> None:
    """Generate descriptions, train text-only adapters, and score them against zero-shot CLIP.

    Every option is a field of textadapt.config.RunOptions (docs/options.md); the same are the
    parameters of the Prefect flow and of `textadapt schedule`.
    """
    options = _run_options(flags)
    _check_before_prefect(options)
    _prefect_env()
    # Python's garbage collector walks every object torch and Prefect made at import: in each full collection during
    # the run, and in the last one at exit (2 to 4 s here), which only frees memory the OS takes back anyway. Frozen
    # (gc.freeze), they are skipped: once the imports are done, and at exit, after Prefect and the temporary API have
    # sent their last logs and stopped the server (registered before theirs: atexit runs last in, first out).
    atexit.register(gc.freeze)
    from textadapt.flows.temporary_api import configured_api_url, start_temporary_api, without_heartbeats

    try:
        # Without a Prefect server, this process starts Prefect's temporary API as its own child (stopped even by kill -9)
        temporary = not configured_api_url()
        api_ready = start_temporary_api() if temporary else (lambda: None)
        from textadapt.flows.adapt import adapt, quiet_console  # Prefect is imported only for commands that run flows

        quiet_console(caller_shows_errors=True)
        api_ready()
        gc.freeze()
        with without_heartbeats() if temporary else nullcontext():
            outcome = adapt(**options.model_dump())
    except TextadaptError as e:
        _fail(e)
    if outcome.untrained_backbone:
        err.print(
            "[bold red]UNTRAINED BACKBONE:[/] the backbone has random weights (no pretrained weights were asked for "
            "or could be had): every accuracy below is noise and means nothing."
        )
    if outcome.llm_calls == outcome.cached_generations == 0:
        calls = "no LLM generation (no template set)"
    elif outcome.llm_calls == 0:
        calls = "0 LLM calls (every generation served from the cache)"
    else:
        calls = f"{outcome.llm_calls} LLM calls"
    out.print(
        f"{calls}, {outcome.cached_generations} cached; {outcome.text_encoder_calls} texts encoded; "
        f"trained on {outcome.trained_descriptions} descriptions"
    )
    if outcome.results:
        table = Table("method", "top-1 %")
        for m, top1 in outcome.results.items():
            table.add_row(m, f"{100 * top1:.1f}")
        out.print(table)
    out.print(f"report: {outcome.report_path}", markup=False)


def _names(csv_list: str) -> list[str]:
    return [t.strip() for t in csv_list.split(",") if t.strip()]


def _run_options(flags: dict) -> RunOptions:
    """RunOptions from the flags (each checked already), or a clear error (a check of the options together)."""
    try:
        return RunOptions.parse(flags, flags=True)
    except TextadaptError as e:
        _fail(e)


@app.command()
def sql(
    query: str = typer.Argument(
        ..., help='A DuckDB SQL statement, e.g. "SELECT class_name, count(*) FROM descriptions GROUP BY ALL".'
    ),
    write: bool = typer.Option(False, "--write", help="Open the cache for writing (default: read-only)."),
    format: Format = typer.Option("table", "--format", help="How to print the rows."),
) -> None:
    """Query the cache (schema: docs/schema.md)."""
    from textadapt.store import Store

    path = Settings().db_path
    try:
        with Store(path, read_only=not write) as store:
            try:
                columns, rows = store.sql(query)
            except TextadaptError as e:
                if not write and "read-only" in str(e):
                    shown = " ".join(query.split())
                    shown = shown if len(shown) <= 80 else shown[:80] + "..."
                    raise TextadaptError(
                        f"{path}: {shown!r} writes to the cache, which `textadapt sql` opens read-only; "
                        f"add --write if you mean it ({e})"
                    ) from None
                raise
    except TextadaptError as e:
        _fail(e)
    if format == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)
    elif format == "json":
        print(json.dumps([dict(zip(columns, r)) for r in rows], default=str, indent=1))
    else:
        table = Table(*(_column(c, [r[i] for r in rows]) for i, c in enumerate(columns)))
        for r in rows:
            table.add_row(*("NULL" if v is None else str(v) for v in r))
        out.print(table)


def _column(name: str, values: list) -> Column:
    """A table column that never cuts a value: identifiers (run ids, keys: no spaces) stay whole on one line, the
    rest wrap."""
    shown = [str(v) for v in values if v is not None]
    if shown and max(map(len, shown)) <= 80 and not any(c.isspace() for v in shown for c in v):
        return Column(name, no_wrap=True, min_width=max(len(name), *map(len, shown)))
    return Column(name, overflow="fold")


@app.command("export")
def export_classifier(
    run_id: str = typer.Argument(..., help='A run id (`textadapt sql "SELECT run_id, dataset, status FROM runs"`).'),
    method: str | None = typer.Option(
        None,
        help="Which classifier, e.g. tap-head:targeted or zs-head+ot:targeted/ig.",
        show_default="the run's best adapted method",
    ),
    out_dir: Path = typer.Option(Path("."), "--out", help="Folder to write NAME.safetensors and NAME.json in."),
) -> None:
    """Write a run's adapted classifier as safetensors plus JSON metadata, for `textadapt predict`."""
    from textadapt import classifier
    from textadapt.store import Store

    try:
        with Store(Settings().db_path, read_only=True) as store:
            st, js = classifier.export(store, run_id, method, out_dir)
    except TextadaptError as e:
        _fail(e)
    meta = json.loads(js.read_text(encoding="utf-8"))
    top1 = meta["top1_in_run"]
    out.print(
        f"{meta['method']} ({len(meta['classes'])} classes, {meta['scoring']} scoring, backbone {meta['backbone_spec']}"
        + (f", top-1 {100 * top1:.1f}% in the run with seed {meta['seed']}" if top1 is not None else ", not scored in its run")
        + ")"
    )
    if meta["untrained_backbone"]:
        err.print("[bold red]UNTRAINED BACKBONE:[/] this classifier sits on random weights; its predictions mean nothing.")
    out.print(f"wrote {st}\nwrote {js}")


@app.command()
def predict(
    classifier_path: Path = typer.Argument(
        ..., metavar="CLASSIFIER", help="An exported classifier: NAME.json or NAME.safetensors."
    ),
    paths: list[Path] = typer.Argument(..., metavar="PATH...", help="Image files or folders (searched recursively)."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="Classes to print per image."),
    batch_size: int = typer.Option(64, help="Images per encoder batch."),
    format: Format = typer.Option("table", "--format", help="How to print the classes."),
) -> None:
    """Print the top-k classes of images with an exported classifier (the backbone is loaded once)."""
    from textadapt import classifier, encoders

    try:
        clf = classifier.load(classifier_path)
        files = classifier.image_paths(paths)
        backbone = encoders.load_backbone(clf.meta["backbone_spec"], Settings().device)
        classifier.check_backbone(clf, backbone)
        best = classifier.top_k(clf, classifier.embed_files(backbone, files, batch_size), top_k)
    except TextadaptError as e:
        _fail(e)
    if format == "json":
        print(json.dumps([{"path": str(f), "top": [{"class": c, "p": p} for c, p in b]} for f, b in zip(files, best)], indent=1))
    elif format == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["path", "rank", "class", "p"])
        w.writerows([str(f), r + 1, c, f"{p:.6f}"] for f, b in zip(files, best) for r, (c, p) in enumerate(b))
    else:
        table = Table(Column("image", overflow="fold"), *(f"#{r + 1}" for r in range(min(top_k, len(clf.classes)))))
        for f, b in zip(files, best):
            table.add_row(str(f), *(f"{c} ({100 * p:.0f}%)" for c, p in b))
        out.print(table)
    if clf.meta.get("untrained_backbone"):
        err.print("[bold red]UNTRAINED BACKBONE:[/] this classifier sits on random weights; its predictions mean nothing.")


datasets_app = typer.Typer(help="Dataset specs: list them, write one from an image folder, check one before a run.")
app.add_typer(datasets_app, name="datasets")


@datasets_app.callback(invoke_without_command=True)
def datasets_main(ctx: typer.Context) -> None:
    """Dataset specs: list them (the default), write one from an image folder (new), check one (check)."""
    if ctx.invoked_subcommand is None:
        datasets_list()


@datasets_app.command("list")
def datasets_list() -> None:
    """List the dataset specs textadapt can find."""
    from textadapt.datasets import known_datasets, load_spec

    settings = Settings()
    table = Table("name", "classes", "spec file")
    for name, path in sorted(known_datasets(settings.dataset_search_path).items()):
        try:
            spec = load_spec(path)
            todo = spec.placeholders()
            n = str(len(spec.classes)) + (f" (to fill in: {', '.join(todo)})" if todo else "")
        except TextadaptError as e:
            n = f"invalid: {str(e).splitlines()[-1].strip()}"
        table.add_row(name, n, str(path))
    out.print(table)


@datasets_app.command("new")
def datasets_new(
    name: str = typer.Argument(..., help="Name of the new dataset (the spec is NAME.toml)."),
    from_folder: Path = typer.Option(..., "--from-folder", help="An ImageFolder: DIR/<class>/*.png, or DIR/test/<class>/*.png."),
    split: str | None = typer.Option(
        None,
        "--split",
        help='Folder of the test split inside DIR; "" for none.',
        show_default="test if DIR/test holds class folders, else none",
    ),
    out_path: Path | None = typer.Option(
        None, "--out", help="Folder (or NAME.toml file) to write the spec to.", show_default="$TEXTADAPT_HOME/datasets"
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing spec file."),
) -> None:
    """Write a dataset spec from an image folder: classes from the folder names, the wording to fill in."""
    from textadapt.datasets import PLACEHOLDER, write_new_spec

    settings = Settings()
    try:
        path, new = write_new_spec(name, from_folder, out_path or settings.home / "datasets", split, force)
    except TextadaptError as e:
        _fail(e)
    layout = f"{new.root}/<class>/" + (f" (split folder {new.split!r})" if new.split else " (no split folder)")
    out.print(f"wrote {path}: {len(new.classes)} classes, {new.images} images from {layout}", markup=False)
    out.print(
        f"next: replace the {PLACEHOLDER} values of [prompting] (domain, category, task) in {path}, "
        f"then `textadapt datasets check {name}`",
        markup=False,
    )
    if out_path is not None and path.parent.resolve() not in [d.expanduser().resolve() for d in settings.dataset_search_path]:
        err.print(
            f"note: {path.parent} is not searched for specs; add it to TEXTADAPT_DATASETS_DIRS to use {name!r}", markup=False
        )


@datasets_app.command("check")
def datasets_check(
    name: str = typer.Argument(..., help="Dataset name (see `textadapt datasets`)."),
    templates: str = typer.Option(
        ",".join(option_default("template_sets")), help="Template sets to render for every class (comma-separated)."
    ),
    workers: int | None = typer.Option(None, help="Threads decoding images.", show_default="CPU cores + 2"),
) -> None:
    """Check a dataset before any run: every image decoded, the class folders, every template rendered (no LLM, no Prefect)."""
    from textadapt.checks import check_dataset

    settings = Settings()
    try:
        result = check_dataset(name, settings, _names(templates), workers)
    except TextadaptError as e:
        _fail(e)
    spec, sec = result.spec, result.seconds
    out.print(
        f"{spec.name} ({spec.path}): {len(spec.classes)} classes, {len(result.images)} images from {result.images.source}; "
        f"decoded in {sec['decode']:.1f} s",
        markup=False,
    )
    empty = [c for c, n in zip(spec.classes, result.per_class) if n == 0]
    counts = [n for n in result.per_class if n]
    if counts:
        out.print(
            f"images per class: {min(counts)} to {max(counts)}" + (f"; none for {len(empty)} classes" if empty else ""),
            markup=False,
        )
    out.print(
        f"{result.templates} templates rendered for every class ({result.prompts} prompts) in {sec['render']:.1f} s", markup=False
    )
    if result.problems:
        _fail(
            TextadaptError(
                f"{len(result.problems)} problem(s) in dataset {spec.name!r}, each to fix before a run:\n  - "
                + "\n  - ".join(result.problems)
            )
        )
    out.print(f"ok: no problem found in {sec['total']:.1f} s", markup=False)


prompts_app = typer.Typer(help="The prompt templates: list, show, and render exactly what would be sent.", no_args_is_help=True)
app.add_typer(prompts_app, name="prompts")


def _templates(settings: Settings, spec=None):
    """Every template by name; with a dataset spec, its own targeted questions in place of prompts/targeted/."""
    from textadapt.prompts import list_templates, templates_for

    templates = list_templates(settings.prompts_dir) if spec is None else templates_for(settings.prompts_dir, None, spec)
    return {t.name: t for t in templates}


@prompts_app.command("list")
def prompts_list() -> None:
    """Every template: name, how its answer is parsed, what it asks."""
    settings = Settings()
    table = Table("name", "parse", "intent")
    try:
        for t in _templates(settings).values():
            table.add_row(t.name, t.parse, t.intent)
    except TextadaptError as e:
        _fail(e)
    out.print(table)
    out.print(f"({settings.prompts_dir})")


@prompts_app.command("show")
def prompts_show(name: str = typer.Argument(..., help="SET/NAME, e.g. targeted/look.")) -> None:
    """Print a template's file."""
    templates = _templates(Settings())
    if name not in templates:
        _fail(TextadaptError(f"no template {name!r}; templates: {', '.join(templates)}"))
    out.print(f"# {templates[name].path}", markup=False)
    print(templates[name].source, end="")


@prompts_app.command("render")
def prompts_render(
    name: str = typer.Argument(..., help="SET/NAME, e.g. targeted/look."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset name."),
    class_name: str | None = typer.Option(None, "--class", help="Class name.", show_default="every class"),
) -> None:
    """Print exactly what would be sent to the LLM, with the sampling settings.

    Confusable classes come from the spec's [prompting.confusable] table, else the neighbouring
    classes in the list (a run uses the backbone's nearest class names instead).
    """
    from textadapt.datasets import find_spec
    from textadapt.llm import Sampling
    from textadapt.prompts import render

    settings = Settings()
    try:
        spec = find_spec(dataset, settings.dataset_search_path)
        templates = _templates(settings, spec)
        if name not in templates:
            raise TextadaptError(f"no template {name!r} for {spec.name}; templates: {', '.join(templates)}")
        t = templates[name]
        if class_name is not None and class_name not in spec.classes:
            raise TextadaptError(f"{spec.name} has no class {class_name!r}; classes: {spec.classes}")
        sampling = Sampling(**t.sampling_overrides())
        classes = [""] if t.parse == "questions" else [class_name] if class_name else spec.classes
        out.print(
            f"# {t.name}: parse={t.parse}, temperature={sampling.temperature}, max_tokens={sampling.max_tokens}, "
            f"stop={list(sampling.stop)}",
            markup=False,
        )
        for c in classes:
            print(render(t, spec, c))
    except TextadaptError as e:
        _fail(e)


descriptions_app = typer.Typer(
    help="Import and export descriptions as {class: \\[sentences]} JSON (the CuPL / DCLIP format).", no_args_is_help=True
)
app.add_typer(descriptions_app, name="descriptions")


@descriptions_app.command("import")
def descriptions_import(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="A JSON file {class name: \\[sentences]}."),
    dataset: str = typer.Option(..., "--dataset", help="The dataset whose classes the file describes."),
    source: str = typer.Option(..., "--source", help="A short name for this collection, e.g. cupl; train on it with --sources."),
    key: str | None = typer.Option(None, "--key", help="For a file holding several datasets: which one."),
) -> None:
    """Store a published description file in the cache, to train on without an LLM."""
    from textadapt.datasets import find_spec
    from textadapt.descriptions import import_descriptions
    from textadapt.store import Store

    settings = Settings()
    try:
        spec = find_spec(dataset, settings.dataset_search_path)
        with Store(settings.db_path) as store:
            r = import_descriptions(file, spec, source, store, key)
    except TextadaptError as e:
        _fail(e)
    out.print(
        f"imported {r.rows - r.rejected} descriptions of {len(r.per_class)} classes as {source!r} "
        f"({r.rejected} rejected by cleaning); train on them with: textadapt run {spec.name} --sources {source}",
        markup=False,
    )
    if r.unmatched:
        err.print(
            f"{len(r.unmatched)} names in {file} match no class of {spec.name} and were not imported: "
            f"{', '.join(r.unmatched[:20])}{' ...' if len(r.unmatched) > 20 else ''}",
            markup=False,
        )
    if r.missing:
        err.print(
            f"{len(r.missing)} classes of {spec.name} have no description in the file: "
            f"{', '.join(r.missing[:20])}{' ...' if len(r.missing) > 20 else ''}",
            markup=False,
        )


@descriptions_app.command("export")
def descriptions_export(
    dataset: str | None = typer.Option(None, "--dataset"),
    template: str | None = typer.Option(
        None, "--template", help="A template (targeted/look), a set (targeted) or import/SOURCE."
    ),
    run_id: str | None = typer.Option(None, "--run", help="Only what this run trained on."),
    output: Path | None = typer.Option(None, "--output", "-o", help="File to write.", show_default="stdout"),
) -> None:
    """Write accepted descriptions as {class name: \\[sentences]} JSON."""
    from textadapt.descriptions import export_descriptions
    from textadapt.store import Store

    try:
        with Store(Settings().db_path, read_only=True) as store:
            data = export_descriptions(store, dataset, template, run_id)
    except TextadaptError as e:
        _fail(e)
    text = json.dumps(data, indent=1, ensure_ascii=False)
    if output:
        output.write_text(text + "\n", encoding="utf-8")
        err.print(f"wrote {sum(map(len, data.values()))} descriptions of {len(data)} classes to {output}", markup=False)
    else:
        print(text)


# --- running as a service: scheduled deployments, serving them, past runs ---------------------------


def _check_before_prefect(options: RunOptions) -> None:
    """A bad input fails with its one message before Prefect is imported and its temporary API started."""
    from textadapt import checks

    try:
        checks.before_prefect(options, Settings())
    except TextadaptError as e:
        _fail(e)


def _prefect_env() -> None:
    """Environment for commands that run or talk to Prefect; call before importing it."""
    # Prefect's usage analytics would only fail without network; textadapt runs offline by design.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")  # the client's telemetry too (and its notice on a terminal)
    # Prefect's temporary API gets 20 s to start by default; a busy 2-core machine can need more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Prefect creates PREFECT_HOME without its parents, and its temporary API then cannot open its
    # database and retries until the timeout ("Timed out while attempting to connect ...").
    if os.environ.get("PREFECT_HOME"):
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)


def _schedule_flags(fn):
    """`schedule`'s parameters: the dataset, when to run, and then every run option's flag, as for `run`."""
    dataset, *options = run_option_flags()
    when = [
        inspect.Parameter(
            "cron",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=str,
            default=typer.Option(
                ..., "--cron", help='When to run, e.g. "0 3 * * *" (03:00 every day).', rich_help_panel="Schedule"
            ),
        ),
        inspect.Parameter(
            "timezone",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[str],  # noqa: UP045 - Typer reads this annotation at run time
            default=typer.Option(
                None,
                "--timezone",
                help="Time zone of the cron schedule, e.g. Europe/Paris.",
                show_default="UTC",
                rich_help_panel="Schedule",
            ),
        ),
        inspect.Parameter(
            "name",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[str],  # noqa: UP045
            default=typer.Option(
                None, "--name", help="Deployment name.", show_default="the dataset's name", rich_help_panel="Schedule"
            ),
        ),
        inspect.Parameter(
            "replace",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(
                False,
                "--replace",
                help="Replace a deployment of that name that `schedule` did not make (e.g. prefect.yaml's); "
                "without it, such a deployment is left as it is and nothing is created.",
                rich_help_panel="Schedule",
            ),
        ),
    ]
    fn.__signature__ = inspect.Signature([dataset, *when, *options])
    fn.__annotations__ = {p.name: p.annotation for p in fn.__signature__.parameters.values()}
    return fn


@app.command(cls=_RunOptionsCommand)
@_schedule_flags
def schedule(**flags) -> None:
    """Create or update the Prefect deployment that runs DATASET on a cron schedule.

    Its run options are the flags of `textadapt run`, e.g. `textadapt schedule fashion-mnist
    --cron "0 3 * * *" --max-classes 4 --task-runner dask`; each becomes one parameter of the
    deployment. Needs a Prefect server (PREFECT_API_URL); `textadapt serve` then runs the scheduled runs.
    The cron, the options and the dataset are checked first (as a run checks them): nothing is created if
    one is wrong. A deployment runs one flow run at a time (a run due meanwhile waits for its turn).
    """
    cron, timezone, name, replace = flags.pop("cron"), flags.pop("timezone"), flags.pop("name"), flags.pop("replace")
    dataset = flags["dataset"]
    options = _run_options(flags)
    _check_before_prefect(options)
    _prefect_env()
    from textadapt.flows.deployments import schedule as make_schedule

    try:
        deployment_id = make_schedule(options, cron, timezone, name, replace)
    except TextadaptError as e:
        _fail(e)
    out.print(
        f"deployment textadapt-adapt/{name or dataset} ({deployment_id}): cron {cron!r}"
        f"{f' ({timezone})' if timezone else ' (UTC)'}; run it with `textadapt serve`",
        markup=False,
    )


@app.command()
def serve(
    limit: int = typer.Option(
        1,
        min=1,
        help="Most flow runs at once from this process: its runs share this "
        "machine's cache file, which takes one writer at a time.",
    ),
) -> None:
    """Run the deployments `textadapt schedule` made (and only those) from this machine until Ctrl-C (Prefect `serve`).

    Each deployment runs one flow run at a time, however many `serve` processes there are: a run due while
    another of it runs waits. Schedules stay as they are when this stops. The runs happen here, with this
    environment: its textadapt and Python, TEXTADAPT_HOME (the cache), the LLM's URL, the HF cache.
    """
    _prefect_env()
    from textadapt.flows.deployments import serve as serve_deployments

    try:
        serve_deployments(limit)
    except TextadaptError as e:
        _fail(e)


@app.command()
def runs(
    dataset: str | None = typer.Argument(None, help="Only this dataset's runs."),
    limit: int = typer.Option(20, help="Newest N runs."),
) -> None:
    """Past runs from the cache, newest first, with their gain: best adapted top-1 minus best training-free baseline top-1 (zero-shot or descriptions, plain scoring)."""
    from textadapt.store import Store, run_summaries

    try:
        with Store(Settings().db_path, read_only=True) as store:
            rows = run_summaries(store, dataset, limit)
    except TextadaptError as e:
        _fail(e)
    if not rows:
        out.print(f"no runs{f' of {dataset}' if dataset else ''} in {Settings().db_path}", markup=False)
        return
    run_width = max(len(r.run_id) for r in rows)  # a run id is never cut: the other columns wrap instead
    table = Table(
        Column("run", no_wrap=True, min_width=run_width),
        "status",
        "best adapted, top-1 %",
        "best training-free baseline, top-1 %",
        "gain (points)",
    )
    best = lambda method, top1: "-" if top1 is None else f"{method} {100 * top1:.1f}"  # noqa: E731
    for r in rows:
        gain = "-" if r.gain is None else f"{100 * r.gain:+.1f}" + ("*" if r.untrained else "")
        table.add_row(r.run_id, r.status, best(r.best_adapted, r.adapted_top1), best(r.best_zero_shot, r.zero_shot_top1), gain)
    out.print(table)
    if any(r.untrained for r in rows):
        out.print("* untrained backbone (random weights): its accuracies and gain mean nothing", markup=False)


@app.command()
def compare(
    a: str = typer.Argument(..., metavar="A", help="RUN_ID (its best adapted method, or --method) or RUN_ID:METHOD."),
    b: str = typer.Argument(..., metavar="B", help="The other side, the same way; every difference is B minus A."),
    method: str | None = typer.Option(
        None, help="The method of a side given as a bare RUN_ID.", show_default="its best adapted method"
    ),
    format: Format = typer.Option("table", "--format", help="How to print the differences."),
) -> None:
    """Is B better than A? Top-1 and per-class differences on the same test images, with 95% intervals (paired
    bootstrap) and McNemar's exact test. E.g. the same method before and after a template edit: two runs."""
    from rich.text import Text

    from textadapt.compare import compare as compare_sides
    from textadapt.store import Store

    try:
        with Store(Settings().db_path, read_only=True) as store:
            c = compare_sides(store, a, b, method)
    except TextadaptError as e:
        _fail(e)
    pts = lambda x: "n/a" if x != x else f"{100 * x:+.1f}"  # noqa: E731  (x != x: NaN)
    if format == "json":
        print(json.dumps(c.to_dict(), indent=1))
    elif format == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["class_index", "class", "images", "a", "b", "difference", "low", "high"])
        w.writerow(["", "(top-1)", c.images, c.a.top1, c.b.top1, c.top1.value, c.top1.low, c.top1.high])
        m = c.mean_per_class
        w.writerow(["", "(mean per class)", c.images, c.a.mean_per_class, c.b.mean_per_class, m.value, m.low, m.high])
        w.writerows(
            [k.index, k.name, k.images, k.a, k.b, k.difference.value, k.difference.low, k.difference.high] for k in c.classes
        )
    else:
        for label, s in (("A", c.a), ("B", c.b)):
            seeds = f"{s.seeds} seed{'s' * (s.seeds > 1)}"
            out.print(f"{label}: {s.run_id}:{s.method} (top-1 {100 * s.top1:.1f}%, {seeds})", markup=False)
        out.print(
            f"B - A on {c.images} test images: top-1 {pts(c.top1.value)} points, {100 * c.level:.0f}% interval "
            f"({pts(c.top1.low)}, {pts(c.top1.high)}); mean per class {pts(c.mean_per_class.value)} "
            f"({pts(c.mean_per_class.low)}, {pts(c.mean_per_class.high)})"
        )
        out.print(
            f"McNemar's exact test: B right where A is wrong on {c.mcnemar.only_b} images, A right where B is wrong on "
            f"{c.mcnemar.only_a}: p = {c.mcnemar.p_value:.3g}"
        )
        table = Table("class", "images", "A %", "B %", "B - A", f"{100 * c.level:.0f}% interval")
        for k in c.classes:
            table.add_row(
                Text(k.name),
                str(k.images),
                f"{100 * k.a:.1f}",
                f"{100 * k.b:.1f}",
                pts(k.difference.value),
                f"({pts(k.difference.low)}, {pts(k.difference.high)})",
            )
        out.print(table)
        out.print(
            f"Paired bootstrap over the test images ({c.n_resamples} resamples, seed {c.seed}); with several seeds an "
            "image counts as the share of seeds right (McNemar: right if at least half are).",
            markup=False,
        )
    if c.a.untrained or c.b.untrained:
        err.print(
            "[bold red]UNTRAINED BACKBONE:[/] a side ran on random weights: its accuracies and these differences mean nothing."
        )


if __name__ == "__main__":
    app()
