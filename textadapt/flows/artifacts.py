"""A run's results as Prefect artifacts, for the Prefect UI (flow run page, and Artifacts by key).

Keyed by dataset so the UI keeps each dataset's history under one key (``textadapt-DATASET-...``):

- ``-gains``, a table: every method's top-1 and mean per-class accuracy, and both gains against the best
  training-free baseline with their 95% intervals (the same numbers as the ``results`` table and the
  report), one row per method, one number per cell;
- ``-per-class``, Markdown: the per-class accuracy plot, as a PNG inside the Markdown (a ``data:`` URI).
  Prefect 3.8.8's image artifact takes only a URL and prints it under the image, and a run's files are
  not served anywhere; the UI's Markdown renderer shows a ``data:`` image as it is;
- ``-report``, Markdown: where the Markdown and HTML reports are (paths on the machine that ran the flow:
  a browser does not follow ``file://`` links from the UI, so they are given as text);
- ``-progress``, while the run generates: the share of its LLM generations done (``GenerationProgress``).
"""

from __future__ import annotations

import base64
import math
import re
import time
from pathlib import Path
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from textadapt.report import RunReport, gains, markdown_blocks, per_class_png, untrained_warning


def artifact_key(dataset: str, what: str) -> str:
    """A valid artifact key (lowercase letters, digits and dashes) for one dataset's artifact."""
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or "dataset"
    return f"textadapt-{slug}-{what}"


def _heading(report: RunReport) -> list[str]:
    out = [f"# {report.spec.title or report.spec.name}: run `{report.run_id}`", ""]
    if report.untrained:
        out += [markdown_blocks(untrained_warning(report.arch)), ""]
    return out


def _points(x: float | None) -> float | None:
    """A share as percent (or a difference of shares as points), 2 decimals; None for none or NaN (JSON has no NaN)."""
    return None if x is None or math.isnan(x) else round(100 * x, 2)


def gains_rows(report: RunReport) -> list[dict]:
    """The gains table: one row per scored method, in the harness's order (``report.gains``); accuracies in %, gains in
    points, each gain with its 95% interval; the best training-free baseline's gains are empty (it is the reference)."""
    rows = []
    for g in gains(report):
        ref = g.method == report.best_baseline
        row = {
            "method": g.method,
            "kind": g.kind,
            "scoring": g.scoring,
            "training texts": g.n_texts,
            "top-1 %": _points(g.top1),
            "top-1 sd": _points(g.top1_std),
        }
        if any(x.top5 is not None for x in gains(report)):
            row["top-5 %"] = _points(g.top5)
        row |= {"mean per-class %": _points(g.mean_per_class), "mean per-class sd": _points(g.mean_per_class_std)}
        for name, i in (("top-1", g.delta_top1), ("mean per-class", g.delta_mean_per_class)):
            row |= {
                f"{name} gain": None if ref else _points(i.value),
                f"{name} gain low": None if ref else _points(i.low),
                f"{name} gain high": None if ref else _points(i.high),
            }
        rows.append(row)
    return rows


def _gains_description(report: RunReport) -> str:
    if report.best_baseline is None:
        return "\n".join(_heading(report) + ["Nothing scored: a `--train-only` run trains the heads without scoring them."])
    g = report.gains
    return "\n".join(
        _heading(report)
        + [
            f"Gains in accuracy points over the best training-free baseline `{report.best_baseline}` (its row has none), each "
            f"with its {100 * g.level:.0f}% interval (low, high): a paired bootstrap over the {report.n_images} test images "
            f"({g.n_resamples} resamples). Accuracies in %; sd: the spread over seeds of trained methods (and WaffleCLIP's draws)."
        ]
    )


@task(name="publish artifacts", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=2)
def publish_artifacts(report: RunReport, md_path: Path, html_path: Path) -> dict[str, str]:
    """Create the run's artifacts in the Prefect API the flow runs against; returns key -> artifact id."""
    name = report.spec.name
    made = {}
    key = artifact_key(name, "gains")
    made[key] = create_table_artifact(gains_rows(report), key=key, description=_gains_description(report))
    png = per_class_png(report)
    if png is not None:
        key = artifact_key(name, "per-class")
        image = base64.b64encode(png).decode("ascii")
        made[key] = create_markdown_artifact(
            "\n".join(
                _heading(report)
                + [f"![accuracy per class: {report.best_baseline} and the adapted methods](data:image/png;base64,{image})"]
            ),
            key=key,
            description=f"Accuracy per class, run {report.run_id}",
        )
    key = artifact_key(name, "report")
    made[key] = create_markdown_artifact(
        "\n".join(
            _heading(report)
            + [
                f"- HTML report (plots, confusion matrix, descriptions): `{html_path}`",
                f"- Markdown report: `{md_path}`",
                f"- everything behind it: `textadapt sql \"SELECT * FROM results WHERE run_id = '{report.run_id}'\"`",
            ]
        ),
        key=key,
        description=f"Where the reports of run {report.run_id} are",
    )
    return {k: str(v) for k, v in made.items()}


class GenerationProgress:
    """``progress(done, total)``: the run's LLM generations done, as a Prefect progress artifact (``-progress``), sent at
    most every ``every`` seconds and when all are done. The artifact is a view: a Prefect API that does not answer
    costs the run a warning, never the run."""

    def __init__(self, dataset: str, run_id: str, every: float = 1.0):
        self.every, self._sent, self._failed = every, -math.inf, False
        self.id: UUID | None = self._call(
            create_progress_artifact,
            0.0,
            key=artifact_key(dataset, "progress"),
            description=f"LLM generations done, run {run_id} (the cache's own are not counted)",
        )

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.id is None or (done < total and now - self._sent < self.every):
            return
        self._sent = now
        self._call(update_progress_artifact, self.id, 100.0 * done / total if total else 100.0)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a view of the run: never its failure
            if not self._failed:
                get_run_logger().warning("the progress artifact could not be sent to the Prefect API (%s); the run goes on", e)
            self._failed = True
            return None
