"""Configuration in one typed place.

``Settings`` is where things live and which models to use by default: environment variables
(``TEXTADAPT_*``) over an optional TOML file (``$TEXTADAPT_HOME/config.toml`` or
``$TEXTADAPT_CONFIG``) over the defaults below. ``RunOptions`` is one adaptation run: every run
option's type, default and description, from which the CLI's flags, the Prefect flow's parameters
and docs/options.md are made, so they cannot drift apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from textadapt import TextadaptError
from textadapt.scoring import PRIORS, SCORINGS

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
        2048,
        ge=0,
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
        8,
        ge=1,
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


@dataclass(frozen=True)
class Cli:
    """How a run option shows on the command line, where that is not simply ``--field-name``.

    Attach it to a ``RunOptions`` field as ``Annotated[TYPE, Cli(...)]``.
    """

    flag: str | None = None  # the flag's name, e.g. "--templates" for template_sets
    argument: bool = False  # a positional argument (the dataset)
    settings: str | None = None  # unset, the option takes this Settings field's value (shown as its default in --help)


class RunOptions(BaseModel):
    """One adaptation run of one dataset.

    Every run option is declared here, once: its type (choices as ``Literal``), default and
    description. The flags of ``textadapt run`` and ``textadapt schedule`` (``cli.py``), the
    Prefect flow's parameters (``textadapt/flows/adapt.py``) and ``docs/options.md`` are made from these
    fields. To add an option, add a field here and use it where the run needs it (``textadapt/flows/adapt.py``
    and the stage it changes); then ``python scripts/make_options_doc.py`` rewrites the docs table.
    """

    model_config = ConfigDict(extra="forbid")

    dataset: Annotated[str, Cli(argument=True)] = Field(
        description="Dataset name: a spec DATASET.toml (see `textadapt datasets`)."
    )
    backbone: Annotated[str | None, Cli(settings="backbone")] = Field(
        None,
        description="open_clip backbone ARCH:WEIGHTS: ViT-B-32:openai, hf-hub:ORG/REPO, ARCH:/path.pt, ARCH:random, "
        "ARCH:auto. Unset: Settings.backbone (env TEXTADAPT_BACKBONE).",
    )
    llm: Annotated[str | None, Cli(settings="llm")] = Field(
        None,
        description="LLM backend: llama-cpp:smollm2, llama-cpp:/path/model.gguf, openai:MODEL or vllm:MODEL. "
        "Unset: Settings.llm (env TEXTADAPT_LLM).",
    )
    template_sets: Annotated[list[str], Cli(flag="--templates")] = Field(
        default_factory=lambda: ["generic", "targeted"],
        description="Prompt template sets (folders of prompts/, see `textadapt prompts list`); one adapted head is trained "
        'per set. None (an empty list; "" on the command line): train on --sources only.',
    )
    sources: list[str] = Field(
        default_factory=list,
        description="Imported description sources to train on too, one head each (see `textadapt descriptions import`).",
    )
    refresh: bool = Field(False, description="Regenerate every planned generation on purpose; older rounds stay in the cache.")
    train_only: bool = Field(False, description="Train the heads and skip the images and scoring (no images needed).")
    samples: int = Field(5, ge=1, description="LLM samples per rendered question (TAP: 5).")
    temperature: float = Field(0.99, ge=0, description="LLM sampling temperature (TAP: 0.99).")
    max_tokens: int = Field(50, ge=1, description="Longest answer in tokens (TAP: 50).")
    steps: int | None = Field(None, ge=1, description="Training steps. Unset: the dataset spec's [train] steps.")
    seed: int = Field(
        7777,
        description="First training seed (TAP: 7777): the adapters train with seed, seed+1, .... LLM sampling is "
        "seeded by each generation's cache key, not by this.",
    )
    seeds: int = Field(
        3, ge=1, description="Train every adapter with this many seeds (seed, seed+1, ...); the report gives mean and spread."
    )
    max_classes: int | None = Field(None, ge=2, description="Use only the first N classes (smoke runs).")
    max_images: int | None = Field(
        None, ge=1, description="Score on N test images only, spread evenly over the classes (the same N in every run)."
    )
    batch_size: int = Field(256, ge=1, description="Encoder batch size (texts or images per batch).")
    methods: list[str] = Field(
        default_factory=lambda: ["tap-head"],
        description="Adapters trained on every description set: ADAPTER or ADAPTER+LOSS items, e.g. tap-head, zs-head+ot, "
        "or all. ADAPTER and LOSS are the harness's (docs/options.md lists them; a wrong one is refused with the list).",
    )
    scoring: list[Literal[(*SCORINGS, "all")]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["plain"],
        description="How classifiers are scored: plain, ig (information gain: minus beta times the log prior of a "
        "content-free input), or all.",
    )
    prior: Literal[PRIORS] = Field(  # type: ignore[valid-type]
        "empty-text", description="IG scoring's content-free input: the empty text, a blank image or the mean test image."
    )
    ig_beta: float = Field(1.0, ge=0, description="IG scoring: logits - beta * log prior.")
    ot_alpha: float = Field(0.5, ge=0, le=1, description="OT soft labels: weight of the one-hot target (OTTER: 0.5).")
    ot_eps: float = Field(0.15, gt=0, description="OT soft labels: Sinkhorn's entropic regularisation (OTTER: 0.15).")
    ot_iters: int = Field(5, ge=1, description="OT soft labels: Sinkhorn iterations (OTTER: 5).")
    captioner: str | None = Field(
        None,
        description="Also score a CoCa captioner (e.g. coca_ViT-B-32:laion2b_s13b_b90k, or 'same' for the backbone): "
        "caption likelihood, and its IG form with scoring all.",
    )
    task_runner: Literal["threads", "dask"] = Field(
        "threads",
        description="Where generation and embedding batches run: threads of the flow's process, or a Dask cluster "
        "(Settings.dask_address, else a local one). The cache is written by the flow's process either way.",
    )
    timeout_seconds: float | None = Field(
        None,
        gt=0,
        description="Stop the run after this many seconds: its flow run ends TimedOut (Prefect's state) and its row in runs "
        "failed; what it stored stays, and running again asks only for the rest. Time waiting for a turn (a deployment's "
        "concurrency limit) does not count. Unset: no limit.",
    )

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        from textadapt.methods import parse_methods  # names only: no torch before Prefect starts

        try:
            parse_methods(methods)
        except TextadaptError as e:
            raise ValueError(str(e).removeprefix("--methods: ")) from None
        return methods

    @model_validator(mode="after")
    def _something_to_train_on(self) -> RunOptions:
        if not self.template_sets and not self.sources:
            raise ValueError("nothing to train on: give at least one template set or imported source")
        return self

    @classmethod
    def parse(cls, fields: dict, flags: bool = False) -> RunOptions:
        """RunOptions from ``fields``, or one TextadaptError naming each bad option (as a flag of
        `textadapt run` with ``flags``, else by its field name)."""
        try:
            return cls(**fields)
        except ValidationError as e:
            raise TextadaptError(validation_message(e, flags)) from None

    @classmethod
    def check(cls, name: str, value):
        """``value`` for the field ``name`` alone, validated as a run would (raises pydantic's ValidationError); the
        checks of the options together are made when all are known."""
        holder = cls.model_construct()
        try:
            cls.__pydantic_validator__.validate_assignment(holder, name, value)
        except ValidationError as e:
            if any(err["loc"] for err in e.errors()):
                raise
            return TypeAdapter(cls.model_fields[name].rebuild_annotation()).validate_python(value)  # the field itself is fine
        return getattr(holder, name)

    def effective(self, settings: Settings) -> RunOptions:
        """These options with the Settings defaults filled in (backbone, llm): what the run uses."""
        return self.model_copy(
            update={
                name: getattr(settings, cli.settings)
                for name, cli in cli_meta().items()
                if cli.settings and getattr(self, name) is None
            }
        )


def cli_meta() -> dict[str, Cli]:
    """Each RunOptions field's ``Cli`` metadata (a plain ``Cli()`` where it has none)."""
    return {name: next((m for m in f.metadata if isinstance(m, Cli)), Cli()) for name, f in RunOptions.model_fields.items()}


def option_default(name: str):
    """The default of the RunOptions field ``name`` (a fresh list for list fields); required fields: ``...``."""
    field = RunOptions.model_fields[name]
    return ... if field.is_required() else field.get_default(call_default_factory=True)


def flag_name(name: str) -> str:
    """The command-line flag of the RunOptions field ``name``."""
    return cli_meta()[name].flag or f"--{name.replace('_', '-')}"


def validation_message(e: ValidationError, flags: bool = False) -> str:
    """pydantic's errors about run options as one line per option, each naming it (as a flag with ``flags``)."""
    out = []
    for err in e.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a check of the options together
            out.append(msg)
            continue
        name = str(err["loc"][0])
        shown = flag_name(name) if flags and name in RunOptions.model_fields else name
        out.append(f"{shown}: {msg}" + (f" (got {err['input']!r})" if err["type"] != "value_error" and "input" in err else ""))
    return "; ".join(out)


def parse_backbone_spec(spec: str) -> tuple[str, str]:
    """``ARCH:WEIGHTS`` -> (arch, weights); hub ids are their own arch. Here, not in ``encoders``, so that ``textadapt run``
    checks it before importing torch (and Prefect)."""
    if spec.startswith("hf-hub:"):
        return spec, "hf-hub"
    arch, sep, weights = spec.partition(":")
    if not sep or not arch or not weights:
        raise TextadaptError(
            f"backbone spec {spec!r} is not ARCH:WEIGHTS (e.g. ViT-B-32:openai, ViT-B-32:random, hf-hub:ORG/REPO)"
        )
    return arch, weights
