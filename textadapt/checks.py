"""Checks before any work: everything a run can know is wrong with its inputs, found in seconds.

``preflight`` is what ``textadapt run`` calls before Prefect starts and before any LLM call; ``textadapt
datasets check`` runs the same checks on a whole dataset and prints a summary. Every problem is
collected, and they are reported together in one ``TextadaptError``, each naming its file or field:

- fields of the spec still holding a "FILL IN" placeholder (``datasets new`` writes them);
- the layout of the images: class folders missing, folders of images that are no class, classes
  without images (found while listing them: ``ImageSet.problems``);
- every image decoded completely (in threads: Pillow decodes outside the GIL), each bad file named;
- every template rendered for every class;
- the report folder writable.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from textadapt import TextadaptError
from textadapt.datasets import DatasetSpec, ImageSet, find_spec, load_test_images, placeholder_problems, restrict
from textadapt.images import Colour, open_rgb
from textadapt.prompts import PromptTemplate, check_templates, templates_for

# Files decoded without a problem in this process, by (path, size, mtime, background): `run` checks its images
# before Prefect starts and its flow checks them again (scheduled runs start there); the second time costs nothing.
_decoded: set[tuple[str, int, int, Colour]] = set()


def _identity(path: str, background: Colour) -> tuple[str, int, int, Colour]:
    st = os.stat(path)
    return (str(path), st.st_size, st.st_mtime_ns, background)


def _decode_problem(item, background: Colour) -> str | None:
    if not isinstance(item, (str, Path)):
        arr = np.asarray(item)
        ok = arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)))
        return None if ok else f"an in-memory image of shape {arr.shape} and type {arr.dtype} (expected uint8 HxW or HxWxC)"
    try:
        ident = _identity(item, background)
    except OSError as e:
        return f"{item}: cannot be read: {e.strerror or e}"
    if ident in _decoded:
        return None
    try:
        open_rgb(item, background)
    except TextadaptError as e:
        return str(e)
    _decoded.add(ident)
    return None


def decode_problems(images: ImageSet, workers: int | None = None) -> list[str]:
    """Decode every image completely; one line per image that fails, naming its file."""
    files = [x for x in images.images if isinstance(x, (str, Path))]
    arrays = [_decode_problem(x, images.background) for x in images.images if not isinstance(x, (str, Path))]  # no decoding
    workers = workers or min(32, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(pool.map(lambda x: _decode_problem(x, images.background), files, chunksize=16))
    return [p for p in arrays + found if p]


def template_problems(templates: list[PromptTemplate], spec: DatasetSpec) -> list[str]:
    """Render every template for every class; one line per template that fails."""
    out = []
    for t in templates:
        try:
            check_templates([t], spec)
        except TextadaptError as e:
            out.append(str(e))
    return out


def writable_problems(folder: Path, what: str = "report folder") -> list[str]:
    """Whether files can be written in ``folder`` (created if missing): a file is written and removed."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return [f"{folder}: the {what} is a file, not a folder; move the file away or set TEXTADAPT_HOME"]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".textadapt-write-check-"):
            pass
    except OSError as e:
        return [f"{folder}: the {what} is not writable ({e.strerror or e}); fix its permissions or set TEXTADAPT_HOME"]
    return []


def problems(
    spec: DatasetSpec,
    images: ImageSet | None,
    templates: list[PromptTemplate],
    reports_dir: Path | None,
    workers: int | None = None,
) -> list[str]:
    """Every problem of a run's inputs (see the module's docstring); empty when all is well."""
    found = placeholder_problems(spec)
    if images is not None:
        found += images.problems + decode_problems(images, workers)
    found += template_problems(templates, spec)
    if reports_dir is not None:
        found += writable_problems(reports_dir)
    return found


def refuse(spec: DatasetSpec, found: list[str]) -> None:
    if found:
        raise TextadaptError(
            f"dataset {spec.name!r} ({spec.path}): {len(found)} problem(s), found before any LLM call:\n  - "
            + "\n  - ".join(found)
        )


def preflight(
    spec: DatasetSpec,
    images: ImageSet | None,
    templates: list[PromptTemplate],
    reports_dir: Path | None,
    workers: int | None = None,
) -> None:
    """Raise one TextadaptError listing every problem of a run's inputs; return quietly if there is none.

    ``images``: the run's test images (after ``restrict``), loaded with ``strict=False`` so that their
    layout problems are listed here too; None for a ``--train-only`` run.
    """
    refuse(spec, problems(spec, images, templates, reports_dir, workers))


@dataclass
class RunInputs:
    spec: DatasetSpec
    images: ImageSet | None
    templates: list[PromptTemplate]


def run_inputs(options, settings) -> RunInputs:
    """What a run reads (spec restricted to ``--max-classes``, test images restricted to ``--max-images``,
    templates), checked by ``preflight``: call it before Prefect starts and before any LLM call.

    ``options`` is a ``RunOptions``, ``settings`` a ``Settings``.
    """
    spec = find_spec(options.dataset, settings.dataset_search_path)
    images = None if options.train_only else load_test_images(spec, settings.home, strict=False)
    spec, images = restrict(spec, images, options.max_classes, options.max_images)
    templates = templates_for(settings.prompts_dir, options.template_sets, spec) if options.template_sets else []
    preflight(spec, images, templates, settings.reports_dir)
    return RunInputs(spec, images, templates)


def before_prefect(options, settings) -> RunInputs:
    """Everything ``textadapt run`` and ``textadapt schedule`` can refuse before Prefect is imported and its API started:
    the run's inputs (``run_inputs``) and the backbone, captioner and LLM specs (parsed, not loaded)."""
    from textadapt.config import parse_backbone_spec as parse_backbone
    from textadapt.llm import parse_spec as parse_llm

    inputs = run_inputs(options, settings)
    parse_backbone(options.backbone or settings.backbone)
    if options.captioner and options.captioner != "same" and not options.train_only:
        parse_backbone(options.captioner)
    if inputs.templates:
        parse_llm(options.llm or settings.llm)
    return inputs


@dataclass
class DatasetCheck:
    """What ``textadapt datasets check`` found."""

    spec: DatasetSpec
    images: ImageSet
    per_class: list[int]
    templates: int
    prompts: int  # rendered: templates x classes
    problems: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def check_dataset(name: str, settings, template_sets: list[str] | None = None, workers: int | None = None) -> DatasetCheck:
    """Every check of ``preflight`` on a whole dataset, with what it found (for ``textadapt datasets check``).

    ``template_sets``: the sets to render (default: a run's default sets).
    """
    from textadapt.config import RunOptions

    seconds, t0 = {}, time.perf_counter()
    spec = find_spec(name, settings.dataset_search_path)
    images = load_test_images(spec, settings.home, strict=False)
    seconds["list"] = time.perf_counter() - t0
    sets = RunOptions.model_fields["template_sets"].default_factory() if template_sets is None else template_sets
    templates = templates_for(settings.prompts_dir, sets, spec) if sets else []
    t1 = time.perf_counter()
    found = placeholder_problems(spec) + images.problems
    found += decode_problems(images, workers)
    seconds["decode"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    found += template_problems(templates, spec)
    seconds["render"] = time.perf_counter() - t2
    counts = np.bincount(images.labels[(images.labels >= 0) & (images.labels < len(spec.classes))], minlength=len(spec.classes))
    n_prompts = sum(1 if t.parse == "questions" else len(spec.classes) for t in templates)
    seconds["total"] = time.perf_counter() - t0
    return DatasetCheck(spec, images, counts.tolist(), len(templates), n_prompts, found, seconds)
