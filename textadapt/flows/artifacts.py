"""A run's results as Prefect artifacts, for the Prefect UI (flow run page, and Artifacts by key).

Three Markdown artifacts per run, keyed by dataset so the UI keeps each dataset's history under one
key (``textadapt-DATASET-gains``, ``-per-class``, ``-report``):

- the gains per method: top-1, mean per-class accuracy, and both deltas against the best training-free
  baseline with their 95% intervals (the same numbers as the ``results`` table and the report);
- the per-class accuracy plot, as a PNG inside the Markdown (a ``data:`` URI). Prefect 3.8.8's
  image artifact takes only a URL and prints it under the image, and a run's files are not served
  anywhere; the UI's Markdown renderer shows a ``data:`` image as it is;
- where the Markdown and HTML reports are (paths on the machine that ran the flow: a browser does
  not follow ``file://`` links from the UI, so they are given as text).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from textadapt.report import RunReport, gains_markdown, markdown_blocks, per_class_png, untrained_warning


def artifact_key(dataset: str, what: str) -> str:
    """A valid artifact key (lowercase letters, digits and dashes) for one dataset's artifact."""
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or "dataset"
    return f"textadapt-{slug}-{what}"


def _heading(report: RunReport) -> list[str]:
    out = [f"# {report.spec.title or report.spec.name}: run `{report.run_id}`", ""]
    if report.untrained:
        out += [markdown_blocks(untrained_warning(report.arch)), ""]
    return out


@task(name="publish artifacts", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=2)
def publish_artifacts(report: RunReport, md_path: Path, html_path: Path) -> dict[str, str]:
    """Create the run's artifacts in the Prefect API the flow runs against; returns key -> artifact id."""
    name = report.spec.name
    made = {}
    key = artifact_key(name, "gains")
    made[key] = create_markdown_artifact(
        "\n".join(_heading(report) + [gains_markdown(report)]), key=key,
        description=f"Gains per method against the best zero-shot baseline, run {report.run_id}",
    )
    png = per_class_png(report)
    if png is not None:
        key = artifact_key(name, "per-class")
        image = base64.b64encode(png).decode("ascii")
        made[key] = create_markdown_artifact(
            "\n".join(_heading(report) + [f"![accuracy per class: {report.best_baseline} and the adapted methods]"
                                          f"(data:image/png;base64,{image})"]),
            key=key, description=f"Accuracy per class, run {report.run_id}",
        )
    key = artifact_key(name, "report")
    made[key] = create_markdown_artifact(
        "\n".join(_heading(report) + [
            f"- HTML report (plots, confusion matrix, descriptions): `{html_path}`",
            f"- Markdown report: `{md_path}`",
            f"- everything behind it: `textadapt sql \"SELECT * FROM results WHERE run_id = '{report.run_id}'\"`",
        ]),
        key=key, description=f"Where the reports of run {report.run_id} are",
    )
    return {k: str(v) for k, v in made.items()}
