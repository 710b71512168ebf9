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
from flows.artifacts import publish_artifacts
from flows.parallel import Workers
from textadapt import TextadaptError, captioner, checks, encoders, harness, pipeline
from textadapt.config import RunOptions, Settings
from textadapt.llm import Sampling, make_backend
from textadapt.report import RunReport, html_path, write_report
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


@task(name="check inputs", **TASK)
def check_inputs(options: RunOptions, settings: Settings):
    """The dataset (restricted for smoke runs), its test images and the templates, after every check of
    ``checks.preflight``: one error listing every problem, before any LLM call."""
    inputs = checks.run_inputs(options, settings)
    return inputs.spec, inputs.images, inputs.templates


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


def training_free(backbone, spec, store, sets, dclip_sets, batch_size):
    """Embed the descriptions, zero-shot and WaffleCLIP prompts over the run's workers, then build the training-free
    classifiers."""
    texts = [t for ts in sets.values() for t in ts.texts] + harness.training_free_texts(spec)
    n = parallel.embed_texts(_workers.get(), backbone, texts, store, batch_size)
    free, k = _training_free(backbone, spec, store, sets, dclip_sets, batch_size)
    return free, n + k


@task(name="training-free classifiers", **TASK)
def _training_free(backbone, spec, store, sets, dclip_sets, batch_size):
    return harness.training_free(backbone, spec, store, sets, dclip_sets, batch_size)


@task(name="train adapters", **TASK)
def train_adapters(backbone, spec, store, sets, teacher, config, batch_size):
    logger = get_run_logger()
    return harness.adapted(backbone, spec, store, sets, teacher, config, batch_size, log=logger.info)


@task(name="captioner", **TASK)
def caption_scores(captioner_bb, images, spec, config):
    scores = captioner.classify_with_captioner(captioner_bb, images, spec.classes, progress=_progress("captioner scoring"))
    return harness.captioner_results(scores, images.labels, len(spec.classes), config.scorings, config.beta)


def harness_config(options: RunOptions, steps: int) -> harness.HarnessConfig:
    if options.train_only and options.prior == "mean-image" and set(options.scoring) & {"ig", "all"}:
        raise TextadaptError("--prior mean-image needs the test images, which --train-only skips; use empty-text or blank-image")
    return harness.HarnessConfig(
        methods=harness.parse_methods(options.methods), scorings=harness.parse_scorings(options.scoring),
        seeds=[options.seed + i for i in range(options.seeds)], steps=steps, prior=options.prior, beta=options.ig_beta,
        ot_alpha=options.ot_alpha, ot_eps=options.ot_eps, ot_iters=options.ot_iters,
    )


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
                spec, images, templates = check_inputs(options, settings)
                steps = options.steps or spec.train.steps
                config = harness_config(options, steps)  # a bad --methods fails here, before any LLM call
            with stage("backbone"):  # before any LLM call: a missing backbone costs no generation
                backbone = load_backbone(backbone_spec, settings)
                captioner_bb = None
                if options.captioner and not options.train_only:
                    captioner_bb = backbone if options.captioner == "same" else load_backbone(options.captioner, settings)
                    captioner.require_coca(captioner_bb)
            if backbone.untrained:
                logger.warning("backbone %s is UNTRAINED (random weights): the accuracies of this run mean nothing", backbone.arch)
            store.add_backbone(backbone.id, backbone_spec, backbone.arch, backbone.weights, backbone.untrained)
            backend = make_backend(llm_spec, settings) if templates else None
            llm_identity = backend.identity if backend else "none (no template set)"
            store.update_run(run_id, backbone=backbone.id, llm=llm_identity)  # known now, also if the run fails later
            zs_calls = 0
            gen, plan = pipeline.GenerationStats(0, 0, 0), []
            if backend:
                sampling = backend.sampling(Sampling(temperature=options.temperature, max_tokens=options.max_tokens))
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

            dclip_sets = {t.template_set for t in templates if t.parse == "list"}
            with stage("training"):
                free, calls = training_free(backbone, spec, store, sets, dclip_sets, options.batch_size)
                zs_calls += calls
                teacher = harness.teacher_prototypes(free)
                trained, head_calls = train_adapters(backbone, spec, store, sets, teacher, config, options.batch_size)
            classifiers = free + trained
            results, best, gains, image_calls, image_emb = [], None, None, 0, None
            if not options.train_only:
                with stage("image embeddings"):
                    image_emb, image_calls = encode_images(backbone, images, store, options.batch_size)
            content_free = harness.content_free_embedding(backbone, config.prior, store, image_emb) if "ig" in config.scorings else None
            harness.save_classifiers(store, run_id, spec, classifiers, config.scorings, content_free, config.beta)
            if not options.train_only:
                with stage("scoring"):
                    results = harness.evaluate(classifiers, image_emb, images.labels, len(spec.classes), config.scorings,
                                               content_free, config.beta)
                if options.captioner:
                    with stage("captioner"):
                        results += caption_scores(captioner_bb, images, spec, config)
                with stage("intervals"):  # every gain's 95% interval: a paired bootstrap over the test images
                    gains = harness.gains(results, images.labels, len(spec.classes))
                best = harness.save(store, run_id, spec, results, gains, images)
            scores = {r.method: r.score for r in results}
            heads = {c.method: c.heads[0] for c in trained}

            examples_from = sets.get("targeted") or next(iter(sets.values()))
            examples = {c: [t for t, y in zip(examples_from.texts, examples_from.labels) if y == i][:2] for i, c in enumerate(spec.classes)}
            report = RunReport(
                run_id=run_id, spec=spec, backbone_spec=backbone_spec, backbone_id=backbone.id, untrained=backbone.untrained,
                arch=backbone.arch, llm=llm_identity, image_source=images.source if images else "none (--train-only)",
                n_images=len(images) if images else 0, generation=gen,
                sets=sets, scores=scores, heads=heads, best_baseline=best, text_encoder_calls=zs_calls + head_calls,
                image_encoder_calls=image_calls, steps=steps, seed=options.seed, stage_seconds=seconds, examples=examples,
                filled=filled, results=results, seeds=config.seeds, llm_usage=store.llm_usage(run_id), gains=gains,
            )
            path = write_report(report, settings.reports_dir)
            store.update_run(run_id, text_encoder_calls=zs_calls + head_calls, report_path=str(path))
            store.finish_run(run_id, "completed")
        except BaseException as e:
            store.finish_run(run_id, "failed", f"{type(e).__name__}: {e}")
            raise
    logger.info("report: %s", path)
    publish_artifacts(report, path, html_path(path))  # the gains, the per-class plot and the report paths, in the Prefect UI
    return RunOutcome(
        run_id=run_id, report_path=str(path), untrained_backbone=backbone.untrained, llm_calls=gen.made,
        cached_generations=gen.cached, text_encoder_calls=zs_calls + head_calls,
        trained_descriptions=sum(len(ts.texts) for ts in sets.values()),
        results={m: s.top1 for m, s in scores.items()},
    )
