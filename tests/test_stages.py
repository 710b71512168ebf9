"""How the stages run: the runner every stage hands its batches to, the texts the harness says it will
encode (all embedded up front, in batches), and a stage's progress on the console."""

import io
import logging
import re
import threading
import time

import pytest
from rich.console import Console
from rich.theme import Theme

from textadapt import harness, pipeline
from textadapt.batches import BatchFailures, BatchResult, Runner, here
from textadapt.config import RunOptions
from textadapt.datasets import restrict
from textadapt.progress import stage_progress
from textadapt.store import Store


def test_the_runner_keeps_its_capacity_full_and_gathers_failures():
    """Batches run at once up to the capacity (by weight), ``done`` runs in the caller's thread as each
    completes, and a failed batch stops nothing: the failures come together at the end."""
    lock, now, most, done_in = threading.Lock(), [0], [0], set()

    def batch(i: int, weight: int) -> BatchResult:
        with lock:
            now[0] += weight
            most[0] = max(most[0], now[0])
        time.sleep(0.05)
        with lock:
            now[0] -= weight
        if i % 4 == 3:
            raise RuntimeError(f"batch {i} broke")
        return BatchResult([i], here())

    jobs = [dict(i=i, weight=1 + i % 2) for i in range(12)]
    finished = []

    def done(job, result):
        done_in.add(threading.get_ident())
        finished.append(result.rows[0])

    runner = Runner()
    with pytest.raises(BatchFailures) as e:
        runner.map(batch, jobs, done, capacity=4, weight=lambda job: job["weight"], label="test")
    assert [job["i"] for job, _ in e.value.failures] == [3, 7, 11] and e.value.total == 12
    assert "batch 3 broke" in str(e.value.failures[0][1])
    assert sorted(finished) == [i for i in range(12) if i % 4 != 3]
    assert 2 < most[0] <= 4  # several at once, never over the capacity
    assert done_in == {threading.get_ident()}  # the rows are written by the caller's thread only
    assert runner.where["test"] == {here(): 9}


def test_the_harness_names_every_text_it_encodes(tiny_backbone, fmnist, tmp_path):
    """Once ``texts_to_encode`` is embedded (in batches, up front), the training-free classifiers and the
    adapters find every text they need in the cache: they encode nothing themselves."""
    spec, _ = restrict(fmnist, None, 3, None)
    selection = pipeline.select(
        [("targeted", f"k{c}{i}", c, f"a {spec.classes[c]} with {i} buttons.", None) for c in range(3) for i in range(3)]
    )
    options = RunOptions(dataset=spec.name, methods=["tap-head", "zs-head+ot", "taskres"], seeds=2, steps=5)
    config = harness.HarnessConfig.from_options(options, steps=5)
    with Store(tmp_path / "c.duckdb") as store:
        texts = harness.texts_to_encode(spec, selection.sets, {"targeted"})
        seen = []
        encoded = pipeline.embed_texts(tiny_backbone, texts, store, batch_size=64, progress=lambda d, t: seen.append((d, t)))
        assert encoded == len(set(texts)) and seen[-1] == (encoded, encoded) and len(seen) > 2  # several batches
        free, k = harness.training_free(tiny_backbone, spec, store, selection.sets, {"targeted"})
        trained, n = harness.adapted(
            tiny_backbone, spec, store, selection.sets, harness.teacher_prototypes(free), config, log=lambda *_: None
        )
    assert (k, n) == (0, 0)
    assert {c.method for c in free} >= {"waffle", "cupl:targeted", "dclip:targeted"} and len(trained) == 3


def test_a_stage_draws_a_bar_on_a_terminal_and_logs_elsewhere():
    records = []
    logger = logging.getLogger("textadapt.test.progress")
    logger.setLevel(logging.DEBUG)
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        # a console like Prefect's log handler's: a theme of its own, without Rich's default styles
        terminal = Console(
            file=io.StringIO(), force_terminal=True, width=100, theme=Theme({"log.info_level": "cyan"}, inherit=False)
        )
        with stage_progress("generating", logger, terminal) as progress:
            for done in range(0, 41):
                progress(done, 40)
        assert "generating" in terminal.file.getvalue() and "40/40" in terminal.file.getvalue()
        assert records == []  # on a terminal the bar says it all

        log_file = Console(file=io.StringIO(), force_terminal=False)
        with stage_progress("generating", logger, log_file) as progress:
            for done in range(0, 41):
                progress(done, 40)
        assert log_file.file.getvalue() == ""
        lines = [r.getMessage() for r in records]
        assert lines == [f"generating: {4 * k}/40" for k in range(11)]  # every tenth of the way
        assert {r.levelno for r in records} == {logging.DEBUG}  # the stage's summary is its caller's one INFO line

        # A long stage is not silent in a log: past progress.LONG seconds its tenths are INFO, with time elapsed and left.
        records.clear()
        with stage_progress("embedding", logger, log_file) as progress:
            progress(0, 40)
            progress.__dict__["_t0"] -= 120  # as if it had started two minutes ago
            progress(20, 40)
            progress(40, 40)
        assert [r.levelno for r in records] == [logging.DEBUG, logging.INFO, logging.INFO]
        assert records[0].getMessage() == "embedding: 0/40"
        assert re.fullmatch(r"embedding: 20/40 \(2 min 0\d s, about 2 min 0\d s left\)", records[1].getMessage())
        assert re.fullmatch(r"embedding: 40/40 \(2 min 0\d s\)", records[2].getMessage())
    finally:
        logger.removeHandler(handler)


def test_generate_keeps_requests_in_flight_on_the_library_runner(llama_server, fmnist, tmp_path):
    """``pipeline.generate`` without the flow (what the generation benchmark and the fault tests run): the
    batches share the backend's concurrency, every answer is stored once, and a re-run asks for nothing."""
    from test_llm_http import CountingProxy

    from textadapt.config import Settings
    from textadapt.llm import Sampling, make_backend
    from textadapt.prompts import list_templates

    spec, _ = restrict(fmnist, None, 2, None)
    templates = list_templates(Settings().prompts_dir, ["targeted"])[:3]
    with CountingProxy(llama_server) as proxy, Store(tmp_path / "c.duckdb") as store:
        backend = make_backend("openai:smollm2", Settings(llm_base_url=proxy.url, llm_concurrency=4, llm_n_per_request=False))
        plan = pipeline.plan_generations(spec, templates, backend.identity, Sampling(temperature=0, max_tokens=8), 2)
        first = pipeline.generate(plan, backend, store, spec)
        again = pipeline.generate(plan, backend, store, spec)
        rows = store.sql("SELECT count(*), count(DISTINCT key) FROM generations")[1]
    assert (first.made, first.cached, again.made, again.cached) == (12, 0, 0, 12)  # 2 classes x 3 questions x 2 samples
    # 12 answers, and the one GET /models of the backend's check before the first batch
    assert proxy.requests == 13 and 1 < proxy.max_in_flight <= 4 and rows == [(12, 12)]
