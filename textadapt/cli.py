"""The command line: a thin layer over the library and the flow."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from textadapt import TextadaptError
from textadapt.config import RunOptions, Settings

app = typer.Typer(help="Adapt CLIP to a new dataset from text alone.", no_args_is_help=True, add_completion=False)
out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)


@app.callback()
def main(
    home: Optional[Path] = typer.Option(None, help="Where the cache and reports live (env TEXTADAPT_HOME).", show_default=False),
    db: Optional[Path] = typer.Option(None, help="The DuckDB cache file (env TEXTADAPT_DB; default HOME/textadapt.duckdb).", show_default=False),
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


@app.command()
def run(
    dataset: str = typer.Argument(..., help="Dataset name: a spec data/datasets/NAME.toml (see `textadapt datasets`)."),
    backbone: Optional[str] = typer.Option(None, help="open_clip spec ARCH:WEIGHTS: ViT-B-32:openai, hf-hub:ORG/REPO, ARCH:/path.pt, ARCH:random, ARCH:auto [default: ViT-B-32:openai]."),
    llm: Optional[str] = typer.Option(None, help="LLM spec [default: llama-cpp:smollm2]."),
    templates: str = typer.Option("generic,targeted", help="Comma-separated template sets of prompts/; one head is trained per set."),
    samples: int = typer.Option(5, help="Samples per question (TAP: 5)."),
    temperature: float = typer.Option(0.99, help="Sampling temperature (TAP: 0.99)."),
    max_tokens: int = typer.Option(50, help="Longest answer in tokens (TAP: 50)."),
    steps: Optional[int] = typer.Option(None, help="Training steps [default: the dataset spec's]."),
    seed: int = typer.Option(7777, help="Training seed (TAP: 7777)."),
    max_classes: Optional[int] = typer.Option(None, help="Only the first N classes (smoke runs)."),
    max_images: Optional[int] = typer.Option(None, help="Score on the first N test images only."),
    batch_size: int = typer.Option(256, help="Encoder batch size."),
) -> None:
    """Generate descriptions, train text-only heads, and score them against zero-shot CLIP."""
    try:
        options = RunOptions(
            dataset=dataset, backbone=backbone, llm=llm, template_sets=[t.strip() for t in templates.split(",") if t.strip()],
            samples=samples, temperature=temperature, max_tokens=max_tokens, steps=steps, seed=seed,
            max_classes=max_classes, max_images=max_images, batch_size=batch_size,
        )
    except ValidationError as e:
        flag = {"template_sets": "templates"}
        _fail(TextadaptError("; ".join(f"--{flag.get(str(x['loc'][0]), str(x['loc'][0])).replace('_', '-')}: {x['msg']}" for x in e.errors())))
    # Prefect's usage analytics would only fail without network; textadapt runs offline by design.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.adapt import adapt  # Prefect is imported only for commands that run flows

    try:
        outcome = adapt(options)
    except TextadaptError as e:
        _fail(e)
    if outcome.untrained_backbone:
        err.print("[bold red]UNTRAINED BACKBONE:[/] the backbone has random weights (no pretrained weights were asked for "
                  "or could be had): every accuracy below is noise and means nothing.")
    calls = "0 LLM calls (every generation served from the cache)" if outcome.llm_calls == 0 else f"{outcome.llm_calls} LLM calls"
    out.print(f"{calls}, {outcome.cached_generations} cached; {outcome.text_encoder_calls} texts encoded; "
              f"trained on {outcome.trained_descriptions} descriptions")
    table = Table("method", "top-1 %")
    for m, top1 in outcome.results.items():
        table.add_row(m, f"{100 * top1:.1f}")
    out.print(table)
    out.print(f"report: {outcome.report_path}")


@app.command()
def sql(
    query: str = typer.Argument(..., help="A DuckDB SQL statement, e.g. \"SELECT class_name, count(*) FROM descriptions GROUP BY ALL\"."),
    write: bool = typer.Option(False, "--write", help="Open the cache for writing (default: read-only)."),
    format: str = typer.Option("table", "--format", help="table, csv or json."),
) -> None:
    """Query the cache (schema: docs/schema.md)."""
    from textadapt.store import Store

    try:
        with Store(Settings().db_path, read_only=not write) as store:
            try:
                columns, rows = store.sql(query)
            except TextadaptError as e:
                if not write and "read-only" in str(e):
                    raise TextadaptError(f"this statement writes to the cache, which `textadapt sql` opens read-only; add --write if you mean it ({e})") from None
                raise
    except TextadaptError as e:
        _fail(e)
    if format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        w.writerows(rows)
    elif format == "json":
        print(json.dumps([dict(zip(columns, r)) for r in rows], default=str, indent=1))
    else:
        table = Table(*columns)
        for r in rows:
            table.add_row(*("NULL" if v is None else str(v) for v in r))
        out.print(table)


@app.command("datasets")
def list_datasets() -> None:
    """List the dataset specs textadapt can find."""
    from textadapt.datasets import known_datasets, load_spec

    settings = Settings()
    table = Table("name", "classes", "spec file")
    for name, path in sorted(known_datasets(settings.dataset_search_path).items()):
        try:
            n = str(len(load_spec(path).classes))
        except TextadaptError as e:
            n = f"invalid: {str(e).splitlines()[-1].strip()}"
        table.add_row(name, n, str(path))
    out.print(table)


if __name__ == "__main__":
    app()
