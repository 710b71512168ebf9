"""The openai:MODEL backend against a real OpenAI-compatible server (``python -m llama_cpp.server``
serving SmolLM2, started once by the ``llama_server`` fixture), no mock. Concurrency is shown by a
TCP proxy in front of the server that counts the requests awaiting a response."""

import asyncio
import threading
from urllib.parse import urlsplit

import pytest
from conftest import assert_secret_nowhere, free_port

from textadapt import TextadaptError
from textadapt.config import Settings
from textadapt.llm import LLMUnreachable, OpenAIBackend, Request, Sampling, make_backend, split_completion_tokens

KEY = "sk-test-7f3a9c-not-a-real-key"
SAMPLING = Sampling(temperature=0.99, max_tokens=20)


def question(thing: str) -> str:
    return f"What does a {thing} look like? Answer in one sentence."


def backend(base_url: str, **settings) -> OpenAIBackend:
    b = make_backend("openai:smollm2", Settings(llm_base_url=base_url, llm_api_key=KEY, **settings))
    assert isinstance(b, OpenAIBackend)
    return b


def requests(things: list[str], samples: int) -> list[Request]:
    return [Request(f"{t}-{i}", question(t), SAMPLING, seed=100 + i) for t in things for i in range(samples)]


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of an HTTP/1.1 server. A connection holds a request from the
    client's first bytes of it until the server's first bytes of the response; ``max_in_flight`` is the
    most connections holding one at the same moment."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.path = parts.path
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def __enter__(self):
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)
        return self

    def __exit__(self, *exc):
        async def shutdown():
            self.server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        self._tasks.add(asyncio.current_task())
        awaiting = False

        def start():
            nonlocal awaiting
            if not awaiting:
                awaiting = True
                self.requests += 1
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def answered():
            nonlocal awaiting
            if awaiting:
                awaiting = False
                self.in_flight -= 1

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, on_data):
            while data := await src.read(65536):
                on_data()
                dst.write(data)
                await dst.drain()

        server_w = None
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
            tasks = {
                asyncio.ensure_future(pipe(client_r, server_w, start)),
                asyncio.ensure_future(pipe(server_r, client_w, answered)),
            }
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            answered()
            for w in (client_w, server_w):
                if w is not None:
                    w.close()
            self._tasks.discard(asyncio.current_task())


def test_http_backend_answers_with_token_usage(llama_server):
    b = backend(llama_server)  # llm_n_per_request unset: the first group probes whether `n` is honoured
    reqs = requests(["sandal", "shirt"], samples=2)
    got = list(b.generate(reqs))
    assert sorted(r.key for r, _ in got) == sorted(r.key for r in reqs)  # each request answered once
    for req, ans in got:
        assert ans.text.strip(), req
        assert ans.prompt_tokens and ans.prompt_tokens > 10
        assert ans.completion_tokens and 0 < ans.completion_tokens <= SAMPLING.max_tokens
        assert ans.seconds > 0
    # llama_cpp.server answers one choice whatever `n` asks: the probe falls back to a request per sample
    assert b.n_per_request is False
    assert b.http_requests == len(reqs)


def test_samples_missing_from_an_n_request_are_asked_one_by_one(llama_server):
    b = backend(llama_server, llm_n_per_request=True)  # told (wrongly, for this server) that `n` works
    reqs = requests(["bag"], samples=3)
    got = list(b.generate(reqs))
    assert sorted(r.key for r, _ in got) == sorted(r.key for r in reqs)
    assert b.http_requests == 3  # one with n=3 that came back with 1 choice, then 2 single requests
    assert all(a.completion_tokens for _, a in got)


def test_requests_are_in_flight_at_once(llama_server):
    with CountingProxy(llama_server) as proxy:
        b = backend(proxy.url, llm_concurrency=4, llm_n_per_request=False)
        reqs = requests(["sneaker", "coat", "dress"], samples=2)
        got = list(b.generate(reqs))
    assert len(got) == len(reqs)
    assert proxy.requests == 1 + len(reqs)  # the preflight GET /models, then the chat requests
    # Seen from outside: several requests awaited their response at the same moment, never more than allowed.
    assert 1 < proxy.max_in_flight <= 4
    assert 1 < b.max_in_flight <= 4


def test_stopping_early_cancels_what_is_in_flight(llama_server):
    b = backend(llama_server, llm_concurrency=4, llm_n_per_request=False)
    gen = b.generate(requests(["trouser", "pullover", "boot"], samples=2))
    first_req, first_ans = next(gen)
    assert first_ans.text
    gen.close()  # the caller stops (e.g. its database write failed): nothing keeps running behind it
    assert b._in_flight == 0 and not asyncio.all_tasks(b._loop)  # what was in flight was cancelled, and has unwound
    thread = b._loop_thread
    b.close()  # the backend's event loop and HTTP client stop with it
    assert thread.name == "textadapt-openai" and not thread.is_alive()


def test_one_failing_request_does_not_stop_the_others(llama_server):
    b = backend(llama_server, llm_n_per_request=False)
    reqs = requests(["sandal", "shirt"], samples=1)
    reqs.append(Request("too-long", "word " * 1500, SAMPLING, seed=1))  # over the server's 1024-token context
    got = []
    with pytest.raises(TextadaptError) as err:
        for pair in b.generate(reqs):
            got.append(pair)
    assert sorted(r.key for r, _ in got) == ["sandal-0", "shirt-0"]  # yielded before the error
    msg = str(err.value)
    assert "1 of 3 LLM requests failed" in msg and llama_server in msg and "BadRequestError" in msg
    assert KEY not in msg


def test_refused_connection_reports_the_url_without_the_key():
    port = free_port()  # nothing listens there
    b = make_backend(
        "openai:smollm2",
        Settings(
            llm_base_url=f"http://127.0.0.1:{port}/v1",
            llm_api_key=KEY,
            llm_max_retries=1,
            llm_timeout=2,
        ),
    )
    reqs = requests(["sandal"], samples=2) + requests(["shirt"], samples=1)
    got = []
    with pytest.raises(LLMUnreachable) as err:  # the preflight: no request is sent
        for pair in b.generate(reqs):
            got.append(pair)
    assert got == [] and b.http_requests == 0
    msg = str(err.value)
    assert f"cannot reach the LLM server at http://127.0.0.1:{port}/v1" in msg
    assert "APIConnectionError" in msg and "ConnectionRefusedError" in msg
    assert KEY not in msg


def test_identity_is_stable_and_excludes_the_key(monkeypatch):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    expected = f"openai:smollm2@{url}"
    one = make_backend("openai:smollm2", Settings(llm_base_url=url, llm_api_key=KEY))
    other_key = make_backend("openai:smollm2", Settings(llm_base_url=url + "/", llm_api_key="another-key"))
    in_url = make_backend("openai:smollm2", Settings(llm_base_url=f"http://u:{KEY}@127.0.0.1:{port}/v1?key={KEY}"))
    assert one.identity == other_key.identity == in_url.identity == expected
    for b in (one, in_url):
        assert KEY not in b.identity and KEY not in repr(b)
    # the environment: TEXTADAPT_LLM_* first, OPENAI_* as the fallback; the key never shows in a dump
    monkeypatch.setenv("OPENAI_BASE_URL", "http://10.0.0.1:8000/v1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("TEXTADAPT_LLM_BASE_URL", raising=False)
    monkeypatch.delenv("TEXTADAPT_LLM_API_KEY", raising=False)
    s = Settings()
    assert s.llm_api_key.get_secret_value() == KEY and KEY not in s.model_dump_json() and KEY not in repr(s)
    assert make_backend("openai:m", s).identity == "openai:m@http://10.0.0.1:8000/v1"
    monkeypatch.setenv("TEXTADAPT_LLM_BASE_URL", url)
    assert make_backend("openai:smollm2").identity == expected
    monkeypatch.delenv("TEXTADAPT_LLM_BASE_URL")
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert make_backend("openai:gpt-4o-mini").identity == "openai:gpt-4o-mini@https://api.openai.com/v1"


def test_openai_without_a_key_says_so_before_any_request(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    b = make_backend("openai:gpt-4o-mini", Settings(llm_api_key=None, llm_base_url=None))
    assert list(b.generate([])) == []  # a run served from the cache needs no key
    with pytest.raises(TextadaptError, match="OPENAI_API_KEY"):
        list(b.generate(requests(["sandal"], samples=1)))
    with pytest.raises(TextadaptError, match="openai:MODEL"):
        make_backend("openai:")


def test_usage_of_an_n_choice_response_is_split_to_its_total():
    # a choice cut at max_tokens used max_tokens; the rest is shared by the answers' lengths
    assert split_completion_tokens(50, ["aaaa", "aa", "x" * 40], ["stop", "stop", "length"], 20) == [20, 10, 20]
    shares = split_completion_tokens(10, ["abc", "abc", "abc"], ["stop"] * 3, 20)
    assert sum(shares) == 10 and max(shares) - min(shares) == 1
    assert split_completion_tokens(6, ["", ""], ["stop", "stop"], 20) == [3, 3]
    assert split_completion_tokens(None, ["a", "b"], ["stop", "stop"], 20) == [None, None]
    assert split_completion_tokens(7, ["a"], ["stop"], 20) == [7]


def test_a_flow_run_through_the_http_backend_keeps_requests_in_flight(llama_server, home, monkeypatch):
    """The whole `textadapt run`, through a counting proxy: several requests at once, every answer
    stored, and the API key nowhere in what the run leaves behind."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import TINY

    from textadapt.store import Store

    key = "sk-test-do-not-store-4f1c9"
    with CountingProxy(llama_server) as proxy:
        monkeypatch.setenv("TEXTADAPT_LLM_BASE_URL", proxy.url)
        monkeypatch.setenv("TEXTADAPT_LLM_API_KEY", key)
        monkeypatch.setenv("TEXTADAPT_LLM_CONCURRENCY", "4")
        p = subprocess.run(
            [
                str(Path(sys.executable).parent / "textadapt"),
                "run",
                "fashion-mnist",
                "--llm",
                "openai:smollm2",
                "--backbone",
                TINY,
                "--templates",
                "targeted",
                "--max-classes",
                "2",
                "--samples",
                "2",
                "--max-images",
                "100",
                "--steps",
                "10",
            ],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
            timeout=900,
            stdin=subprocess.DEVNULL,
        )
    assert p.returncode == 0, p.stdout + p.stderr
    # 2 classes x 5 questions x 2 samples, and the flow's preflight GET /models
    assert proxy.requests == 1 + 20 and 1 < proxy.max_in_flight <= 4
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        assert s.sql("SELECT count(*), count(DISTINCT model) FROM generations")[1] == [(20, 1)]
        assert s.sql("SELECT model FROM generations LIMIT 1")[1][0][0] == f"openai:smollm2@{proxy.url}"
    assert_secret_nowhere(key, [home, Path(os.environ["PREFECT_HOME"])], p.stdout, p.stderr)
