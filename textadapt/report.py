"""The run report: Markdown (recorded in ``runs.report_path``) and, beside it, a self-contained HTML page
with plots (``textadapt.plots``). Both are rendered from generic structures (``RunReport.scores`` is
method -> Score), so a new method shows up in every table and plot without a change here."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import numpy as np

from textadapt import plots
from textadapt.adapters import TrainedHead
from textadapt.datasets import DatasetSpec
from textadapt.harness import MethodResult
from textadapt.pipeline import GenerationStats, TrainingSet
from textadapt.scoring import Score
from textadapt.store import LlmUsage

UNTRAINED_WARNING = (
    "**UNTRAINED BACKBONE: {arch} has random weights, so every "
    "accuracy in this report is noise and means nothing.** The pipeline ran for real; use a pretrained "
    "backbone (e.g. `--backbone ViT-B-32:openai` with network access) for numbers that mean something."
)


@dataclass
class RunReport:
    run_id: str
    spec: DatasetSpec
    backbone_spec: str
    backbone_id: str
    untrained: bool
    arch: str
    llm: str
    image_source: str
    n_images: int
    generation: GenerationStats
    sets: dict[str, TrainingSet]
    scores: dict[str, Score]
    heads: dict[str, TrainedHead]
    best_baseline: str | None  # None: a --train-only run, nothing scored
    text_encoder_calls: int
    image_encoder_calls: int
    steps: int
    seed: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # class -> a few descriptions
    filled: dict[str, list[str]] = field(default_factory=dict)  # set -> classes trained on the fallback prompt
    results: list[MethodResult] = field(default_factory=list)  # every method, in the harness's order
    seeds: list[int] = field(default_factory=list)
    llm_usage: dict[str, LlmUsage] = field(default_factory=dict)  # template set -> cost of the generations used


def _pct(x: float | None) -> str:
    return "n/a" if x is None or np.isnan(x) else f"{100 * x:.1f}"


def _delta(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{100 * x:+.1f}"


def render_markdown(r: RunReport) -> str:
    spec, out = r.spec, []
    if r.untrained:
        out += [UNTRAINED_WARNING.format(arch=r.arch), ""]
    out += [
        f"# textadapt report: {spec.title or spec.name}",
        "",
        f"- run: `{r.run_id}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- backbone: `{r.backbone_spec}` (cache identity `{r.backbone_id}`){' UNTRAINED' if r.untrained else ''}",
        f"- LLM: `{r.llm}`",
        f"- test images: {r.n_images} from `{r.image_source}`, {len(spec.classes)} classes",
        f"- adapters: {r.steps} full-batch steps, seeds {', '.join(map(str, r.seeds or [r.seed]))} (mean and spread over seeds)",
        "",
        "## Generation",
        "",
        f"{r.generation.planned} generations planned: {r.generation.made} LLM calls made by this run, "
        f"{r.generation.cached} served from the cache"
        + (" (nothing generated: every answer was already cached)." if r.generation.made == 0 else
           f"; {r.generation.completion_tokens} completion tokens in {r.generation.seconds:.0f} s."),
        f"Text encoder: {r.text_encoder_calls} texts encoded, the rest from the cache. "
        f"Image encoder: {r.image_encoder_calls} images encoded, the rest from the cache.",
        "",
        "| template set | generations | rejected | left out by this run | trained on (descriptions) |",
        "|---|---:|---:|---:|---:|",
    ]
    for ts in r.sets.values():
        why = ", ".join(f"{k}: {v}" for k, v in sorted(ts.rejected.items())) or "none"
        left = ", ".join(f"{k}: {v}" for k, v in sorted(ts.excluded.items())) or "none"
        out.append(f"| {ts.template_set} | {ts.generations} | {sum(ts.rejected.values())} ({why}) | {left} | {len(ts.texts)} |")
    total = sum(len(ts.texts) for ts in r.sets.values())
    generations = sum(ts.generations for ts in r.sets.values())
    rejected = sum(sum(ts.rejected.values()) for ts in r.sets.values())
    out += ["", f"Trained on {total} descriptions in all, from {generations} generations ({rejected} rejected; "
            "a list answer gives several descriptions, a duplicate none).", ""]
    names = list(r.sets)
    out += ["Descriptions trained on, per class:", "", "| class | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    counts = {n: np.bincount(ts.labels, minlength=len(spec.classes)) for n, ts in r.sets.items()}
    out += [f"| {c} | " + " | ".join(str(int(counts[n][i])) for n in names) + " |" for i, c in enumerate(spec.classes)]
    out.append("")
    for name, classes in r.filled.items():
        out += [f"**{name}: no accepted description for {len(classes)} classes**, trained on \"a photo of a {{class}}.\" "
                f"for them (counted above): {', '.join(classes[:30])}{' ...' if len(classes) > 30 else ''}.", ""]
    if r.best_baseline is None:
        out += ["## Results", "", "None: a `--train-only` run trains the heads without scoring them on images.", ""]
    else:
        out += _results(r)
    out += _training(r)
    return "\n".join(out)


def _pm(x: float, std: float | None) -> str:
    return _pct(x) + (f" ± {100 * std:.1f}" if std is not None else "")


def _results(r: RunReport) -> list[str]:
    spec, out = r.spec, []
    best = r.scores[r.best_baseline]
    top5 = any(res.score.top5 is not None for res in r.results)
    out += [
        "## Results",
        "",
        f"Best training-free baseline: `{r.best_baseline}`. Deltas are in accuracy points against it. "
        "Trained methods (and WaffleCLIP's random draws): mean ± spread over seeds.",
        "",
        "| method | kind | scoring | training texts | top-1 % | " + ("top-5 % | " if top5 else "") + "mean per-class % | top-1 delta |",
        "|---|---|---|---:|---:|" + ("---:|" if top5 else "") + "---:|---:|",
    ]
    for res in r.results:
        s, c = res.score, res.classifier
        out.append(f"| `{res.method}` | {c.kind} | {res.scoring} | {c.n_texts if c.n_texts is not None else ''} | "
                   f"{_pm(s.top1, res.top1_std)} | " + (f"{_pct(s.top5)} | " if top5 else "")
                   + f"{_pm(s.mean_per_class, res.mean_per_class_std)} | {_delta(s.top1 - best.top1)} |")

    shown = [res.method for res in r.results if res.classifier.kind != "adapted" and res.scoring == "plain"]
    adapted = [res.method for res in r.results if res.classifier.kind == "adapted"]
    out += ["", "## Per class", "", "Accuracy (recall) per class, %, of the training-free methods; delta columns: each adapted "
            "method minus the best training-free baseline.", ""]
    out.append("| class | images | " + " | ".join(f"`{m}`" for m in shown) + " | " + " | ".join(f"delta `{h}`" for h in adapted) + " |")
    out.append("|---|---:|" + "---:|" * (len(shown) + len(adapted)))
    for i, c in enumerate(spec.classes):
        accs = " | ".join(_pct(r.scores[m].per_class[i]) for m in shown)
        deltas = " | ".join(_delta(r.scores[h].per_class[i] - best.per_class[i]) for h in adapted)
        out.append(f"| {c} | {int(best.n_per_class[i])} | {accs} | {deltas} |")
    return out


def _training(r: RunReport) -> list[str]:
    out = ["", "## Training", "", "Loss of the first seed's run, every 10 steps summarised by its first and last value; seconds: all seeds.",
           "", "| adapter | first loss | last loss | seconds | device |", "|---|---:|---:|---:|---|"]
    seconds = {res.classifier.method: sum(h.seconds for h in res.classifier.heads) for res in r.results}
    for m, h in r.heads.items():
        out.append(f"| `{m}` | {h.losses[0]:.3f} | {h.losses[-1]:.3f} | {seconds.get(m, h.seconds):.2f} | {h.device} |")

    if r.stage_seconds:
        out += ["", "## Time per stage", "", "| stage | seconds |", "|---|---:|"]
        out += [f"| {k} | {v:.1f} |" for k, v in r.stage_seconds.items()]

    if r.examples:
        out += ["", "## Example descriptions", ""]
        for c, texts in r.examples.items():
            out.append(f"- **{c}**: " + " / ".join(f"\"{t}\"" for t in texts))
    out += ["", "Query everything behind this report: `textadapt sql \"SELECT * FROM results WHERE run_id = '" + r.run_id + "'\"`", ""]
    return out


def write_report(r: RunReport, reports_dir: Path) -> Path:
    """Write the Markdown report and, next to it, the HTML page (``html_path``); returns the Markdown's path."""
    path = reports_dir / r.spec.name / f"{r.run_id}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(r), encoding="utf-8")
    html_path(path).write_text(render_html(r), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Gains per method: the numbers the HTML page and the Prefect artifacts both show


@dataclass
class Gain:
    method: str
    kind: str  # the classifier's kind: zero-shot, descriptions or adapted
    scoring: str  # plain or ig
    n_texts: int | None  # descriptions it was built from
    top1: float  # mean over seeds
    top1_std: float | None  # spread over seeds; None: one seed
    mean_per_class: float
    mean_per_class_std: float | None
    delta_top1: float  # against the best training-free baseline
    delta_mean_per_class: float


def gains(r: RunReport) -> list[Gain]:
    """Every scored method, in the harness's order, against the best training-free baseline; [] for a --train-only run."""
    if r.best_baseline is None:
        return []
    best = r.scores[r.best_baseline]
    return [Gain(res.method, res.classifier.kind, res.scoring, res.classifier.n_texts, res.score.top1, res.top1_std,
                 res.score.mean_per_class, res.mean_per_class_std, res.score.top1 - best.top1,
                 res.score.mean_per_class - best.mean_per_class) for res in r.results]


def best_adapted(r: RunReport) -> str | None:
    """The adapted method with the highest top-1 (None if nothing adapted was scored)."""
    adapted = [res for res in r.results if res.classifier.kind == "adapted"]
    return max(adapted, key=lambda res: res.score.top1).method if adapted else None


def gains_markdown(r: RunReport) -> str:
    """A Markdown table of ``gains``: the Prefect artifact's body."""
    if r.best_baseline is None:
        return "No results: a `--train-only` run trains the heads without scoring them on images."
    out = [f"Best training-free baseline: `{r.best_baseline}`; deltas in accuracy points against it; "
           "± the spread over seeds.", "",
           "| method | kind | scoring | training texts | top-1 % | mean per-class % | top-1 delta | mean per-class delta |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for g in gains(r):
        out.append(f"| `{g.method}` | {g.kind} | {g.scoring} | {'' if g.n_texts is None else g.n_texts} | {_pm(g.top1, g.top1_std)} | "
                   f"{_pm(g.mean_per_class, g.mean_per_class_std)} | {_delta(g.delta_top1)} | {_delta(g.delta_mean_per_class)} |")
    return "\n".join(out)


def per_class_png(r: RunReport) -> bytes | None:
    """The per-class chart: the best training-free baseline against every adapted method (None without scores)."""
    if r.best_baseline is None:
        return None
    shown = [r.best_baseline, *[res.method for res in r.results if res.classifier.kind == "adapted"]]
    return plots.per_class_accuracy(r.spec.classes, {m: r.scores[m].per_class for m in shown}, r.best_baseline)


# --------------------------------------------------------------------------------------------
# The HTML page: one self-contained file (inline CSS, plots as base64 PNG), every text escaped

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.pos { color: #1a7f37; } .neg { color: #c62828; }
.warning { background: #fff3cd; border: 2px solid #c62828; padding: 0.8em; font-weight: bold; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2em; }
ul.examples { margin: 0; padding-left: 1.2em; }
"""


def html_path(markdown_path: Path) -> Path:
    """Where ``write_report`` puts the HTML page of a Markdown report: beside it, same name."""
    return markdown_path.with_suffix(".html")


def _e(x: object) -> str:
    return escape(str(x), quote=True)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _num_td(text: str, delta: float | None = None) -> str:
    cls = "n" if delta is None or np.isnan(delta) or delta == 0 else ("n pos" if delta > 0 else "n neg")
    return f'<td class="{cls}">{_e(text)}</td>'


def _table(header: list[str], rows: list[str]) -> str:
    return "<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>\n" + "\n".join(rows) + "</table>"


def render_html(r: RunReport) -> str:
    spec = r.spec
    title = f"textadapt report: {spec.title or spec.name}"
    out = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>',
           f"<style>{_CSS}</style></head><body>"]
    if r.untrained:
        out.append(f'<p class="warning">UNTRAINED BACKBONE: {_e(r.arch)} has random weights, so every accuracy in this '
                   "report is noise and means nothing. The pipeline ran for real; use a pretrained backbone for numbers "
                   "that mean something.</p>")
    out += [f"<h1>{_e(title)}</h1><ul>",
            f"<li>run: <code>{_e(r.run_id)}</code>, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</li>",
            f"<li>backbone: <code>{_e(r.backbone_spec)}</code> (cache identity <code>{_e(r.backbone_id)}</code>)"
            f"{' <strong>UNTRAINED</strong>' if r.untrained else ''}</li>",
            f"<li>LLM: <code>{_e(r.llm)}</code></li>",
            f"<li>test images: {r.n_images} from <code>{_e(r.image_source)}</code>, {len(spec.classes)} classes</li>",
            f"<li>adapters: {r.steps} full-batch steps, seeds {_e(', '.join(map(str, r.seeds or [r.seed])))} "
            "(mean and spread over seeds)</li></ul>"]
    out += _html_results(r)
    out += _html_descriptions(r)
    out += _html_cost(r)
    out.append(f"<p>Query everything behind this report: <code>textadapt sql \"SELECT * FROM results WHERE run_id = "
               f"'{_e(r.run_id)}'\"</code></p></body></html>\n")
    return "\n".join(out)


def _html_results(r: RunReport) -> list[str]:
    if r.best_baseline is None:
        return ["<h2>Results</h2><p>None: a <code>--train-only</code> run trains the heads without scoring them on images.</p>"]
    out = ["<h2>Results</h2>",
           f"<p>Best training-free baseline: <code>{_e(r.best_baseline)}</code>. Deltas are in accuracy points against it. "
           "Trained methods (and random draws): mean ± spread over seeds.</p>"]
    rows = [f"<tr><td><code>{_e(g.method)}</code></td><td>{_e(g.kind)}</td><td>{_e(g.scoring)}</td>"
            f"{_num_td('' if g.n_texts is None else str(g.n_texts))}{_num_td(_pm(g.top1, g.top1_std))}"
            f"{_num_td(_pm(g.mean_per_class, g.mean_per_class_std))}{_num_td(_delta(g.delta_top1), g.delta_top1)}"
            f"{_num_td(_delta(g.delta_mean_per_class), g.delta_mean_per_class)}</tr>" for g in gains(r)]
    out.append(_table(["method", "kind", "scoring", "training texts", "top-1 %", "mean per-class %", "top-1 delta",
                       "mean per-class delta"], rows))

    best, methods = r.scores[r.best_baseline], [res.method for res in r.results]
    adapted = [res.method for res in r.results if res.classifier.kind == "adapted"]
    out += ["<h2>Per class</h2>", _img(per_class_png(r), "accuracy per class: best training-free baseline and adapted methods"),
            "<p>Accuracy (recall) per class, % (mean over seeds); delta columns: each adapted method minus the best "
            "training-free baseline.</p>"]
    rows = []
    for i, c in enumerate(r.spec.classes):
        cells = "".join(_num_td(_pct(r.scores[m].per_class[i])) for m in methods)
        deltas = [r.scores[m].per_class[i] - best.per_class[i] for m in adapted]
        rows.append(f"<tr><td>{_e(c)}</td>{_num_td(str(int(best.n_per_class[i])))}{cells}"
                    + "".join(_num_td(_delta(d), d) for d in deltas) + "</tr>")
    out.append(_table(["class", "images", *methods, *(f"delta {m}" for m in adapted)], rows))

    top = best_adapted(r)
    if top is not None and r.scores[top].confusion is not None:
        out += [f"<h2>Confusion matrix: <code>{_e(top)}</code></h2>",
                "<p>The adapted method with the best top-1. Rows: true class; columns: predicted class; counts over "
                "all its seeds.</p>",
                _img(plots.confusion(r.spec.classes, r.scores[top].confusion, f"{top}: true vs predicted class"),
                     f"confusion matrix of {top}")]
    return out


def _html_descriptions(r: RunReport) -> list[str]:
    names = list(r.sets)
    counts = {n: np.bincount(ts.labels, minlength=len(r.spec.classes)) for n, ts in r.sets.items()}
    out = ["<h2>Descriptions per class</h2>",
           "<p>Descriptions each head trained on, per class, and a few examples as the LLM wrote them.</p>"]
    rows = []
    for i, c in enumerate(r.spec.classes):
        examples = "".join(f"<li>{_e(t)}</li>" for t in r.examples.get(c, []))
        rows.append(f"<tr><td>{_e(c)}</td>" + "".join(_num_td(str(int(counts[n][i]))) for n in names)
                    + f'<td><ul class="examples">{examples}</ul></td></tr>')
    out.append(_table(["class", *names, "examples"], rows))
    for name, classes in r.filled.items():
        out.append(f"<p><strong>{_e(name)}: no accepted description for {len(classes)} classes</strong>, trained on "
                   f"&quot;a photo of a {{class}}.&quot; for them: {_e(', '.join(classes))}.</p>")
    return out


def _html_cost(r: RunReport) -> list[str]:
    g = r.generation
    out = ["<h2>LLM tokens</h2>",
           f"<p>This run asked the LLM for {g.made} generations ({g.completion_tokens} completion tokens, "
           f"{g.seconds:.1f} s) and took {g.cached} from the cache. The generations it used cost, when they were made:</p>"]
    if r.llm_usage:
        rows = [f"<tr><td>{_e(s)}</td>{_num_td(str(u.generations))}{_num_td(str(u.prompt_tokens))}"
                f"{_num_td(str(u.completion_tokens))}{_num_td(f'{u.seconds:.1f}')}</tr>" for s, u in r.llm_usage.items()]
        total = LlmUsage(*(sum(getattr(u, f) for u in r.llm_usage.values()) for f in
                           ("generations", "prompt_tokens", "completion_tokens", "seconds")))
        rows.append(f"<tr><th>all</th>{_num_td(str(total.generations))}{_num_td(str(total.prompt_tokens))}"
                    f"{_num_td(str(total.completion_tokens))}{_num_td(f'{total.seconds:.1f}')}</tr>")
        out.append(_table(["template set", "generations", "prompt tokens", "completion tokens", "LLM seconds"], rows))
    else:
        out.append("<p>None recorded: the run used no stored generation.</p>")

    out += ["<h2>Training</h2>", f"<p>{r.steps} full-batch steps. Loss of the first seed's run; seconds: all seeds.</p>"]
    seconds = {res.classifier.method: sum(h.seconds for h in res.classifier.heads) for res in r.results}
    rows = [f"<tr><td><code>{_e(m)}</code></td>{_num_td(f'{h.losses[0]:.3f}')}{_num_td(f'{h.losses[-1]:.3f}')}"
            f"{_num_td(f'{seconds.get(m, h.seconds):.2f}')}<td>{_e(h.device)}</td></tr>" for m, h in r.heads.items()]
    out.append(_table(["adapter", "first loss", "last loss", "seconds", "device"], rows))
    if r.stage_seconds:
        out += ["<h2>Time per stage</h2>", _img(plots.stage_seconds(r.stage_seconds), "seconds per stage of the run")]
        out.append(_table(["stage", "seconds"], [f"<tr><td>{_e(k)}</td>{_num_td(f'{v:.1f}')}</tr>" for k, v in r.stage_seconds.items()]))
    return out
