"""The adaptation flow: ``textadapt run DATASET``, a scheduled deployment, or a prefect.yaml one.

Read ``adapt`` first: it is the run's table of contents, one named step per stage, each step a
function below it that calls the library's stages (``textadapt/pipeline.py``, ``textadapt/harness.py``),
which keep everything in the cache (``textadapt/store.py``).

The flow's parameters are ``RunOptions``' fields, one each (``textadapt/config.py``): a Prefect user
overrides one and keeps the deployment's others. The flow run is named after textadapt's run id,
and the run's row in ``runs`` records the flow run's id. Without PREFECT_API_URL Prefect starts a
temporary local API for the run; with one, the run shows in that server's UI.

Caching is textadapt's own (DuckDB, content-addressed), so Prefect's task caching is off: each stage
resolves its work against the cache before it submits batches, so a retried task or a re-run does
only what is missing. The batches run on the run's workers (``workers.py``: Prefect tasks in
threads, or on Dask); they return rows, and this process, the only one that opens the DuckDB file,
writes them.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.utilities.timeout import timeout
from pydantic import BaseModel

from textadapt import TextadaptError, captioner, checks, encoders, harness, pipeline, prompts
from textadapt.config import RunOptions, Settings, option_default
from textadapt.datasets import DatasetSpec, ImageSet
from textadapt.encoders import Backbone
from textadapt.flows.artifacts import GenerationProgress, publish_artifacts
from textadapt.flows.workers import Workers
from textadapt.llm import Backend, Sampling, make_backend
from textadapt.progress import stage_progress
from textadapt.report import RunReport, html_path, write_report
from textadapt.store import Store

TASK = dict(cache_policy=NO_CACHE, persist_result=False)


class RunOutcome(BaseModel):
    run_id: str
    report_path: str
    untrained_backbone: bool
    llm_calls: int
    cached_generations: int
    text_encoder_calls: int
    trained_descriptions: int
    results: dict[str, float]  # method -> top-1


def _run_name() -> str:
    """The flow run's name: a new textadapt run id, which ``adapt`` then uses."""
    from prefect.runtime import flow_run

    return pipeline.new_run_id(flow_run.parameters["dataset"])


def takes_run_options(fn):
    """Give ``fn(**params)`` one keyword parameter per RunOptions field, with its type (constraints included),
    default and description (a Google-style docstring, which Prefect shows): the flow's parameters."""
    fn.__signature__ = inspect.Signature(
        [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=f.rebuild_annotation(),
                default=inspect.Parameter.empty if f.is_required() else option_default(name),
            )
            for name, f in RunOptions.model_fields.items()
        ],
        return_annotation=RunOutcome,
    )
    fn.__annotations__ = {**{p.name: p.annotation for p in fn.__signature__.parameters.values()}, "return": RunOutcome}
    fn.__doc__ = "\n".join(
        [fn.__doc__.strip(), "", "Args:"] + [f"    {name}: {f.description}" for name, f in RunOptions.model_fields.items()]
    )
    return fn


@flow(name="textadapt-adapt", flow_run_name=_run_name, persist_result=False)
@takes_run_options
def adapt(**params) -> RunOutcome:
    """Generate descriptions, train text-only adapters, and score them against zero-shot CLIP."""
    quiet_console()
    options = RunOptions.parse(params)
    settings = Settings()
    logger = get_run_logger()
    flow_run = FlowRunContext.get().flow_run
    run_id = flow_run.name
    with Store(settings.db_path) as store, ExitStack() as run:
        run.enter_context(pipeline.record_run(store, run_id, options.model_dump()))
        t = Timer(run.enter_context(time_limit(options.timeout_seconds)))
        store.update_run(run_id, flow_run_id=str(flow_run.id))
        logger.info("run %s, cache %s", run_id, settings.db_path)
        workers = run.enter_context(Workers.open(options.task_runner, settings))
        with t("dataset and templates"):  # every input is checked before any model loads or any LLM call
            inputs = check_inputs(options, settings)
        with t("backbone"):
            backbone, captioner_bb = load_backbones(options, settings)
        backend = make_backend(inputs.llm_spec, settings) if inputs.templates else None
        llm = backend.identity if backend else "none (no template set)"
        store.add_backbone(backbone.id, backbone.spec, backbone.arch, backbone.weights, backbone.untrained)
        store.update_run(run_id, backbone=backbone.id, llm=llm)  # known now, also if the run fails later
        with t("generation"):
            gen, plan, confusable_calls = generate_descriptions(inputs, backbone, backend, store, workers)
        store.update_run(run_id, llm_calls=gen.made, cached_generations=gen.cached)
        sets, filled = select_descriptions(run_id, inputs, plan, store)
        with t("text embeddings"):
            text_calls = confusable_calls + embed_all_texts(inputs, backbone, sets, store, workers)
        with t("training"):
            classifiers, trained, encoded = train(inputs, backbone, sets, store)
            text_calls += encoded  # 0 when texts_to_encode named every text the classifiers need
        with t("image embeddings"):
            image_emb, image_calls = embed_test_images(inputs, backbone, store, workers)
        results, best, gains = score(run_id, inputs, backbone, captioner_bb, classifiers, image_emb, store, t)
        workers.log_where(logger)
        report = RunReport(
            run_id=run_id,
            spec=inputs.spec,
            backbone_spec=backbone.spec,
            backbone_id=backbone.id,
            untrained=backbone.untrained,
            arch=backbone.arch,
            llm=llm,
            image_source=inputs.images.source if inputs.images else "none (--train-only)",
            n_images=len(inputs.images) if inputs.images else 0,
            generation=gen,
            sets=sets,
            scores={r.method: r.score for r in results},
            heads={c.method: c.heads[0] for c in trained},
            best_baseline=best,
            text_encoder_calls=text_calls,
            image_encoder_calls=image_calls,
            steps=inputs.config.steps,
            seed=options.seed,
            stage_seconds=t.seconds,
            examples=_examples(inputs.spec, sets),
            filled=filled,
            results=results,
            seeds=inputs.config.seeds,
            llm_usage=store.llm_usage(run_id),
            gains=gains,
        )
        path = write_report(report, settings.reports_dir)
        store.update_run(run_id, text_encoder_calls=text_calls, report_path=str(path))
    logger.info("report: %s", path)
    publish_artifacts(report, path, html_path(path))  # the gains, the per-class plot and the report paths, in the Prefect UI
    return RunOutcome(
        run_id=run_id,
        report_path=str(path),
        untrained_backbone=backbone.untrained,
        llm_calls=gen.made,
        cached_generations=gen.cached,
        text_encoder_calls=text_calls,
        trained_descriptions=sum(len(ts.texts) for ts in sets.values()),
        results={r.method: r.score.top1 for r in results},
    )


# ------------------------------------------------------------------------------------------------
# The steps


class Timer:
    """``with t("stage"):`` records the stage's seconds in ``t.seconds`` (the report's stage table); a stage starts only
    within the run's time limit (``deadline``)."""

    def __init__(self, deadline: Deadline | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.deadline = deadline

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.deadline:
            self.deadline.check()
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


class RunTimedOut(TextadaptError, TimeoutError):
    """The run took longer than its ``timeout_seconds`` (a TimeoutError: Prefect names the flow run's state TimedOut)."""


class _Expired(TimeoutError):
    pass


@dataclass
class Deadline:
    seconds: float | None
    at: float | None = None  # time.monotonic()

    def check(self) -> None:
        if self.at is not None and time.monotonic() >= self.at:
            raise self.error()

    def error(self) -> RunTimedOut:
        return RunTimedOut(
            f"the run took longer than its timeout ({self.seconds:g} s, run option timeout_seconds) and was "
            "stopped; what it stored stays in the cache, and running it again asks only for the rest"
        )


@contextmanager
def time_limit(seconds: float | None) -> Iterator[Deadline]:
    """Stop the block after ``seconds`` (None: never) with ``RunTimedOut``. Prefect's own timeout (an alarm in the main
    thread, as for a flow's ``timeout_seconds``) stops it where it is; it is set here from the run option, so that a
    deployment's parameter or one run's override sets it too (the decorator's argument is fixed when a worker imports
    the flow). The alarm's exception is lost if it lands in a garbage collector's callback, so the next stage checks the
    time too (``Deadline.check``: ``Timer``)."""
    deadline = Deadline(seconds, None if seconds is None else time.monotonic() + seconds)
    try:
        with timeout(seconds, timeout_exc_type=_Expired):
            yield deadline
    except _Expired:
        raise deadline.error() from None


@dataclass
class Inputs:
    """What a run works on, checked: the options, the dataset (and its test images), the templates."""

    options: RunOptions
    settings: Settings
    spec: DatasetSpec
    images: ImageSet | None  # None: --train-only
    templates: list[prompts.PromptTemplate]
    config: harness.HarnessConfig
    llm_spec: str


def check_inputs(options: RunOptions, settings: Settings) -> Inputs:
    """The dataset, its test images and the templates, every one checked (``checks.preflight``: one error listing
    every problem, here, before any model loads or any LLM call)."""
    spec, images, templates = read_inputs(options, settings)
    config = harness.HarnessConfig.from_options(options, options.steps or spec.train.steps)
    return Inputs(options, settings, spec, images, templates, config, options.llm or settings.llm)


@task(name="check inputs", **TASK)
def read_inputs(options: RunOptions, settings: Settings):
    inputs = checks.run_inputs(options, settings)
    return inputs.spec, inputs.images, inputs.templates


def load_backbones(options: RunOptions, settings: Settings) -> tuple[Backbone, Backbone | None]:
    """The run's backbone, and the CoCa captioner's if asked for: before any LLM call, so a missing one costs no generation."""
    backbone = load_backbone(options.backbone or settings.backbone, settings)
    if backbone.untrained:
        get_run_logger().warning(
            "backbone %s is UNTRAINED (random weights): the accuracies of this run mean nothing", backbone.arch
        )
    captioner_bb = None
    if options.captioner and not options.train_only:
        captioner_bb = backbone if options.captioner == "same" else load_backbone(options.captioner, settings)
        captioner.require_coca(captioner_bb)
    return backbone, captioner_bb


@task(name="load backbone", **TASK)
def load_backbone(spec: str, settings: Settings) -> Backbone:
    return encoders.load_backbone(spec, settings.device)


def generate_descriptions(
    inputs: Inputs, backbone: Backbone, backend: Backend | None, store: Store, workers: Workers
) -> tuple[pipeline.GenerationStats, list[pipeline.PlannedGeneration], int]:
    """Every generation the run needs, asked of the LLM where the cache lacks it: meta-prompting's questions first,
    then every (class, question, sample). Returns the stats, the plan, and the prompts encoded to find confusable classes."""
    if backend is None:
        return pipeline.GenerationStats(0, 0, 0), [], 0
    options, spec, logger = inputs.options, inputs.spec, get_run_logger()
    sampling = backend.sampling(Sampling(temperature=options.temperature, max_tokens=options.max_tokens))
    run = dict(store=store, spec=spec, runner=workers, llm_spec=inputs.llm_spec, settings=inputs.settings)
    try:
        # Meta-prompting first: the questions the LLM writes are then asked for every class.
        meta = pipeline.plan_meta(spec, inputs.templates, backend.identity, sampling)
        meta = pipeline.resolve_rounds(meta, store, options.refresh)
        gen = pipeline.GenerationStats(0, 0, 0)
        if meta:
            with stage_progress("writing questions", logger, _console()) as progress:
                gen = pipeline.generate(meta, backend, progress=progress, **run)
        asked = inputs.templates + pipeline.questions(meta, store)
        confusable, calls = pipeline.confusable_classes(backbone, spec, store)
        plan = pipeline.plan_generations(spec, asked, backend.identity, sampling, options.samples, confusable)
        plan = pipeline.resolve_rounds(plan, store, options.refresh)
        artifact = GenerationProgress(spec.name, FlowRunContext.get().flow_run.name)  # the Prefect UI's view of it
        with stage_progress("generating", logger, _console()) as bar:

            def progress(done: int, total: int) -> None:
                bar(done, total)
                artifact(done, total)

            gen = gen + pipeline.generate(plan, backend, progress=progress, **run)
    finally:
        backend.close()
    if gen.made == 0:
        logger.info("generation: all %d generations served from the cache, 0 LLM calls", gen.planned)
    else:
        logger.info("generation: %d LLM calls, %d generations from the cache, in %.1f s", gen.made, gen.cached, gen.seconds)
    return gen, meta + plan, calls


def select_descriptions(
    run_id: str, inputs: Inputs, plan: list[pipeline.PlannedGeneration], store: Store
) -> tuple[dict[str, pipeline.TrainingSet], dict[str, list[str]]]:
    """The description sets the run trains on (its generations by template set, and imported sources), recorded in
    ``run_generations``; a class with no accepted description gets the fallback prompt, with a warning."""
    selection = pipeline.training_sets([p for p in plan if p.class_index >= 0], store, inputs.spec, inputs.options.sources)
    filled = pipeline.fill_missing(selection.sets, inputs.spec)
    for name, classes in filled.items():
        get_run_logger().warning(
            "%s: no accepted description for %d classes (%s); trained on %r for them",
            name,
            len(classes),
            ", ".join(classes[:10]),
            pipeline.FALLBACK,
        )
    store.link_generations(run_id, [(p.key, p.class_index, None) for p in plan if p.class_index < 0] + selection.links)
    return selection.sets, filled


def _dclip_sets(inputs: Inputs) -> set[str]:
    return {t.template_set for t in inputs.templates if t.parse == "list"}


def embed_all_texts(inputs: Inputs, backbone: Backbone, sets: dict, store: Store, workers: Workers) -> int:
    """Every text the classifiers need (``harness.texts_to_encode``), embedded up front in parallel batches."""
    texts = harness.texts_to_encode(inputs.spec, sets, _dclip_sets(inputs))
    t0 = time.perf_counter()
    with stage_progress("encoding texts", get_run_logger(), _console()) as progress:
        n = pipeline.embed_texts(backbone, texts, store, inputs.options.batch_size, workers, progress)
    get_run_logger().info(
        "text embedding: %d texts encoded, %d from the cache, in %.1f s", n, len(texts) - n, time.perf_counter() - t0
    )
    return n


def train(inputs: Inputs, backbone: Backbone, sets: dict, store: Store):
    """The training-free classifiers, then every adapter on every description set; returns (all, the adapted, texts
    they had to encode themselves)."""
    free, k = training_free(backbone, inputs.spec, store, sets, _dclip_sets(inputs), inputs.options.batch_size)
    trained, n = train_adapters(
        backbone, inputs.spec, store, sets, harness.teacher_prototypes(free), inputs.config, inputs.options.batch_size
    )
    return free + trained, trained, k + n


@task(name="training-free classifiers", **TASK)
def training_free(backbone, spec, store, sets, dclip_sets, batch_size) -> tuple[list[harness.Classifier], int]:
    return harness.training_free(backbone, spec, store, sets, dclip_sets, batch_size)


@task(name="train adapters", **TASK)
def train_adapters(backbone, spec, store, sets, teacher, config, batch_size) -> tuple[list[harness.Classifier], int]:
    logger = get_run_logger()
    with stage_progress("training", logger, _console()) as progress:
        return harness.adapted(backbone, spec, store, sets, teacher, config, batch_size, log=logger.info, progress=progress)


def embed_test_images(inputs: Inputs, backbone: Backbone, store: Store, workers: Workers):
    """The test images' embeddings (those the cache lacks computed in parallel batches), and how many were encoded."""
    if inputs.images is None:
        return None, 0
    t0 = time.perf_counter()
    with stage_progress("encoding test images", get_run_logger(), _console()) as progress:
        n = pipeline.embed_images(backbone, inputs.images, store, inputs.options.batch_size, workers, progress)
    emb, _ = encoders.encode_images(backbone, inputs.images, store, inputs.options.batch_size)  # all cached now: read in order
    get_run_logger().info(
        "image embedding: %d images encoded, %d from the cache, in %.1f s", n, len(inputs.images) - n, time.perf_counter() - t0
    )
    return emb, n


def score(
    run_id: str,
    inputs: Inputs,
    backbone: Backbone,
    captioner_bb: Backbone | None,
    classifiers: list[harness.Classifier],
    image_emb,
    store: Store,
    t: Timer,
):
    """Keep every classifier, score each on the test images (and the captioner, if asked), with every gain's 95%
    interval, and store the results; returns them, the best training-free baseline and the gains (for --train-only,
    nothing is scored: [], None, None)."""
    config, images = inputs.config, inputs.images
    content_free = harness.content_free_embedding(backbone, config.prior, store, image_emb) if "ig" in config.scorings else None
    harness.save_classifiers(store, run_id, inputs.spec, classifiers, config.scorings, content_free, config.beta)
    if images is None:
        return [], None, None
    with t("scoring"):
        results = harness.evaluate(
            classifiers, image_emb, images.labels, len(inputs.spec.classes), config.scorings, content_free, config.beta
        )
    if captioner_bb is not None:
        with t("captioner"):
            results += caption_scores(captioner_bb, images, inputs.spec, config)
    with t("intervals"):  # every gain's 95% interval: a paired bootstrap over the test images
        gains = harness.gains(results, images.labels, len(inputs.spec.classes))
    return results, harness.save(store, run_id, inputs.spec, results, gains, images), gains


@task(name="captioner", **TASK)
def caption_scores(captioner_bb, images, spec, config) -> list[harness.MethodResult]:
    with stage_progress("captioner scoring", get_run_logger(), _console()) as progress:
        scores = captioner.classify_with_captioner(captioner_bb, images, spec.classes, progress=progress)
    return harness.captioner_results(scores, images.labels, len(spec.classes), config.scorings, config.beta)


def _examples(spec: DatasetSpec, sets: dict) -> dict[str, list[str]]:
    """Two descriptions per class for the report, from the targeted set where there is one."""
    source = sets.get("targeted") or next(iter(sets.values()))
    return {c: [t for t, y in zip(source.texts, source.labels) if y == i][:2] for i, c in enumerate(spec.classes)}


# ------------------------------------------------------------------------------------------------
# The console


class _Quiet(logging.Filter):
    """Prefect's run logs, trimmed to what a user reads: per-task chatter (a task created, completed, retried) at
    DEBUG, and each user error (a TextadaptError) said once, without a traceback: by the flow's final state line,
    or not at all where the caller prints it (``textadapt run``)."""

    caller_shows_errors = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        user_error = bool(record.exc_info and isinstance(record.exc_info[1], TextadaptError)) or _names_user_error(msg)
        if record.name == "prefect.task_runs":
            if msg.startswith(("Created task run", "Finished in state Completed")) or " - Retry " in msg:
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return logging.getLogger("prefect").isEnabledFor(logging.DEBUG)
            if user_error and msg.startswith(("Task run failed", "Finished in state")):
                return False  # the flow fails with the same error, and says so
        elif user_error and msg.startswith("Encountered exception during execution"):
            return False  # the same error as the flow's "Finished in state Failed(...)"
        elif user_error and msg.startswith("Finished in state") and _Quiet.caller_shows_errors:
            return False
        if user_error and record.exc_info:  # its message says what is wrong and what to do; a traceback only hides that
            record.exc_info, record.exc_text = None, None
        return True


def _names_user_error(message: str) -> bool:
    """Whether a Prefect state message ("... encountered an exception NAME: ...") is about a TextadaptError."""

    def names(cls) -> set[str]:
        return {cls.__name__}.union(*(names(c) for c in cls.__subclasses__()))

    m = re.search(r"encountered an exception:? (\w+):", message)
    return bool(m) and m.group(1) in names(TextadaptError)


def quiet_console(caller_shows_errors: bool = False) -> None:
    """Install ``_Quiet`` on Prefect's run loggers (once); ``caller_shows_errors``: the caller prints a user error itself."""
    _Quiet.caller_shows_errors = _Quiet.caller_shows_errors or caller_shows_errors
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in logger.filters):
            logger.addFilter(_Quiet())


def _console():
    """The Rich console Prefect's log handler prints with (progress bars must draw on it), if there is one."""
    for handler in logging.getLogger().handlers:
        console = getattr(handler, "console", None)
        if console is not None:
            return console
    return None
