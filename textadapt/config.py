"""Configuration in one typed place.

``Settings`` is where things live and which models to use by default: environment variables
(``TEXTADAPT_*``) over an optional TOML file (``$TEXTADAPT_HOME/config.toml`` or
``$TEXTADAPT_CONFIG``) over the defaults below. ``RunOptions`` is one adaptation run; the CLI's
flags and the Prefect flow's parameters are both this model, so they cannot drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

REPO_ROOT = Path(__file__).resolve().parent.parent


def _shipped(name: str) -> Path:
    """A folder shipped with textadapt: the checkout's own in a source/editable install, else the wheel's copy."""
    in_checkout = REPO_ROOT / name
    return in_checkout if in_checkout.is_dir() else Path(__file__).resolve().parent / "_assets" / name


def default_home() -> Path:
    if os.environ.get("TEXTADAPT_HOME"):
        return Path(os.environ["TEXTADAPT_HOME"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "textadapt"


def _config_file() -> Path:
    return Path(os.environ.get("TEXTADAPT_CONFIG") or default_home() / "config.toml").expanduser()


class Settings(BaseSettings):
    """Where textadapt keeps things and what it uses unless a run says otherwise."""

    model_config = SettingsConfigDict(env_prefix="TEXTADAPT_", extra="forbid")

    home: Path = Field(default_factory=default_home, description="Cache, reports and downloaded images.")
    db: Path | None = Field(None, description="The DuckDB cache file; default $home/textadapt.duckdb.")
    datasets_dirs: list[Path] = Field(
        default_factory=list,
        description="Extra folders searched for DATASET.toml specs, before $home/datasets and the shipped ones.",
    )
    prompts_dir: Path = Field(default_factory=lambda: _shipped("prompts"), description="Jinja prompt templates.")
    backbone: str = Field("ViT-B-32:openai", description="open_clip backbone spec ARCH:PRETRAINED.")
    llm: str = Field("llama-cpp:smollm2", description="LLM backend spec.")
    device: str = Field("auto", description="torch device for encoders and training: auto, cpu, cuda, cuda:1...")
    threads: int | None = Field(None, description="CPU threads for llama.cpp; default: all cores.")
    # The openai:MODEL backend (any OpenAI-compatible server). TEXTADAPT_LLM_* and the config file
    # come first; OPENAI_BASE_URL / OPENAI_API_KEY are the fallbacks when neither sets them.
    llm_base_url: str | None = Field(
        default_factory=lambda: os.environ.get("OPENAI_BASE_URL") or None,
        description="Base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1; "
        "fallback $OPENAI_BASE_URL, else https://api.openai.com/v1.",
    )
    llm_api_key: SecretStr | None = Field(
        default_factory=lambda: SecretStr(os.environ["OPENAI_API_KEY"]) if os.environ.get("OPENAI_API_KEY") else None,
        description="API key for openai:MODEL; fallback $OPENAI_API_KEY. Local servers need none. Never stored or logged.",
    )
    llm_concurrency: int = Field(8, ge=1, description="Requests in flight at once to the HTTP LLM.")
    llm_timeout: float = Field(60, gt=0, description="Seconds before one HTTP LLM request times out (then it is retried).")
    llm_max_retries: int = Field(5, ge=0, description="Retries per HTTP LLM request (back-off; 429 Retry-After honoured).")
    llm_n_per_request: bool | None = Field(
        None,
        description="Whether the HTTP LLM server honours `n` (several samples per request); None: probe it once.",
    )
    llm_name: str | None = Field(
        None,
        description="A name for the HTTP LLM server, used in the cache identity instead of its URL (openai:MODEL@NAME): the "
        "same server reached by two URLs shares its cache. Two different servers given one name share it too: name one "
        "server (model, weights, quantisation) per name.",
    )
    llm_server: Literal["auto", "openai", "vllm", "llama.cpp", "other"] = Field(
        "auto",
        description="Which OpenAI-compatible server it is, for the sampling fields only it knows (top_k, min_p, repetition "
        "penalty); auto: OpenAI by host, else GET /models' owned_by.",
    )
    llm_reasoning: bool | None = Field(
        None,
        description="Whether the model is a reasoning model (only max_completion_tokens, no temperature/top_p/stop); "
        "None: by name (OpenAI's o1, o3, o4-mini, gpt-5...).",
    )
    llm_reasoning_tokens: int = Field(
        2048, ge=0,
        description="Reasoning models: tokens for their hidden reasoning; max_completion_tokens = max_tokens + this.",
    )
    llm_structured_output: bool = Field(
        True, description="Ask list and questions templates for a JSON list (JSON schema) where the backend can constrain it."
    )
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description='Arguments for vllm.LLM (--llm vllm:MODEL), a JSON object, e.g. {"tensor_parallel_size": 2, '
        '"gpu_memory_utilization": 0.85, "max_model_len": 4096, "dtype": "bfloat16", "quantization": "awq"}.',
    )

    # Running as a service: Prefect's global concurrency limit on LLM requests, and the Dask cluster.
    llm_global_limit: int = Field(
        8, ge=1,
        description="Slots of Prefect's global concurrency limit `textadapt-llm` when a run has to create it: LLM requests "
        "in flight at once over every flow run of one Prefect server. A limit that exists is left as it is.",
    )
    dask_address: str | None = Field(
        None, description="Dask scheduler for --task-runner dask, e.g. tcp://10.0.0.5:8786; unset: a local cluster per run."
    )
    dask_workers: int | None = Field(None, ge=1, description="Worker processes of the local Dask cluster; default: Dask's.")
    dask_threads_per_worker: int | None = Field(None, ge=1, description="Threads per local Dask worker; default: Dask's.")

    @property
    def db_path(self) -> Path:
        return self.db or self.home / "textadapt.duckdb"

    @property
    def dataset_search_path(self) -> list[Path]:
        return [*self.datasets_dirs, self.home / "datasets", _shipped("data") / "datasets"]

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=_config_file()))


class RunOptions(BaseModel):
    """One adaptation run of one dataset. Unset fields take the Settings or the dataset spec's value."""

    dataset: str
    backbone: str | None = Field(None, description="open_clip spec ARCH:PRETRAINED (default: Settings.backbone).")
    llm: str | None = Field(None, description="LLM backend spec (default: Settings.llm).")
    template_sets: list[str] = Field(
        default_factory=lambda: ["generic", "targeted"],
        description="Prompt template sets (folders of prompts/); one adapted head is trained per set.",
    )
    samples: int = Field(5, ge=1, description="Samples per rendered question (TAP: 5).")
    temperature: float = Field(0.99, ge=0, description="LLM sampling temperature (TAP: 0.99).")
    max_tokens: int = Field(50, ge=1, description="Longest answer in tokens (TAP: 50).")
    steps: int | None = Field(None, ge=1, description="Training steps (default: the dataset spec's).")
    seed: int = Field(7777, description="Seed for training and sampling (TAP: 7777).")
    max_classes: int | None = Field(None, ge=2, description="Use only the first N classes (smoke runs).")
    max_images: int | None = Field(
        None, ge=1, description="Score on N test images only, spread evenly over the classes (the same N in every run)."
    )
    batch_size: int = Field(256, ge=1, description="Encoder batch size.")
    sources: list[str] = Field(
        default_factory=list, description="Imported description sources to train on too (one head each)."
    )
    refresh: bool = Field(False, description="Regenerate every planned generation; older rounds stay in the cache.")
    train_only: bool = Field(False, description="Train the heads and skip the images and scoring (no images needed).")
    methods: list[str] = Field(
        default_factory=lambda: ["tap-head"],
        description="Adapters to train on every description set, ADAPTER[+ot] (tap-head, zs-head, tap-residual, taskres, tap-coop, "
        "protext), or all.",
    )
    scoring: list[str] = Field(default_factory=lambda: ["plain"], description="plain, ig (information gain) or all.")
    seeds: int = Field(3, ge=1, description="Train every adapter with seeds seed, seed+1, ...; report mean and spread.")
    prior: str = Field("empty-text", description="Content-free input for IG scoring: empty-text, blank-image or mean-image.")
    ig_beta: float = Field(1.0, ge=0, description="IG scoring: logits - beta * log prior.")
    ot_alpha: float = Field(0.5, ge=0, le=1, description="OT soft labels: weight of the one-hot target (OTTER: 0.5).")
    ot_eps: float = Field(0.15, gt=0, description="OT soft labels: Sinkhorn entropic regularisation (OTTER: 0.15).")
    ot_iters: int = Field(5, ge=1, description="OT soft labels: Sinkhorn iterations (OTTER: 5).")
    captioner: str | None = Field(None, description="A CoCa backbone spec (or 'same' for --backbone) to score as a captioner too.")
    task_runner: Literal["threads", "dask"] = Field(
        "threads",
        description="Where generation and embedding batches run: threads of the flow's process, or a Dask cluster "
        "(Settings.dask_address, else a local one). The cache is written by the flow's process either way.",
    )

    @model_validator(mode="after")
    def _something_to_train_on(self) -> "RunOptions":
        if not self.template_sets and not self.sources:
            raise ValueError("nothing to train on: give at least one template set or imported source")
        return self
