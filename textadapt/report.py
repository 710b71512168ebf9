"""The run report: Markdown, written next to the cache and recorded in ``runs.report_path``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from textadapt.adapters import TrainedHead
from textadapt.datasets import DatasetSpec
from textadapt.harness import MethodResult
from textadapt.pipeline import GenerationStats, TrainingSet
from textadapt.scoring import Score

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
    path = reports_dir / r.spec.name / f"{r.run_id}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(r), encoding="utf-8")
    return path
