"""What each backend is asked: the recipe's sampling sent explicitly and keyed, reasoning models, structured
output for list templates, a pinned identity, a server that refuses connections, vLLM's engine arguments.

Against real servers: ``python -m llama_cpp.server`` (the ``llama_server`` fixture) behind ``FaultProxy``,
which records every request body as the server received it; and ``ReasoningStandIn``, a small real HTTP
server on 127.0.0.1 that enforces the API shape of OpenAI's reasoning models with OpenAI's error bodies.
"""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import TINY, FaultProxy, free_port

from textadapt import TextadaptError
from textadapt.config import Settings
from textadapt.datasets import restrict
from textadapt.llm import LIST_SCHEMA, LLMUnreachable, OpenAIBackend, Request, Sampling, make_backend, not_sent
from textadapt.pipeline import generate, plan_generations
from textadapt.prompts import list_templates
from textadapt.store import Store

TAP = Sampling()  # the recipe: temperature 0.99, 50 tokens, stop "."; top_p 1, nothing else
SAMPLING_FIELDS = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "response_format",
    "typical_p",
    "mirostat_mode",
    "tfs_z",
}


def http_backend(url: str, model: str = "smollm2", **settings) -> OpenAIBackend:
    b = make_backend(f"openai:{model}", Settings(llm_base_url=url, llm_api_key="sk-test", llm_n_per_request=False, **settings))
    assert isinstance(b, OpenAIBackend)
    return b


def sampled(body: dict) -> dict:
    return {k: v for k, v in body.items() if k in SAMPLING_FIELDS}


# -- the recipe, sent explicitly ---------------------------------------------------------------------------


def test_llama_server_receives_the_recipe_and_nothing_of_its_defaults(llama_server):
    """llama_cpp.server's defaults are top_p 0.95, top_k 40, min_p 0.05, repeat_penalty 1.1: each request must
    switch them off in its own field names, and say the recipe's temperature, length and stop."""
    with FaultProxy(llama_server) as proxy:
        b = http_backend(proxy.url)
        sampling = b.sampling(TAP)
        got = list(b.generate([Request(f"k{i}", "What does a sandal look like?", sampling, seed=i) for i in (1, 2)]))
    assert b.server == "llama.cpp"  # learned from GET /models (owned_by "me")
    assert len(got) == 2 and all(a.text for _, a in got)
    assert [sampled(s.body) for s in proxy.seen] == [
        {
            "temperature": 0.99,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repeat_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "max_tokens": 50,
            "stop": ["."],
        }
    ] * 2
    assert all(a.params is None for _, a in got)  # sent as planned: the stored params are the key's


def test_the_cache_key_holds_all_of_the_sampling(fmnist):
    """Every sampler is in the key: generations cached before (sampled with a library's or server's defaults)
    are not served for the recipe; a reasoning model's and a JSON answer's requests are other generations."""
    templates = list_templates(Settings().prompts_dir, ["generic", "attributes"])
    spec, _ = restrict(fmnist, None, 2, None)
    plain = plan_generations(spec, templates, "m", TAP, 1)
    params = next(p for p in plain if p.template.name.startswith("generic/")).sampling.as_dict()
    assert params == {
        "temperature": 0.99,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": 50,
        "stop": ["."],
        "answer": "text",
    }
    structured = plan_generations(spec, templates, "m", Sampling(structured=True), 1)
    is_list = [p.template.parse == "list" for p in plain]
    assert any(is_list) and not all(is_list)
    for a, b, listed in zip(plain, structured, is_list):
        assert (a.key != b.key) == listed  # only list templates change: their answer is asked for as JSON
        if listed:
            assert b.sampling.answer == "json-list" and b.sampling.stop == ()
    reasoning = plan_generations(spec, templates, "m", Sampling(api="reasoning", reasoning_tokens=100), 1)
    assert not {p.key for p in reasoning} & {p.key for p in plain}
    assert reasoning[0].sampling.as_dict()["not_sent"]["temperature"] == 0.99


# -- structured output ---------------------------------------------------------------------------------------


def list_template():
    return next(t for t in list_templates(Settings().prompts_dir, ["attributes"]) if t.parse == "list")


def test_a_list_template_gets_a_json_schema_from_llama_server(llama_server, fmnist, tmp_path):
    """A ``parse: list`` template through the pipeline: the request asks for LIST_SCHEMA in llama_cpp.server's
    form (json_object + schema; it refuses OpenAI's json_schema), the grammar-constrained JSON answer is parsed
    into the same items."""
    spec, _ = restrict(fmnist, None, 2, None)
    with FaultProxy(llama_server) as proxy, Store(tmp_path / "c.duckdb") as store:
        b = http_backend(proxy.url, llm_timeout=600)  # a grammar slows each token (several times over on a busy machine)
        plan = plan_generations(spec, [list_template()], b.identity, b.sampling(Sampling(max_tokens=40)), 1)
        stats = generate(plan, b, store, spec)
        rows = store.sql("SELECT raw_text, description, rejected, params FROM generations")[1]
    assert stats.made == 2
    assert [s.body.get("response_format") for s in proxy.seen] == [{"type": "json_object", "schema": LIST_SCHEMA}] * 2
    assert all("stop" not in s.body for s in proxy.seen)  # a stop string would cut the JSON
    for raw, description, rejected, params in rows:
        assert raw.lstrip().startswith("{"), raw  # the grammar made it JSON
        assert json.loads(params)["answer"] == "json-list"
        if rejected is None:
            items = description.split("\n")
            assert items and not any('"' in i or "{" in i or "items" in i for i in items), description


# -- reasoning models ---------------------------------------------------------------------------------------------


class ReasoningStandIn:
    """A real HTTP server on 127.0.0.1 with the API shape of OpenAI: ``gpt-4*`` models are chat models, every
    other model a reasoning model (it refuses max_tokens, any temperature or top_p but 1, and stop); like
    OpenAI it refuses fields it does not know (top_k, min_p, ...). Errors are OpenAI's bodies with status 400.
    ``bodies`` lists every chat request's body, ``refused`` the (field, code) of each 400."""

    KNOWN = {
        "model",
        "messages",
        "n",
        "seed",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "response_format",
    }

    def __init__(self):
        self.bodies: list[dict] = []
        self.refused: list[tuple[str, str]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                models = ["gpt-4o-mini", "gpt-5-mini", "my-reasoner"]
                self.send(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "system"} for m in models]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                stand_in.bodies.append(body)
                error = stand_in.refusal(body)
                if error:
                    stand_in.refused.append((error["param"] or error["message"].rsplit(" ", 1)[-1], error["code"]))
                    return self.send(400, {"error": error})
                n = body.get("n") or 1
                listed = "List" in body["messages"][0]["content"]
                text = (
                    '{"items": ["a soft sole", "two straps"]}'
                    if body.get("response_format")
                    else "- a soft sole\n- two straps"
                    if listed
                    else "A sandal has straps. And more"
                )
                self.send(
                    200,
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                            for i in range(n)
                        ],
                        "usage": {"prompt_tokens": 12, "completion_tokens": 40 * n, "total_tokens": 12 + 40 * n},
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @classmethod
    def refusal(cls, body: dict) -> dict | None:
        """OpenAI's error for the first thing it refuses in ``body``, None if it takes it."""
        for name in body:
            if name not in cls.KNOWN:
                return {
                    "message": f"Unrecognized request argument supplied: {name}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
        if body["model"] == "gpt-4-0613" and body.get("response_format"):  # an old model: no structured output
            if body["response_format"]["type"] == "json_schema":
                return {
                    "message": "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.",
                    "type": "invalid_request_error",
                    "param": "response_format",
                    "code": None,
                }
            return {
                "message": "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                "'json_object'.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": None,
            }
        if body["model"].startswith("gpt-4"):
            return None
        if "max_tokens" in body:
            return {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                "'max_completion_tokens' instead.",
                "type": "invalid_request_error",
                "param": "max_tokens",
                "code": "unsupported_parameter",
            }
        for name in ("temperature", "top_p"):
            if name in body and body[name] != 1:
                return {
                    "message": f"Unsupported value: '{name}' does not support {body[name]} with this model. Only the "
                    "default (1) value is supported.",
                    "type": "invalid_request_error",
                    "param": name,
                    "code": "unsupported_value",
                }
        if "stop" in body:
            return {
                "message": "Unsupported parameter: 'stop' is not supported with this model.",
                "type": "invalid_request_error",
                "param": "stop",
                "code": "unsupported_parameter",
            }
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in():
    s = ReasoningStandIn()
    yield s
    s.close()


def reasoning_run(stand_in, model: str, tmp_path, spec, templates=None, **settings):
    """Two classes x one generic question x 2 samples through ``pipeline.generate`` into a fresh cache."""
    templates = templates or list_templates(Settings().prompts_dir, ["generic"])[:1]
    b = http_backend(stand_in.url, model, llm_concurrency=1, **settings)
    plan = plan_generations(spec, templates, b.identity, b.sampling(TAP), 2)
    with Store(tmp_path / f"{model}.duckdb") as store:
        stats = generate(plan, b, store, spec)
        rows = store.sql("SELECT description, rejected, params FROM generations")[1]
    return b, plan, stats, [(d, r, json.loads(p)) for d, r, p in rows]


def test_a_reasoning_model_known_by_name_gets_only_what_it_takes(stand_in, fmnist, tmp_path):
    spec, _ = restrict(fmnist, None, 2, None)
    b, plan, stats, rows = reasoning_run(stand_in, "gpt-5-mini", tmp_path, spec)
    assert stats.made == 4 and stand_in.refused == []  # not one request refused
    assert [sampled(body) for body in stand_in.bodies] == [{"max_completion_tokens": 50 + 2048}] * 4
    # the stored params say what was sent, and what of the recipe was not (the report's source)
    for description, rejected, params in rows:
        assert params["api"] == "reasoning" and params["max_completion_tokens"] == 2098
        assert not_sent(params) == {
            "temperature": 0.99,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "max_tokens": 50,
            "stop": ["."],
        }
        assert description == "A sandal has straps." and rejected is None  # cleaning keeps the first sentence
    # another generation than the chat recipe's for the same identity: the key differs
    chat = plan_generations(spec, list_templates(Settings().prompts_dir, ["generic"])[:1], b.identity, TAP, 2)
    assert not {p.key for p in plan} & {p.key for p in chat}


def test_a_reasoning_model_unknown_by_name_is_learned_from_its_400(stand_in, fmnist, tmp_path):
    """A deployment name says nothing: the first request's 400 (max_tokens) teaches the backend, which asks
    again at once as a reasoning model; every later request goes that way (one refusal in the whole run)."""
    spec, _ = restrict(fmnist, None, 2, None)
    b, plan, stats, rows = reasoning_run(stand_in, "my-reasoner", tmp_path, spec)
    assert stats.made == 4
    assert stand_in.refused == [("max_tokens", "unsupported_parameter")]
    assert [sampled(body) for body in stand_in.bodies[1:]] == [{"max_completion_tokens": 2098}] * 4
    assert all(p["api"] == "reasoning" and not_sent(p)["temperature"] == 0.99 for _, _, p in rows)
    assert b.notes and "reasoning model" in b.notes[0] and "TEXTADAPT_LLM_REASONING" in b.notes[0]


def test_a_chat_model_on_openai_gets_only_openais_fields(stand_in, fmnist, tmp_path):
    """OpenAI (owned_by "system") refuses fields it does not know: none of the other servers' samplers are
    sent, and none is missed, since OpenAI has no top-k, min-p or repetition penalty."""
    spec, _ = restrict(fmnist, None, 2, None)
    b, plan, stats, rows = reasoning_run(stand_in, "gpt-4o-mini", tmp_path, spec)
    assert b.server == "openai" and stats.made == 4 and stand_in.refused == []
    assert [sampled(body) for body in stand_in.bodies] == [
        {"temperature": 0.99, "top_p": 1.0, "max_tokens": 50, "stop": ["."], "presence_penalty": 0.0, "frequency_penalty": 0.0}
    ] * 4
    assert all("not_sent" not in p for _, _, p in rows)


def test_an_unknown_server_that_refuses_a_field_is_asked_without_it(stand_in, fmnist, tmp_path):
    """Told it is vLLM (so top_k, min_p, repetition_penalty are sent), a server that refuses top_k loses each
    refused field once, and the stored params say which were not sent."""
    spec, _ = restrict(fmnist, None, 2, None)
    b, plan, stats, rows = reasoning_run(stand_in, "gpt-4o-mini", tmp_path, spec, llm_server="vllm")
    assert stats.made == 4 and sorted(p for p, _ in stand_in.refused) == ["min_p", "repetition_penalty", "top_k"]
    assert all(not_sent(p) == {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0} for _, _, p in rows)


def test_structured_output_refused_falls_back_to_the_text_parser(stand_in, fmnist, tmp_path):
    """A model without structured output refuses json_schema, then json_object: the list answer is asked for
    as text and parsed by lines, and the stored params say the JSON answer was not sent."""
    spec, _ = restrict(fmnist, None, 2, None)
    b, plan, stats, rows = reasoning_run(stand_in, "gpt-4-0613", tmp_path, spec, templates=[list_template()])
    assert stats.made == 4 and [p for p, _ in stand_in.refused] == ["response_format", "messages"]
    assert [body.get("response_format", {}).get("type") for body in stand_in.bodies[:2]] == ["json_schema", "json_object"]
    assert all("response_format" not in body for body in stand_in.bodies[2:])
    for description, _rejected, params in rows:
        assert description == "a soft sole\ntwo straps"
        assert params["answer"] == "text" and not_sent(params) == {"answer": "json-list"}


# -- a pinned identity ------------------------------------------------------------------------------------------


def test_a_pinned_name_replaces_the_url_in_the_identity(monkeypatch):
    inside = make_backend("openai:qwen", Settings(llm_base_url="http://vllm:8000/v1", llm_name="lab-vllm"))
    outside = make_backend("openai:qwen", Settings(llm_base_url="http://10.1.2.3:8000/v1", llm_name="lab-vllm"))
    assert inside.identity == outside.identity == "openai:qwen@lab-vllm"
    assert (
        make_backend("openai:other", Settings(llm_base_url="http://vllm:8000/v1", llm_name="lab-vllm")).identity
        == "openai:other@lab-vllm"
    )  # the model stays in it: one name, two models, two caches
    assert make_backend("openai:qwen", Settings(llm_base_url="http://vllm:8000/v1")).identity == "openai:qwen@http://vllm:8000/v1"
    monkeypatch.setenv("TEXTADAPT_LLM_NAME", "lab vllm")
    with pytest.raises(TextadaptError, match="TEXTADAPT_LLM_NAME"):
        make_backend("openai:qwen")


# -- a server that refuses connections ------------------------------------------------------------------------


def test_a_refused_connection_fails_at_once_naming_the_url(fmnist, tmp_path):
    """Nothing listens on the port: ``generate`` fails before any request, with the default retries (5)."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    spec, _ = restrict(fmnist, None, 2, None)
    b = http_backend(url)
    plan = plan_generations(spec, list_templates(Settings().prompts_dir, ["generic"]), b.identity, b.sampling(TAP), 5)
    t0 = time.monotonic()
    with Store(tmp_path / "c.duckdb") as store, pytest.raises(LLMUnreachable) as err:
        generate(plan, b, store, spec)
    seconds = time.monotonic() - t0
    assert f"cannot reach the LLM server at {url}" in str(err.value) and "ConnectionRefusedError" in str(err.value)
    assert "sk-test" not in str(err.value)
    # one refused connection, not 5 retries x 50 requests with back-off (which took 15 s a request)
    assert seconds < 5, seconds


def test_a_run_against_a_closed_port_fails_in_seconds(tmp_path, home):
    """The whole `textadapt run`: the flow's preflight stops it before any batch, with one line naming the URL."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    env = {**os.environ, "TEXTADAPT_LLM_BASE_URL": url}
    t0 = time.monotonic()
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
            "generic",
            "--max-classes",
            "3",
            "--train-only",
            "--steps",
            "5",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - t0
    shown = " ".join(p.stderr.split())
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"cannot reach the LLM server at {url}" in shown and "Traceback" not in p.stderr
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        assert s.sql("SELECT status, error LIKE 'LLMUnreachable%' FROM runs")[1] == [("failed", True)]
    print(f"run against a closed port failed after {seconds:.1f} s")


# -- in-process backends -------------------------------------------------------------------------------------------


def test_in_process_llama_cpp_is_given_every_sampler(monkeypatch):
    """llama-cpp-python's create_chat_completion, the real one, watched: every sampler is set (its defaults
    top_p 0.95, top_k 40, min_p 0.05 are on otherwise), and a JSON answer is constrained to LIST_SCHEMA."""
    from llama_cpp import Llama

    seen = []
    real = Llama.create_chat_completion

    def watched(self, *args, **kwargs):
        seen.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Llama, "create_chat_completion", watched)
    b = make_backend("llama-cpp:smollm2", Settings(threads=2))
    sampling = b.sampling(Sampling(max_tokens=40))
    reqs = [
        Request("s", "What does a sandal look like?", sampling, seed=1),
        Request("l", "List three features of a sandal.", sampling.for_template("list"), seed=1),
    ]
    got = dict((r.key, a) for r, a in b.generate(reqs))
    b.close()
    assert {
        k: seen[0][k]
        for k in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repeat_penalty",
            "typical_p",
            "tfs_z",
            "mirostat_mode",
            "presence_penalty",
            "frequency_penalty",
            "max_tokens",
            "stop",
        )
    } == {
        "temperature": 0.99,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
        "typical_p": 1.0,
        "tfs_z": 1.0,
        "mirostat_mode": 0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": 40,
        "stop": ["."],
    }
    assert seen[0]["response_format"] is None
    assert seen[1]["response_format"] == {"type": "json_object", "schema": LIST_SCHEMA} and seen[1]["stop"] == []
    assert got["l"].text.lstrip().startswith("{")


class FakeVLLM:
    """Stands in for the ``vllm`` package (CUDA only, not installable here): records what reaches ``LLM(...)``
    and ``SamplingParams(...)``."""

    def __init__(self):
        import types

        self.llm_kwargs: list[dict] = []
        self.params: list[dict] = []
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                if "bogus" in kwargs:
                    raise TypeError("__init__() got an unexpected keyword argument 'bogus'")
                fake.llm_kwargs.append(kwargs)

            def chat(self, conversations, params, use_tqdm=False):
                out = types.SimpleNamespace(text="A sandal has straps", finish_reason="stop", token_ids=[1, 2, 3])
                return [types.SimpleNamespace(outputs=[out], prompt_token_ids=[1] * 9) for _ in conversations]

        def sampling_params(**kwargs):
            fake.params.append(kwargs)
            return kwargs

        self.vllm = types.ModuleType("vllm")
        self.vllm.LLM, self.vllm.SamplingParams = LLM, sampling_params
        self.sp = types.ModuleType("vllm.sampling_params")
        self.sp.StructuredOutputsParams = lambda **kw: ("structured", kw)


def test_vllm_engine_args_reach_the_engine_and_sampling_is_explicit(monkeypatch):
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", fake.sp)
    args = {
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.85,
        "max_model_len": 4096,
        "dtype": "bfloat16",
        "quantization": "awq",
    }
    monkeypatch.setenv("TEXTADAPT_VLLM_ENGINE_ARGS", json.dumps(args))
    b = make_backend("vllm:Qwen/Qwen2.5-7B-Instruct-AWQ")
    assert b.identity == 'vllm:Qwen/Qwen2.5-7B-Instruct-AWQ[{"dtype":"bfloat16","quantization":"awq"}]'
    sampling = b.sampling(TAP)
    got = list(b.generate([Request("a", "q", sampling, seed=3), Request("b", "q", sampling.for_template("list"), seed=4)]))
    assert fake.llm_kwargs == [{"model": "Qwen/Qwen2.5-7B-Instruct-AWQ", **args}]
    assert fake.params[0] == {
        "n": 1,
        "temperature": 0.99,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": 50,
        "stop": ["."],
        "seed": 3,
        "structured_outputs": None,
    }
    assert fake.params[1]["structured_outputs"] == ("structured", {"json": LIST_SCHEMA}) and fake.params[1]["stop"] is None
    assert got[0][1].text == "A sandal has straps."
    # the default identity is unchanged; bad arguments are named
    monkeypatch.delenv("TEXTADAPT_VLLM_ENGINE_ARGS")
    assert make_backend("vllm:m").identity == "vllm:m"
    with pytest.raises(TextadaptError, match="TEXTADAPT_VLLM_ENGINE_ARGS.*bogus"):
        list(make_backend("vllm:m", Settings(vllm_engine_args={"bogus": 1})).generate([Request("a", "q", TAP, seed=1)]))
    with pytest.raises(TextadaptError, match="model"):
        make_backend("vllm:m", Settings(vllm_engine_args={"model": "x"}))
