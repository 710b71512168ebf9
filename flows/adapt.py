"""The adaptation flow: textadapt's stages as Prefect tasks, for one dataset.

``textadapt run DATASET`` calls ``adapt`` directly; without PREFECT_API_URL Prefect starts a
temporary local API for the run, with one it shows in that server's UI. The flow's one parameter
is ``RunOptions``, the same model the CLI's flags fill in.

Caching is textadapt's own (DuckDB, content-addressed), so Prefect's task caching is off: the
flow resolves each stage against the cache before submitting its batches, so a retried or re-run
task does only what is missing. Generation and embedding batches run as tasks on the run's
workers (``flows/parallel.py``: threads, or a Dask cluster with ``task_runner="dask"``); they
return rows, and this process, the only one that opens the DuckDB file, writes them.
"""

from __future__ import annotations

import logging
import secrets
import time
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows import parallel
from flows.parallel import Workers
from textadapt import TextadaptError, datasets, encoders, pipeline, prompts
from textadapt.config import RunOptions, Settings
from textadapt.llm import Sampling, make_backend
from textadapt.report import RunReport, write_report
from textadapt.store import Store

TASK = dict(cache_policy=NO_CACHE, persist_result=False)


class _UserErrorsWithoutTraceback(logging.Filter):
    """A TextadaptError's message says what is wrong and what to do; its traceback only hides that."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TextadaptError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_errors() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorsWithoutTraceback) for f in logger.filters):
            logger.addFilter(_UserErrorsWithoutTraceback())


class RunOutcome(BaseModel):
    run_id: str
    report_path: str
    untrained_backbone: bool
    llm_calls: int
    cached_generations: int
    text_encoder_calls: int
    trained_descriptions: int
    results: dict[str, float]  # method -> top-1


def _progress(label: str):
    """Log progress at every tenth of the way: visible on the console and in the Prefect UI."""
    logger, last = get_run_logger(), [-1]

    def report(done: int, total: int) -> None:
        tenth = 10 * done // total if total else 10
        if tenth != last[0]:
            last[0] = tenth
            logger.info("%s: %d/%d", label, done, total)

    return report


@task(name="load dataset", **TASK)
def load_dataset(options: RunOptions, settings: Settings):
    spec = datasets.find_spec(options.dataset, settings.dataset_search_path)
    if options.train_only:
        return datasets.restrict(spec, None, options.max_classes, None)
    images = datasets.load_test_images(spec, settings.home)
    return datasets.restrict(spec, images, options.max_classes, options.max_images)


@task(name="check templates", **TASK)
def load_templates(options: RunOptions, settings: Settings, spec):
    if not options.template_sets:
        return []
    templates = prompts.list_templates(settings.prompts_dir, options.template_sets)
    prompts.check_templates(templates, spec)
    return templates


@task(name="load backbone", **TASK)
def load_backbone(spec: str, settings: Settings):
    return encoders.load_backbone(spec, settings.device)


# The run's workers (threads or a Dask cluster), for the stages below that embed before they compute.
# Only functions touch it: a task sent to Dask carries the flow's function, and a ContextVar cannot be pickled.
_workers: ContextVar[Workers] = ContextVar("textadapt_workers")


def _use_workers(workers: Workers) -> Callable[[], None]:
    """Make ``workers`` the current run's; returns the function that undoes it."""
    token = _workers.set(workers)
    return lambda: _workers.reset(token)


def encode_images(backbone, images, store, batch_size):
    """Embed the test images over the run's workers (the flow writes them); then read them in order."""
    n = parallel.embed_images(_workers.get(), backbone, images, store, batch_size, _progress("encoding test images"))
    emb, _ = _encode_images(backbone, images, store, batch_size)
    return emb, n


@task(name="encode images", **TASK)
def _encode_images(backbone, images, store, batch_size):
    return encoders.encode_images(backbone, images, store, batch_size)


def zero_shot(backbone, spec, store, batch_size):
    """Embed the baselines' prompts over the run's workers, then build the zero-shot classifiers."""
    n = parallel.embed_texts(_workers.get(), backbone, [t for ps in pipeline.zero_shot_prompts(spec).values() for t in ps], store, batch_size)
    weights, _ = _zero_shot(backbone, spec, store, batch_size)
    return weights, n


@task(name="zero-shot baselines", **TASK)
def _zero_shot(backbone, spec, store, batch_size):
    return pipeline.zero_shot_weights(backbone, spec, store, batch_size)


def train_heads(backbone, sets, spec, store, steps, seed, batch_size):
    """Embed the descriptions over the run's workers, then train the heads in the flow's process."""
    n = parallel.embed_texts(_workers.get(), backbone, [t for ts in sets.values() for t in ts.texts], store, batch_size)
    heads, _ = _train_heads(backbone, sets, spec, store, steps, seed, batch_size)
    return heads, n


@task(name="train heads", **TASK)
def _train_heads(backbone, sets, spec, store, steps, seed, batch_size):
    return pipeline.train_heads(backbone, sets, spec, store, steps, seed, batch_size)


@flow(name="textadapt-adapt", persist_result=False)
def adapt(options: RunOptions) -> RunOutcome:
    """Generate descriptions, train text-only heads, and score them against zero-shot CLIP."""
    quiet_user_errors()
    logger = get_run_logger()
    settings = Settings()
    backbone_spec, llm_spec = options.backbone or settings.backbone, options.llm or settings.llm
    run_id = f"{options.dataset}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    seconds: dict[str, float] = {}

    @contextmanager
    def stage(name: str):
        t0 = time.perf_counter()
        yield
        seconds[name] = time.perf_counter() - t0

    with Store(settings.db_path) as store, ExitStack() as running:
        store.start_run(run_id, options.dataset, options.model_dump())
        logger.info("run %s, cache %s", run_id, settings.db_path)
        try:
            workers = running.enter_context(Workers.open(options, settings))
            running.callback(_use_workers(workers))
            with stage("dataset and templates"):
                spec, images = load_dataset(options, settings)
                templates = load_templates(options, settings, spec)
            with stage("backbone"):  # before any LLM call: a missing backbone costs no generation
                backbone = load_backbone(backbone_spec, settings)
            if backbone.untrained:
                logger.warning("backbone %s is UNTRAINED (random weights): the accuracies of this run mean nothing", backbone.arch)
            store.add_backbone(backbone.id, backbone_spec, backbone.arch, backbone.weights, backbone.untrained)
            backend = make_backend(llm_spec, settings) if templates else None
            llm_identity = backend.identity if backend else "none (no template set)"
            store.update_run(run_id, backbone=backbone.id, llm=llm_identity)  # known now, also if the run fails later
            zs_calls = 0
            gen, plan = pipeline.GenerationStats(0, 0, 0), []
            if backend:
                sampling = Sampling(temperature=options.temperature, max_tokens=options.max_tokens)
                with stage("generation"):
                    try:
                        # Meta-prompting first: the questions the LLM writes are then asked for every class.
                        meta = pipeline.resolve_rounds(pipeline.plan_meta(spec, templates, backend.identity, sampling), store, options.refresh)
                        if meta:
                            gen = parallel.generate(workers, meta, backend, llm_spec, spec, store, settings, _progress("writing questions"))
                        asked = templates + pipeline.questions(meta, store)
                        confusable, zs_calls = pipeline.confusable_classes(backbone, spec, store)
                        plan = pipeline.plan_generations(spec, asked, backend.identity, sampling, options.samples, confusable)
                        plan = pipeline.resolve_rounds(plan, store, options.refresh)
                        gen = gen + parallel.generate(workers, plan, backend, llm_spec, spec, store, settings, _progress("generating"))
                        plan = meta + plan
                    finally:
                        backend.close()
                if gen.made == 0:
                    logger.info("all %d generations served from the cache: 0 LLM calls", gen.planned)
                else:
                    logger.info("%d LLM calls, %d generations from the cache", gen.made, gen.cached)
            store.update_run(run_id, llm_calls=gen.made, cached_generations=gen.cached)
            selection = pipeline.training_sets([p for p in plan if p.class_index >= 0], store, spec, options.sources)
            filled = pipeline.fill_missing(selection.sets, spec)
            for name, classes in filled.items():
                logger.warning("%s: no accepted description for %d classes (%s); trained on %r for them", name, len(classes),
                               ", ".join(classes[:10]), pipeline.FALLBACK)
            store.link_generations(run_id, [(p.key, p.class_index, None) for p in plan if p.class_index < 0] + selection.links)
            sets = selection.sets

            steps = options.steps or spec.train.steps
            with stage("training"):
                heads, head_calls = train_heads(backbone, sets, spec, store, steps, options.seed, options.batch_size)
            scores, best, image_calls = {}, None, 0
            if not options.train_only:
                with stage("zero-shot baselines"):
                    weights, calls = zero_shot(backbone, spec, store, options.batch_size)
                    zs_calls += calls
                with stage("image embeddings"):
                    image_emb, image_calls = encode_images(backbone, images, store, options.batch_size)
                weights.update({m: h.weight for m, h in heads.items()})
                with stage("scoring"):
                    scores = pipeline.evaluate(weights, image_emb, images.labels, len(spec.classes))
                    best = pipeline.save_results(store, run_id, spec, scores, heads, sets)

            examples_from = sets.get("targeted") or next(iter(sets.values()))
            examples = {c: [t for t, y in zip(examples_from.texts, examples_from.labels) if y == i][:2] for i, c in enumerate(spec.classes)}
            report = RunReport(
                run_id=run_id, spec=spec, backbone_spec=backbone_spec, backbone_id=backbone.id, untrained=backbone.untrained,
                arch=backbone.arch, llm=llm_identity, image_source=images.source if images else "none (--train-only)",
                n_images=len(images) if images else 0, generation=gen,
                sets=sets, scores=scores, heads=heads, best_baseline=best, text_encoder_calls=zs_calls + head_calls,
                image_encoder_calls=image_calls, steps=steps, seed=options.seed, stage_seconds=seconds, examples=examples,
                filled=filled,
            )
            path = write_report(report, settings.reports_dir)
            store.update_run(run_id, text_encoder_calls=zs_calls + head_calls, report_path=str(path))
            store.finish_run(run_id, "completed")
        except BaseException as e:
            store.finish_run(run_id, "failed", f"{type(e).__name__}: {e}")
            raise
    logger.info("report: %s", path)
    return RunOutcome(
        run_id=run_id, report_path=str(path), untrained_backbone=backbone.untrained, llm_calls=gen.made,
        cached_generations=gen.cached, text_encoder_calls=zs_calls + head_calls,
        trained_descriptions=sum(len(ts.texts) for ts in sets.values()),
        results={m: s.top1 for m, s in scores.items()},
    )
