"""LLM server faults, against the real ``python -m llama_cpp.server`` (the ``llama_server`` fixture)
behind a ``FaultProxy``: a real HTTP server in this process that breaks requests on purpose (error
statuses, 429 with Retry-After, silence past the client's timeout, bodies cut short, malformed JSON,
empty answers) or closes its port (connection refused) and opens it again.

What a user must be able to rely on: bounded retries with back-off, then one clear error saying
how many requests failed, why, and which classes and templates are missing, with no API key in
it; every answer that came back stored once; a re-run asks only for the rest; and the run's
status and error in the ``runs`` table.

Two classes of Fashion-MNIST x the first one or two ``generic`` questions x one sample: 2 or 4
requests; the proxy breaks those about ``trouser`` (class 1) and lets ``T-shirt or top`` (class 0)
through. Short timeouts only where a timeout is the fault, with one question, so the healthy request
is alone at the server (answers queue there, one at a time).
"""

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import TINY, Fault, FaultProxy, assert_secret_nowhere

from textadapt import TextadaptError
from textadapt.config import Settings
from textadapt.datasets import find_spec, restrict
from textadapt.llm import Sampling, make_backend
from textadapt.pipeline import GenerationStats, generate, plan_generations
from textadapt.prompts import list_templates
from textadapt.store import Store

KEY = "sk-faults-9c4e2a-not-a-real-key"
SAMPLING = Sampling(temperature=0.99, max_tokens=12)
BAD, GOOD = "trouser", "T-shirt or top"
CLI = str(Path(sys.executable).parent / "textadapt")


@pytest.fixture(scope="module")
def two_classes():
    settings = Settings()
    spec, _ = restrict(find_spec("fashion-mnist", settings.dataset_search_path), None, 2, None)
    templates = list_templates(settings.prompts_dir, ["generic"])
    assert spec.classes == [GOOD, BAD] and len(templates) == 5
    return spec, templates


def about(class_name: str, fault: Fault, attempts: int | None = None):
    """Break the requests whose prompt names ``class_name``: all of them, or only each one's first ``attempts``."""

    def decide(n: int, body: dict) -> Fault | None:
        prompt = body["messages"][0]["content"]
        if class_name not in prompt:
            return None
        decide.tries[prompt] += 1
        return fault if attempts is None or decide.tries[prompt] <= attempts else None

    decide.tries = Counter()
    return decide


def run_generation(url: str, two_classes, db: Path, questions: int = 5, **settings) -> GenerationStats:
    """The generation stage of a run (what ``textadapt run`` does before training) for the first
    ``questions`` generic questions, into the cache file ``db``."""
    spec, templates = two_classes
    templates = templates[:questions]
    backend = make_backend("openai:smollm2", Settings(llm_base_url=url, llm_api_key=KEY, llm_n_per_request=False, **settings))
    plan = plan_generations(spec, templates, backend.identity, SAMPLING, samples=1)
    with Store(db) as store:
        return generate(plan, backend, store, spec)


def stored(db: Path) -> list[tuple]:
    """(class, template, rows) of every stored generation."""
    with Store(db, read_only=True) as s:
        return s.sql("SELECT class_name, template, count(*) FROM generations GROUP BY ALL ORDER BY ALL")[1]


def attempt_gaps(proxy: FaultProxy, class_name: str) -> list[list[float]]:
    """For each request about ``class_name``: the seconds between its successive attempts."""
    times: dict[str, list[float]] = {}
    for s in proxy.seen:
        if class_name in s.prompt:
            times.setdefault(s.prompt, []).append(s.at)
    return [[b - a for a, b in zip(t, t[1:])] for t in times.values()]


PERSISTENT = [
    # fault, what the error must say, client settings, attempts per request
    pytest.param(Fault("status", 500), "InternalServerError: Error code: 500", {}, 3, id="http-500"),
    pytest.param(
        Fault("status", 503, headers=(("Retry-After", "0.3"),)), "InternalServerError: Error code: 503", {}, 3, id="http-503"
    ),
    pytest.param(Fault("status", 429, headers=(("Retry-After", "1"),)), "RateLimitError: Error code: 429", {}, 3, id="http-429"),
    # one question: the healthy request is alone at the server, well within the short timeout
    pytest.param(
        Fault("stall", seconds=6),
        "APITimeoutError: Request timed out",
        {"questions": 1, "llm_timeout": 5, "llm_max_retries": 1},
        2,
        id="timeout",
    ),
    pytest.param(
        Fault("truncate"),
        "RemoteProtocolError: peer closed connection without sending complete message body",
        {},
        3,
        id="truncated-body",
    ),
    pytest.param(Fault("malformed"), "MalformedResponse: the response is not valid JSON", {}, 1, id="malformed-json"),
]


@pytest.mark.parametrize("fault, reason, settings, attempts", PERSISTENT)
def test_a_server_fault_costs_only_the_failed_requests(llama_server, two_classes, tmp_path, fault, reason, settings, attempts):
    db = tmp_path / "cache.duckdb"
    settings = {"questions": 2, "llm_max_retries": 2, **settings}  # 2 classes x 2 questions, unless the case says
    q = settings["questions"]
    asked = [t.name for t in two_classes[1][:q]]
    with FaultProxy(llama_server, about(BAD, fault)) as proxy:
        with pytest.raises(TextadaptError) as err:
            run_generation(proxy.url, two_classes, db, **settings)
        msg = str(err.value)
        # one error: how many failed, where, why, which classes and templates are missing; never the key
        assert f"{q} of {2 * q} LLM requests failed at {proxy.url}" in msg
        assert f"{reason}" in msg and f"({q} request{'s' * (q > 1)})" in msg, msg  # one reason for all of them
        assert f"Not generated ({q} of {2 * q} planned; the rest are stored): 'trouser': {', '.join(asked)}." in msg
        assert KEY not in msg and GOOD not in msg
        # every answer that came back is stored, once
        assert stored(db) == [(GOOD, name, 1) for name in asked]
        # bounded retries: each failing request was tried 1 + max_retries times (a malformed 200 is not retried)
        gaps = attempt_gaps(proxy, BAD)
        assert len(gaps) == q and all(len(g) == attempts - 1 for g in gaps)
        retry_after = dict(fault.headers).get("Retry-After")
        for g in gaps:
            if retry_after:  # the server's Retry-After, not the client's own back-off
                assert all(float(retry_after) - 0.05 <= x < float(retry_after) + 2 for x in g), g
            elif fault.kind == "status":  # answered at once: the gaps are the back-off, 0.5 s then 1 s less up to 25% jitter
                assert 0.37 <= g[0] < 2 and 0.74 <= g[1] < 3, g
            else:  # the gaps also hold the time the fault took (an upstream answer, a timeout)
                assert all(x >= 0.37 for x in g), g
        # the server is well again: a re-run asks only for the ones that failed
        proxy.fault = lambda n, body: None
        before = len(proxy.seen)
        again = run_generation(proxy.url, two_classes, db, **{**settings, "llm_timeout": 60})
    assert (again.made, again.cached) == (q, q)
    assert len(proxy.seen) - before == q and all(BAD in s.prompt for s in proxy.seen[before:])
    assert [r[2] for r in stored(db)] == [1] * 2 * q


@pytest.mark.parametrize(
    "fault, settings",
    [
        pytest.param(Fault("status", 500), {}, id="http-500"),
        pytest.param(Fault("truncate"), {}, id="truncated-body"),
        pytest.param(Fault("stall", seconds=6), {"llm_timeout": 5}, id="timeout"),  # one question: alone at the server
    ],
)
def test_a_passing_fault_is_retried_and_costs_nothing(llama_server, two_classes, tmp_path, fault, settings):
    """Each request about trousers fails once; the client's retry gets it."""
    q = 1 if fault.kind == "stall" else 2
    with FaultProxy(llama_server, about(BAD, fault, attempts=1)) as proxy:
        stats = run_generation(proxy.url, two_classes, tmp_path / "c.duckdb", questions=q, llm_max_retries=2, **settings)
    assert stats.made == 2 * q
    assert [r[2] for r in stored(tmp_path / "c.duckdb")] == [1] * 2 * q  # stored once each, retries included
    assert Counter(s.fault for s in proxy.seen) == {None: 2 * q, fault.kind: q}


def test_retry_after_is_honoured(llama_server, two_classes, tmp_path):
    """A 429 saying Retry-After: 2 is retried after 2 s, not after the client's own 0.5 s back-off."""
    with FaultProxy(llama_server, about(BAD, Fault("status", 429, headers=(("Retry-After", "2"),)), attempts=1)) as proxy:
        stats = run_generation(proxy.url, two_classes, tmp_path / "c.duckdb", questions=2, llm_max_retries=2)
    assert stats.made == 4
    gaps = attempt_gaps(proxy, BAD)
    assert len(gaps) == 2 and all(len(g) == 1 and 2.0 <= g[0] < 4.0 for g in gaps), gaps


def test_server_stopped_mid_run_and_restarted(llama_server, two_classes, tmp_path):
    """The port closes after the second request (connections refused) and opens again 1.5 s later:
    the client's retries ride it out, and every generation is stored once."""
    proxy = FaultProxy(llama_server)
    proxy.fault = lambda n, body: proxy.outage(1.5) if n == 1 else None
    with proxy:
        stats = run_generation(proxy.url, two_classes, tmp_path / "c.duckdb", questions=2, llm_concurrency=1, llm_max_retries=5)
    assert stats.made == 4 and len(proxy.seen) == 4  # a refused attempt never reaches the proxy's handler
    assert [r[2] for r in stored(tmp_path / "c.duckdb")] == [1] * 4
    silence = max(b.at - a.at for a, b in zip(proxy.seen, proxy.seen[1:]))
    assert silence >= 1.5  # the outage happened, mid-run, and was waited out


def test_server_that_stays_down_keeps_what_it_answered(llama_server, two_classes, tmp_path):
    db = tmp_path / "c.duckdb"
    proxy = FaultProxy(llama_server)
    proxy.fault = lambda n, body: proxy.outage(None) if n == 1 else None  # answers 2, then its port is closed
    with proxy:
        with pytest.raises(TextadaptError) as err:
            run_generation(proxy.url, two_classes, db, questions=2, llm_concurrency=1, llm_max_retries=1)
        msg = str(err.value)
        assert f"2 of 4 LLM requests failed at {proxy.url}" in msg
        assert "APIConnectionError: Connection error. (ConnectionRefusedError: [Errno 111] Connect call failed" in msg, msg
        assert "Not generated (2 of 4 planned" in msg and KEY not in msg
        assert sum(r[2] for r in stored(db)) == 2
        proxy.start()  # the same port again
        again = run_generation(proxy.url, two_classes, db, questions=2, llm_concurrency=1)
    assert (again.made, again.cached) == (2, 2)
    assert [r[2] for r in stored(db)] == [1] * 4


def test_empty_answers_are_stored_as_rejected(llama_server, two_classes, tmp_path):
    db = tmp_path / "c.duckdb"
    with FaultProxy(llama_server, about(BAD, Fault("content", content=b""))) as proxy:
        stats = run_generation(proxy.url, two_classes, db, questions=2)
        again = run_generation(proxy.url, two_classes, db, questions=2)
    assert stats.made == 4
    assert (again.made, again.cached) == (0, 4) and len(proxy.seen) == 4  # a rejected answer is not asked for again
    with Store(db, read_only=True) as s:
        rows = s.sql("SELECT class_name, raw_text, description, rejected FROM generations ORDER BY class_name")[1]
    assert [r[1:] for r in rows if r[0] == BAD] == [("", None, "empty")] * 2
    # the good class got real answers (sampled: SmolLM2 may still say something cleaning rejects, never "empty")
    assert all(r[1] and r[3] != "empty" for r in rows if r[0] == GOOD) and len(rows) == 4


def textadapt(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)


def test_a_failed_run_is_recorded_and_the_rerun_asks_only_for_the_rest(llama_server, home, tmp_path):
    """Through the CLI and the Prefect flow: a server that answers 500 for one class fails the run
    with a clear message and status ``failed`` in DuckDB, keeping the other class's answers; the
    re-run asks only for the failed ones (which now come back empty: rejected, and the class is
    trained on the fallback prompt). The API key is nowhere in what either run wrote or printed."""
    key = "sk-flow-5e7d1b-never-stored"
    prompts = tmp_path / "prompts" / "generic"  # two of the generic questions: 2 classes x 2 questions per run
    prompts.mkdir(parents=True)
    for name in ("caption", "look"):
        shutil.copy(Settings().prompts_dir / "generic" / f"{name}.j2", prompts)
    args = [
        "run",
        "fashion-mnist",
        "--llm",
        "openai:smollm2",
        "--backbone",
        TINY,
        "--templates",
        "generic",
        "--max-classes",
        "2",
        "--samples",
        "1",
        "--max-tokens",
        "12",
        "--train-only",
        "--steps",
        "10",
    ]
    with FaultProxy(llama_server, about(BAD, Fault("status", 500))) as proxy:
        env = {
            **os.environ,
            "TEXTADAPT_LLM_BASE_URL": proxy.url,
            "TEXTADAPT_LLM_API_KEY": key,
            "TEXTADAPT_LLM_MAX_RETRIES": "1",
            "TEXTADAPT_PROMPTS_DIR": str(prompts.parent),
            "PREFECT_LOGGING_LEVEL": "DEBUG",
            "OPENAI_LOG": "debug",
        }  # the most a user could log
        failed = textadapt(*args, env=env)
        assert failed.returncode == 2, failed.stdout + failed.stderr
        shown = " ".join(failed.stderr.split())  # the console wraps long lines
        assert "error: 2 of 4 LLM requests failed" in shown and "InternalServerError: Error code: 500" in shown
        assert "Not generated (2 of 4 planned; the rest are stored): 'trouser': generic/caption, generic/look." in shown
        with Store(home / "textadapt.duckdb", read_only=True) as s:
            [(status, error, llm)] = s.sql("SELECT status, error, llm FROM runs")[1]
            kept = s.sql("SELECT class_name, count(*) FROM generations GROUP BY ALL")[1]
        assert status == "failed" and llm == f"openai:smollm2@{proxy.url}"
        assert (
            error.startswith("TextadaptError: 2 of 4 LLM requests failed") and "Error code: 500" in error and "'trouser'" in error
        )
        assert kept == [(GOOD, 2)]

        proxy.fault = about(BAD, Fault("content", content=b""))  # up again, but with nothing to say about trousers
        rerun = textadapt(*args, env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "2 LLM calls, 2 cached" in rerun.stdout
    assert "no accepted description for 1 classes (trouser)" in " ".join(rerun.stderr.split())
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        assert s.sql("SELECT status FROM runs ORDER BY started_at")[1] == [("failed",), ("completed",)]
        # (SmolLM2's answers about the good class are sampled: accepted or not, they are stored once)
        assert s.sql(
            "SELECT class_name, count(*), count(*) FILTER (rejected = 'empty') FROM generations GROUP BY ALL ORDER BY ALL"
        )[1] == [(GOOD, 2, 0), (BAD, 2, 2)]
    report = Path(re.search(r"report: (\S+\.md)", rerun.stdout).group(1)).read_text()
    assert "| generic | 4 |" in report and "empty: 2" in report and 'trained on "a photo of a {class}." for them' in report
    prefect_home = Path(os.environ["PREFECT_HOME"])
    assert_secret_nowhere(key, [home, prefect_home], failed.stdout, failed.stderr, rerun.stdout, rerun.stderr)
    # ... and that search looked where Prefect keeps runs: its database holds the failed run's error
    assert b"2 of 4 LLM requests failed" in b"".join(f.read_bytes() for f in prefect_home.rglob("prefect.db*"))
