"""The run report: built once as a ``Page`` (what it says), then rendered by Jinja templates shipped in
``textadapt/templates``: Markdown (recorded in ``runs.report_path``) and, beside it, a self-contained HTML
page with plots (``textadapt.plots``). The HTML template autoescapes every value; the Markdown template
escapes every value for Markdown (``_markdown_escape``), so no LLM text or class name can add markup.

Every table is built from generic structures (``RunReport.scores`` is method -> Score), so a new method
shows up in every table and plot without a change here. Every gain carries its 95% interval
(``RunReport.gains``, from ``harness.gains``: a paired bootstrap over the test images).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import numpy as np
from markupsafe import Markup

from textadapt import plots
from textadapt.adapters import TrainedHead
from textadapt.datasets import DatasetSpec
from textadapt.harness import MethodResult
from textadapt.pipeline import GenerationStats, TrainingSet
from textadapt.scoring import Score
from textadapt.stats import Differences, Interval
from textadapt.store import LlmUsage


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
    gains: Differences | None = None  # harness.gains(results, ...): every delta's interval; needed when scored
    figures: dict[str, bytes] = field(default_factory=dict, repr=False)  # PNGs drawn so far, by name (per_class_png)


# --------------------------------------------------------------------------------------------
# The report model: what the report says, for every format. Inline text is a list of parts: a
# plain str, a Code (shown as code) or a Strong; a table cell is one of those, a Num (right-aligned,
# coloured by its sign in HTML) or a list of str (shown as a list).


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Strong:
    text: str


@dataclass(frozen=True)
class Num:
    text: str
    sign: int = 0  # +1: a gain whose interval lies above 0; -1: below 0


@dataclass
class Table:
    header: list[str]
    rows: list[list]

    @property
    def numeric(self) -> list[bool]:
        """Which columns hold numbers (right-aligned)."""
        return [
            bool(self.rows) and all(isinstance(row[j], Num) or row[j] == "" for row in self.rows) for j in range(len(self.header))
        ]


@dataclass
class Figure:
    """A plot: shown in the HTML page (inline PNG), left out of the Markdown."""

    png: bytes
    alt: str
    caption: list | None = None  # inline parts

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class Paragraph:
    parts: list


@dataclass
class Alert:
    """A paragraph that must not be missed (bold; framed in red in HTML)."""

    parts: list


@dataclass
class Section:
    title: list  # inline parts
    blocks: list  # Paragraph, Alert, Table, Figure


@dataclass
class Page:
    title: str
    warning: Alert | None  # None: a trained backbone
    facts: list[list]  # the bullets under the title
    sections: list[Section]
    footer: list


def untrained_warning(arch: str) -> Alert:
    """The warning every output of an untrained run carries (the report, the Prefect artifacts)."""
    return Alert(
        [
            f"UNTRAINED BACKBONE: {arch} has random weights, so every accuracy in this report is noise and means nothing. "
            "The pipeline ran for real; use a pretrained backbone (e.g. ",
            Code("--backbone ViT-B-32:openai"),
            " with network access) for numbers that mean something.",
        ]
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None or np.isnan(x) else f"{100 * x:.1f}"


def _pm(x: float, std: float | None) -> str:
    return _pct(x) + (f" ± {100 * std:.1f}" if std is not None else "")


def _gain(i: Interval, reference: bool = False) -> Num:
    """A delta in points with its 95% interval: ``+1.2 (-0.3, +2.7)``."""
    if reference:
        return Num("reference")
    if np.isnan(i.value):
        return Num("n/a")
    ci = "" if np.isnan(i.low) else f" ({100 * i.low:+.1f}, {100 * i.high:+.1f})"
    return Num(f"{100 * i.value:+.1f}{ci}", i.sign)


def build(r: RunReport) -> Page:
    """The whole report as one ``Page``, rendered by ``render_markdown`` and ``render_html``."""
    spec = r.spec
    facts = [
        ["run: ", Code(r.run_id), f", {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"],
        [
            "backbone: ",
            Code(r.backbone_spec),
            " (cache identity ",
            Code(r.backbone_id),
            ")",
            *([" ", Strong("UNTRAINED")] if r.untrained else []),
        ],
        ["LLM: ", Code(r.llm)],
        [f"test images: {r.n_images} from ", Code(r.image_source), f", {len(spec.classes)} classes"],
        [f"adapters: {r.steps} full-batch steps, seeds {', '.join(map(str, r.seeds or [r.seed]))} (mean and spread over seeds)"],
    ]
    sections = _results(r) + [_training(r), _descriptions(r), _llm_cost(r)]
    if r.stage_seconds:
        stages = Table(["stage", "seconds"], [[k, Num(f"{v:.1f}")] for k, v in r.stage_seconds.items()])
        figure = Figure(plots.stage_seconds(r.stage_seconds), "seconds per stage of the run")
        sections.append(Section(["Time per stage"], [figure, stages]))
    footer = [
        "Query everything behind this report: ",
        Code(f"textadapt sql \"SELECT * FROM results WHERE run_id = '{r.run_id}'\""),
        "; compare it with another run: ",
        Code(f"textadapt compare {r.run_id} OTHER_RUN_ID"),
    ]
    return Page(
        f"textadapt report: {spec.title or spec.name}",
        untrained_warning(r.arch) if r.untrained else None,
        facts,
        sections,
        footer,
    )


def _results_intro(r: RunReport) -> Paragraph:
    g = r.gains
    return Paragraph(
        [
            "Best training-free baseline: ",
            Code(r.best_baseline),
            ". Deltas are in accuracy points against it, "
            f"with their {100 * g.level:.0f}% confidence interval in parentheses: a paired bootstrap over the "
            f"{r.n_images} test images ({g.n_resamples} resamples; a method's correctness on an image is the mean "
            "over its seeds). Green or red in the HTML page: the interval excludes 0. Trained methods (and "
            "WaffleCLIP's random draws): mean ± spread over seeds.",
        ]
    )


def _results_table(r: RunReport) -> Table:
    top5 = any(res.score.top5 is not None for res in r.results)
    rows = []
    for g in gains(r):
        ref = g.method == r.best_baseline
        rows.append(
            [
                Code(g.method),
                g.kind,
                g.scoring,
                Num("" if g.n_texts is None else str(g.n_texts)),
                Num(_pm(g.top1, g.top1_std)),
                *([Num(_pct(g.top5))] if top5 else []),
                Num(_pm(g.mean_per_class, g.mean_per_class_std)),
                _gain(g.delta_top1, ref),
                _gain(g.delta_mean_per_class, ref),
            ]
        )
    return Table(
        [
            "method",
            "kind",
            "scoring",
            "training texts",
            "top-1 %",
            *(["top-5 %"] if top5 else []),
            "mean per-class %",
            "top-1 delta",
            "mean per-class delta",
        ],
        rows,
    )


_TRAIN_ONLY = Paragraph(["None: a ", Code("--train-only"), " run trains the heads without scoring them on images."])


def _results(r: RunReport) -> list[Section]:
    if r.best_baseline is None:
        return [Section(["Results"], [_TRAIN_ONLY])]
    if r.gains is None:
        raise ValueError("RunReport.gains is missing: pass harness.gains(results, labels, n_classes) for a scored run")
    g, best = r.gains, r.scores[r.best_baseline]
    methods = [res.method for res in r.results]
    adapted = [res.method for res in r.results if res.classifier.kind == "adapted"]
    others = [m for m in methods if m != r.best_baseline]
    results = Section(["Results"], [_results_intro(r), _results_table(r)])
    if others:
        at = [g.methods.index(m) for m in others]
        png = plots.gains(others, 100 * g.top1[at], 100 * g.top1_low[at], 100 * g.top1_high[at], r.best_baseline)
        results.blocks.insert(1, Figure(png, f"top-1 gain of every method over {r.best_baseline}, with 95% intervals"))
    rows = []
    for i, c in enumerate(r.spec.classes):
        rows.append(
            [
                c,
                Num(str(int(best.n_per_class[i]))),
                *(Num(_pct(r.scores[m].per_class[i])) for m in methods),
                *(_gain(g.class_interval(m, i)) for m in adapted),
            ]
        )
    per_class = Section(
        ["Per class"],
        [
            Figure(per_class_png(r), "accuracy per class: best training-free baseline and adapted methods"),
            Paragraph(
                [
                    "Accuracy (recall) per class, % (mean over seeds), of every method; delta columns: each adapted method "
                    f"minus the best training-free baseline, with its {100 * g.level:.0f}% interval (a paired bootstrap over "
                    "the class's images)."
                ]
            ),
            Table(["class", "images", *methods, *(f"delta {m}" for m in adapted)], rows),
        ],
    )
    out = [results, per_class]
    top = best_adapted(r)
    if top is not None and r.scores[top].confusion is not None:
        out.append(
            Section(
                ["Confusion matrix: ", Code(top)],
                [
                    Figure(
                        plots.confusion(r.spec.classes, r.scores[top].confusion, f"{top}: true vs predicted class"),
                        f"confusion matrix of {top}",
                        [
                            "The adapted method with the best top-1. Rows: true class; columns: predicted "
                            "class; counts over all its seeds."
                        ],
                    )
                ],
            )
        )
    return out


def _training(r: RunReport) -> Section:
    seconds = {res.classifier.method: sum(h.seconds for h in res.classifier.heads) for res in r.results}
    rows = [
        [
            Code(m),
            Num(f"{h.losses[0]:.3f}"),
            Num(f"{h.losses[-1]:.3f}"),
            Num(f"{seconds.get(m, h.seconds):.2f}"),
            h.device,
            "an earlier run (cache)" if h.cached else "this run",
        ]
        for m, h in r.heads.items()
    ]
    return Section(
        ["Training"],
        [
            Paragraph(
                [
                    f"{r.steps} full-batch steps. Loss of the first seed's run, at its first and last step; seconds: all "
                    "seeds. Trained by: this run, or an earlier one (a head whose inputs are unchanged is read back from the "
                    "cache, with the losses and seconds of when it was trained)."
                ]
            ),
            Table(["adapter", "first loss", "last loss", "seconds", "device", "trained by"], rows),
        ],
    )


def _descriptions(r: RunReport) -> Section:
    g, spec = r.generation, r.spec
    made = (
        " (nothing generated: every answer was already cached)."
        if g.made == 0
        else f"; {g.completion_tokens} completion tokens in {g.seconds:.0f} s."
    )
    blocks = [
        Paragraph(
            [
                f"{g.planned} generations planned: {g.made} LLM calls made by this run, {g.cached} served from the "
                f"cache{made} "
                f"Text encoder: {r.text_encoder_calls} texts encoded, the rest from the cache. "
                f"Image encoder: {r.image_encoder_calls} images encoded, the rest from the cache."
            ]
        )
    ]
    rows = []
    for ts in r.sets.values():
        why = ", ".join(f"{k}: {v}" for k, v in sorted(ts.rejected.items())) or "none"
        left = ", ".join(f"{k}: {v}" for k, v in sorted(ts.excluded.items())) or "none"
        rows.append(
            [ts.template_set, Num(str(ts.generations)), f"{sum(ts.rejected.values())} ({why})", left, Num(str(len(ts.texts)))]
        )
    blocks.append(Table(["template set", "generations", "rejected", "left out by this run", "trained on (descriptions)"], rows))
    total = sum(len(ts.texts) for ts in r.sets.values())
    generations = sum(ts.generations for ts in r.sets.values())
    rejected = sum(sum(ts.rejected.values()) for ts in r.sets.values())
    blocks.append(
        Paragraph(
            [
                f"Trained on {total} descriptions in all, from {generations} generations ({rejected} rejected; a "
                "list answer gives several descriptions, a duplicate none)."
            ]
        )
    )
    for name, classes in r.filled.items():
        blocks.append(
            Paragraph(
                [
                    Strong(f"{name}: no accepted description for {len(classes)} classes"),
                    ', trained on "a photo of a {class}." for them (counted below): ',
                    ", ".join(classes[:30]) + (" ..." if len(classes) > 30 else "."),
                ]
            )
        )
    names = list(r.sets)
    counts = {n: np.bincount(ts.labels, minlength=len(spec.classes)) for n, ts in r.sets.items()}
    blocks.append(Paragraph(["Descriptions each head trained on, per class, and a few examples as the LLM wrote them:"]))
    rows = [[c, *(Num(str(int(counts[n][i]))) for n in names), list(r.examples.get(c, []))] for i, c in enumerate(spec.classes)]
    blocks.append(Table(["class", *names, "examples"], rows))
    return Section(["Descriptions"], blocks)


def _llm_cost(r: RunReport) -> Section:
    g = r.generation
    blocks = [
        Paragraph(
            [
                f"This run asked the LLM for {g.made} generations ({g.completion_tokens} completion tokens, "
                f"{g.seconds:.1f} s) and took {g.cached} from the cache. The generations it used cost, when they "
                "were made:"
            ]
        )
    ]
    if not r.llm_usage:
        blocks.append(Paragraph(["None recorded: the run used no stored generation."]))
        return Section(["LLM tokens"], blocks)
    total = LlmUsage(
        *(
            sum(getattr(u, f) for u in r.llm_usage.values())
            for f in ("generations", "prompt_tokens", "completion_tokens", "seconds")
        )
    )
    rows = [
        [
            Strong("all") if s is None else s,
            Num(str(u.generations)),
            Num(str(u.prompt_tokens)),
            Num(str(u.completion_tokens)),
            Num(f"{u.seconds:.1f}"),
        ]
        for s, u in [*r.llm_usage.items(), (None, total)]
    ]
    blocks.append(Table(["template set", "generations", "prompt tokens", "completion tokens", "LLM seconds"], rows))
    return Section(["LLM tokens"], blocks)


# --------------------------------------------------------------------------------------------
# Rendering


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~#])")


def _markdown_escape(value) -> Markup:
    """Any value as literal Markdown text: every character Markdown (or HTML inside it) could read as markup is
    backslash-escaped, and line breaks become spaces (a table row is one line)."""
    if hasattr(value, "__html__"):  # already rendered by the template: a macro's output, a filter's
        return value
    return Markup(_MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(value).splitlines())))


def _markdown_code(text: str, in_table: bool = False) -> Markup:
    """A Markdown code span holding ``text`` as it is: fenced by more backticks than it contains."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    if in_table:
        text = text.replace("|", "\\|")  # GFM ends a cell at any unescaped |, code span or not
    return Markup(f"{fence}{pad}{text}{pad}{fence}")


def _environment(markdown: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("textadapt", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        # Markdown: Jinja escapes what finalize returns with HTML's rules, which leave a Markup alone;
        # finalize makes every value Markdown-escaped Markup first.
        finalize=_markdown_escape if markdown else None,
    )
    env.tests.update(
        code=lambda x: isinstance(x, Code),
        strong=lambda x: isinstance(x, Strong),
        num=lambda x: isinstance(x, Num),
        table=lambda x: isinstance(x, Table),
        figure=lambda x: isinstance(x, Figure),
        alert=lambda x: isinstance(x, Alert),
        list=lambda x: isinstance(x, list),
    )
    if markdown:
        env.filters["code"] = _markdown_code
    return env


_ENVIRONMENTS: dict[str, jinja2.Environment] = {}


def _template(name: str) -> jinja2.Template:
    """A template of textadapt/templates: ``*.md.j2`` in the Markdown environment, the others in the HTML one."""
    markdown = name.endswith(".md.j2")
    if markdown not in _ENVIRONMENTS:
        _ENVIRONMENTS[markdown] = _environment(markdown)
    return _ENVIRONMENTS[markdown].get_template(name)


def render_markdown(r: RunReport) -> str:
    return _template("report.md.j2").render(page=build(r))


def render_html(r: RunReport) -> str:
    return _template("report.html.j2").render(page=build(r))


def write_report(r: RunReport, reports_dir: Path) -> Path:
    """Write the Markdown report and, next to it, the HTML page (``html_path``); returns the Markdown's path."""
    path = reports_dir / r.spec.name / f"{r.run_id}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    page = build(r)
    path.write_text(_template("report.md.j2").render(page=page), encoding="utf-8")
    html_path(path).write_text(_template("report.html.j2").render(page=page), encoding="utf-8")
    return path


def html_path(markdown_path: Path) -> Path:
    """Where ``write_report`` puts the HTML page of a Markdown report: beside it, same name."""
    return markdown_path.with_suffix(".html")


def markdown_blocks(*blocks) -> str:
    """Report blocks (Paragraph, Table, ...) as Markdown, the way the report renders them."""
    return str(_template("blocks.md.j2").module.blocks(list(blocks))).strip()


# --------------------------------------------------------------------------------------------
# Gains per method: the numbers the report and the Prefect artifacts both show


@dataclass
class Gain:
    method: str
    kind: str  # the classifier's kind: zero-shot, descriptions or adapted
    scoring: str  # plain or ig
    n_texts: int | None  # descriptions it was built from
    top1: float  # mean over seeds
    top1_std: float | None  # spread over seeds; None: one seed
    top5: float | None
    mean_per_class: float
    mean_per_class_std: float | None
    delta_top1: Interval  # against the best training-free baseline, with its 95% interval
    delta_mean_per_class: Interval


def gains(r: RunReport) -> list[Gain]:
    """Every scored method, in the harness's order, against the best training-free baseline; [] for a --train-only run."""
    if r.best_baseline is None:
        return []
    if r.gains is None:
        raise ValueError("RunReport.gains is missing: pass harness.gains(results, labels, n_classes) for a scored run")
    best = r.scores[r.best_baseline]
    out = []
    for res in r.results:
        top1, mean = r.gains.top1_interval(res.method), r.gains.mean_per_class_interval(res.method)
        # the point deltas as the results table stores them (the means over seeds, subtracted)
        top1 = Interval(res.score.top1 - best.top1, top1.low, top1.high)
        mean = Interval(res.score.mean_per_class - best.mean_per_class, mean.low, mean.high)
        out.append(
            Gain(
                res.method,
                res.classifier.kind,
                res.scoring,
                res.classifier.n_texts,
                res.score.top1,
                res.top1_std,
                res.score.top5,
                res.score.mean_per_class,
                res.mean_per_class_std,
                top1,
                mean,
            )
        )
    return out


def best_adapted(r: RunReport) -> str | None:
    """The adapted method with the highest top-1 (None if nothing adapted was scored)."""
    adapted = [res for res in r.results if res.classifier.kind == "adapted"]
    return max(adapted, key=lambda res: res.score.top1).method if adapted else None


def gains_markdown(r: RunReport) -> str:
    """The report's results paragraph and table, as Markdown: the Prefect artifact's body."""
    if r.best_baseline is None:
        return markdown_blocks(_TRAIN_ONLY)
    return markdown_blocks(_results_intro(r), _results_table(r))


def per_class_png(r: RunReport) -> bytes | None:
    """The per-class chart: the best training-free baseline against every adapted method (None without scores). Drawn
    once per report: the HTML page and the Prefect artifact show the same PNG."""
    if r.best_baseline is None:
        return None
    if r.figures.get("per-class") is None:
        shown = [r.best_baseline, *[res.method for res in r.results if res.classifier.kind == "adapted"]]
        r.figures["per-class"] = plots.per_class_accuracy(
            r.spec.classes, {m: r.scores[m].per_class for m in shown}, r.best_baseline
        )
    return r.figures["per-class"]
