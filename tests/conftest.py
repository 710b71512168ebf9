import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

# Prefect keeps its temporary API's database under PREFECT_HOME: keep it out of the user's home.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="textadapt-prefect-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Session fixtures (tiny_backbone) are set up before the per-test ``home`` below: what they write (the backbone's
# resolution record) goes to a home of the session's, never the user's.
os.environ["TEXTADAPT_HOME"] = tempfile.mkdtemp(prefix="textadapt-home-")

REPO = Path(__file__).resolve().parent.parent
TINY = "textadapt-tiny:random"  # a 2-layer open_clip config shipped in textadapt/model_configs

# The fixtures below that start a real server process. A test that uses one is slow (pytest.mark.slow: make test-fast
# leaves it out), as is every test in SLOW_TESTS (docs/development.md).
SERVER_FIXTURES = {"llama_server", "prefect_server"}

# The tests that took 5 s or more each without a server (`pytest -m "not slow" --durations=60`, 2 busy cores,
# 2026-11-30): whole CLI runs, writer processes, real ViT-B-32 / CoCa models. Without them `make test-fast` ran its 415
# tests in 4.6 min beside a full suite run on the same 2 cores; add a test here when --durations shows it has joined them.
SLOW_TESTS = {
    "tests/test_adapters.py::test_chunked_steps_give_the_full_batch_weights",
    "tests/test_adapters.py::test_chunked_steps_with_otter_plans_give_the_full_batch_weights",
    "tests/test_adapters.py::test_tap_head_trained_on_text_classifies_shifted_images",
    "tests/test_backbone_loading.py::test_a_run_with_the_openai_tag_uses_the_quickgelu_model",
    "tests/test_backbone_loading.py::test_gelu_and_quickgelu_builds_of_the_same_weights_are_different_models",
    "tests/test_backbone_loading.py::test_openai_tag_loads_the_cached_weights_with_quickgelu_towers",
    "tests/test_cache_concurrency.py::test_a_reader_left_open_does_not_stall_the_writer",
    "tests/test_cache_concurrency.py::test_a_writer_killed_mid_write_leaves_a_cache_that_opens_and_a_rerun_completes",
    "tests/test_cache_concurrency.py::test_readers_see_every_batch_while_the_writer_writes_and_folds",
    "tests/test_cache_views.py::test_textadapt_sql_and_the_duckdb_shell_answer_while_a_run_writes",
    "tests/test_compare.py::test_compare_two_real_runs_before_and_after_an_edit",
    "tests/test_descriptions.py::test_cupl_imagenet_file_imports_against_the_imagenet_spec",
    "tests/test_export_and_baselines.py::test_exported_classifier_predicts_what_the_run_scored",
    "tests/test_export_and_baselines.py::test_predict_refuses_what_it_cannot_use",
    "tests/test_export_and_baselines.py::test_zero_shot_equals_clip_benchmark",
    "tests/test_flow.py::test_a_run_killed_mid_generation_loses_only_what_was_in_flight",
    "tests/test_flow.py::test_a_run_killed_with_kill_9_leaves_no_process_behind",
    "tests/test_flow.py::test_bad_input_fails_before_prefect_is_imported",
    "tests/test_flow.py::test_published_descriptions_train_without_an_llm",
    "tests/test_flow.py::test_run_caches_everything_and_reports_every_method",
    "tests/test_flow.py::test_strict_backbone_fails_before_any_llm_call",
    "tests/test_harness.py::test_every_adapter_trains_through_the_harness",
    "tests/test_harness.py::test_noise_augmentation_narrows_a_modality_gap",
    "tests/test_llm.py::test_smollm2_answers_one_sentence_and_is_reproducible",
    "tests/test_llm_requests.py::test_a_run_against_a_closed_port_fails_in_seconds",
    "tests/test_llm_requests.py::test_in_process_llama_cpp_is_given_every_sampler",
    "tests/test_new_dataset.py::test_a_run_names_every_bad_input_at_once_before_any_llm_call",
    "tests/test_new_dataset.py::test_an_image_folder_becomes_a_dataset_with_two_commands_and_runs",
    "tests/test_prompt_learning.py::test_match_objective_moves_classes_towards_their_descriptions",
    "tests/test_prompt_learning.py::test_protext_trains_as_protexts_code",
    "tests/test_prompt_learning.py::test_training_fits_descriptions_and_generalises",
    "tests/test_reference_agreement.py::test_coca_caption_likelihood_is_open_clips_caption_loss",
    "tests/test_reference_agreement.py::test_waffle_score_is_the_mean_of_the_similarities",
    "tests/test_report.py::test_html_report_is_self_contained_and_matches_the_scores",
    "tests/test_stages.py::test_the_harness_names_every_text_it_encodes",
    "tests/test_text_tower.py::test_length_aware_encoding_equals_open_clip",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) or f"tests/{name}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own TEXTADAPT_HOME (cache file, reports)."""
    h = tmp_path / "home"
    monkeypatch.setenv("TEXTADAPT_HOME", str(h))
    for var in ("TEXTADAPT_DB", "TEXTADAPT_CONFIG", "TEXTADAPT_BACKBONE", "TEXTADAPT_LLM"):
        monkeypatch.delenv(var, raising=False)
    return h


@pytest.fixture(scope="session")
def tiny_backbone():
    from textadapt.encoders import load_backbone

    return load_backbone(TINY, "cpu")


@pytest.fixture(scope="session")
def fmnist():
    from textadapt.config import Settings
    from textadapt.datasets import find_spec

    return find_spec("fashion-mnist", Settings().dataset_search_path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(name: str, proc: subprocess.Popen, url: str, log_path: Path, seconds: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or stays silent."""
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with code {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"{name} did not answer GET {url} within {seconds:.0f} s:\n{log_path.read_text(errors='replace')[-3000:]}"
            )
        time.sleep(0.3)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """A real OpenAI-compatible server: ``python -m llama_cpp.server`` serving SmolLM2 as ``smollm2``.
    Yields its base URL (``http://127.0.0.1:PORT/v1``)."""
    from textadapt.llm import smollm2_path

    port = free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    # One thread: as fast for this 135M model, and it never spins at a thread barrier. With 2 threads on
    # 2 cores, any other busy process (a llama.cpp or torch run beside the tests) slowed answers from
    # 0.3 s to over a minute (past the client's timeout); with 1 thread they stay seconds.
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(smollm2_path()),
        "--model_alias",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "1024",
        "--n_threads",
        "1",
    ]
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"

    try:
        wait_until_up("llama_cpp.server", proc, f"{base_url}/models", log_path, 60)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Fault:
    """What ``FaultProxy`` does with one request instead of forwarding it faithfully.

    kind: ``status`` (answer HTTP ``status`` with an error body and ``headers``, e.g. Retry-After),
    ``stall`` (say nothing for ``seconds``, then close), ``truncate`` (forward, then close halfway
    through the body), ``malformed`` (a 200 whose JSON body is cut short), ``content`` (forward, then
    put ``content``, raw bytes, in place of the answer's text: empty, invalid UTF-8, huge).
    """

    kind: str
    status: int = 500
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0
    content: bytes = b""


@dataclass(frozen=True)
class Seen:
    at: float  # time.monotonic() when the request arrived
    prompt: str
    fault: str | None  # the Fault's kind, None if forwarded faithfully
    body: dict | None = None  # the request's JSON body, as the server received it


class FaultProxy:
    """A real HTTP server on 127.0.0.1 in front of an OpenAI-compatible server, which misbehaves on
    purpose. ``fault(n, body)`` is asked for the ``n``-th request (0-based, retries count) with its
    JSON body and returns a ``Fault`` or None (forward faithfully); ``seen`` lists every request (POST;
    a GET, such as the backends' ``GET /models`` preflight, is forwarded faithfully and not listed).
    ``stop()`` closes its port (connections are refused), ``start()`` opens the same port again.
    Every response closes its connection (HTTP/1.0), so a stopped proxy refuses every later attempt."""

    def __init__(self, upstream: str, fault: Callable[[int, dict], Fault | None] | None = None):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.path = parts.path
        self.fault = fault or (lambda n, body: None)
        self.seen: list[Seen] = []
        self.port = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self) -> "FaultProxy":
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def outage(self, seconds: float | None) -> None:
        """Stop now (in the background: a request being answered is finished) and start again on the
        same port after ``seconds``; None: stay down."""

        def down_and_up():
            self.stop()
            if seconds is not None:
                time.sleep(seconds)
                self.start()

        threading.Thread(target=down_and_up, daemon=True).start()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _forward(self, path: str, body: bytes | None, method: str = "POST") -> tuple[int, bytes, str]:
        con = http.client.HTTPConnection(*self.upstream, timeout=300)
        try:
            con.request(method, path, body, {"Content-Type": "application/json"} if body is not None else {})
            resp = con.getresponse()
            return resp.status, resp.read(), resp.getheader("Content-Type", "application/json")
        finally:
            con.close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def reply(
                self,
                status: int,
                body: bytes,
                content_type: str = "application/json",
                headers: tuple[tuple[str, str], ...] = (),
                send: int | None = None,
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body if send is None else body[:send])
                self.wfile.flush()

            def do_GET(self) -> None:
                self.reply(*proxy._forward(self.path, None, "GET"))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = json.loads(body)
                prompt = request["messages"][0]["content"] if request.get("messages") else ""
                with proxy._lock:
                    fault = proxy.fault(len(proxy.seen), request)
                    proxy.seen.append(Seen(time.monotonic(), prompt, fault.kind if fault else None, request))
                if fault is None:
                    self.reply(*proxy._forward(self.path, body))
                elif fault.kind == "status":
                    error = {"error": {"message": f"injected HTTP {fault.status}", "type": "injected", "code": fault.status}}
                    self.reply(fault.status, json.dumps(error).encode(), headers=fault.headers)
                elif fault.kind == "stall":
                    time.sleep(fault.seconds)  # then close without a word
                elif fault.kind == "truncate":
                    status, data, ctype = proxy._forward(self.path, body)
                    self.reply(status, data, ctype, send=len(data) // 2)  # Content-Length says the whole
                elif fault.kind == "malformed":
                    self.reply(
                        200,
                        b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assi',
                    )
                elif fault.kind == "content":
                    status, data, ctype = proxy._forward(self.path, body)
                    answer = json.loads(data)
                    for choice in answer["choices"]:
                        choice["message"]["content"] = "@@CONTENT@@"
                    self.reply(status, json.dumps(answer).encode().replace(b"@@CONTENT@@", fault.content), ctype)
                else:
                    raise ValueError(f"unknown fault {fault.kind!r}")

        return Handler


def assert_secret_nowhere(secret: str, roots: list[Path], *outputs: str) -> None:
    """``secret`` (and its distinctive middle, in case something cut or partly masked it) is in no
    output, in no file under ``roots`` as bytes, and in no value of any table of any DuckDB file
    there (DuckDB may compress strings on disk, so its files are also read through DuckDB)."""
    import duckdb

    needles = [secret, secret[len(secret) // 4 : 3 * len(secret) // 4]]
    for out in outputs:
        assert not [n for n in needles if n in out], f"the secret is in the output:\n{out[-2000:]}"
    files = [f for root in roots for f in Path(root).rglob("*") if f.is_file()]
    assert files, f"nothing was written under {roots}"
    hits = [f for f in files for n in needles if n.encode() in f.read_bytes()]
    assert not hits, f"the secret is in {hits}"
    for f in files:
        if f.suffix == ".duckdb":
            con = duckdb.connect(str(f), read_only=True)
            try:
                for (table,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
                    text = str(con.execute(f'SELECT * FROM "{table}"').fetchall())
                    assert not [n for n in needles if n in text], f"the secret is in table {table} of {f}"
            finally:
                con.close()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 with its own PREFECT_HOME (SQLite), one per test module; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    log_path = home / "server.log"
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_until_up("prefect server", proc, f"{api}/health", log_path, 180)
        yield api
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session): it and its workers
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
