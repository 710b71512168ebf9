"""The frozen CLIP backbone: resolved from a spec through open_clip, and its cached encoders.

A backbone spec is ``ARCH:WEIGHTS``:

- ``ViT-B-32:openai``: an open_clip pretrained tag (downloaded and cached as open_clip does);
- ``hf-hub:ORG/REPO``: a Hugging Face hub model in open_clip format;
- ``ViT-B-32:/path/to/checkpoint.pt``: a local checkpoint file (``.pt``, ``.bin``, ``.safetensors``);
- ``ViT-B-32:random``: untrained weights (seeded, so always the same): a smoke test, not a classifier;
- ``ViT-B-32:auto``: the architecture's first pretrained tag, or untrained weights if none can be had.

QuickGELU. OpenAI's CLIP weights (and some others: ``open_clip.get_pretrained_cfg(ARCH, TAG)``
says ``quick_gelu: True``) were trained with QuickGELU, x * sigmoid(1.702 x), but open_clip builds
``ViT-B-32`` with plain GELU whatever the tag and only warns. The towers are built with QuickGELU
wherever the weights were trained with it: a pretrained tag (also what ``auto`` resolves to) whose
config says so; an ``hf-hub:`` model whose ``open_clip_config.json`` says so (open_clip reads it);
a checkpoint file with an ``open_clip_config.json`` beside it that says so (a copied hub snapshot);
and any architecture written with the suffix ``-quickgelu`` (``ViT-B-32-quickgelu:/path/ViT-B-32.safetensors``:
open_clip's own ``-quickgelu`` configs, or ``-quickgelu`` after any other architecture). A state
dict cannot say it: QuickGELU has no parameters, so both builds load the same file.

Every embedding is cached under the backbone's identity, ``ARCH@sha256`` of its weights, image
preprocessing and activation (``ARCH-quickgelu@...`` for QuickGELU towers): the same model reached
by any route shares a cache, different ones never do.

Built lazily. A run whose embeddings are all cached needs the identity, never the model, and
importing open_clip (~4 s: torchvision, timm) and building and hashing ViT-B-32 (~2.5 s) cost more
than the rest of such a run. So ``load_backbone`` returns a ``Backbone`` whose identity (``id``,
``embed_dim``, ``quick_gelu``, ``logit_scale``, ...) is known at once and whose ``model``,
``preprocess`` and ``tokenizer`` are built on first use (``Backbone.build``), from its ``Recipe``.
The identity comes from a **resolution record** in ``$TEXTADAPT_HOME/backbones.json``, written
when the spec was last resolved by building it; without a valid one, the spec is built (and
hashed) at once, as it always was, and the record written. A record is kept under its key: the
spec (and a checkpoint's absolute path), the open_clip and torch versions, ``RANDOM_SEED``, the
digest of textadapt's model configs and ``RECORD_SCHEME``. It is used only while what the build
read is unchanged (its evidence; a file's size, mtime, ctime and inode):

- ``ARCH:random``: nothing else (a seeded init is the same for the same versions);
- a checkpoint file: the file, and the ``open_clip_config.json`` beside it (there or absent);
- a pretrained tag, and ``auto`` resolved to one: the weights file open_clip took from the
  Hugging Face cache (the repository and the file names it tries, in its order, are recorded,
  and looked up with ``huggingface_hub.try_to_load_from_cache``: no network);
- ``auto`` resolved to untrained weights because the tag's file was not to be had: only while no
  such file is in the Hugging Face cache and the hub is unreachable (with a network, ``auto``
  would download it). The warning that says so is logged again on every use of the record;
- ``hf-hub:`` models, architectures with a Hugging Face text tower or timm-pretrained vision
  tower, and tags downloaded from a URL: never recorded (built every time): what they read
  from the hub is more than one file.

Any doubt is a miss: a miss costs a build, never a wrong identity. The device is no part of the
identity (the hash is of CPU tensors). ``RECORD_SCHEME`` must change with anything in textadapt
that changes what a recipe builds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import numpy as np
import torch

from textadapt import TextadaptError
from textadapt.config import parse_backbone_spec as parse_spec  # without torch: checked before Prefect starts
from textadapt.datasets import ImageSet, iter_batches
from textadapt.store import Store
from textadapt.text_tower import iter_text_features

log = logging.getLogger(__name__)
MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
RANDOM_SEED = 0
QUICKGELU = "-quickgelu"  # the suffix open_clip's own QuickGELU configs use; textadapt takes it after any ARCH
RECORDS = "backbones.json"
# 2: the activation joined the identity (QuickGELU towers); 3: whole resolutions recorded (backbone_hashes.json before)
RECORD_SCHEME = 3
# What a record keeps of a backbone (with its recipe), and the type each is read back as.
RECORDED = {"arch": str, "weights": str, "untrained": bool, "id": str, "embed_dim": int, "quick_gelu": bool, "logit_scale": float}
UNTRAINED_WARNING = "no pretrained weights for %s (%s): using UNTRAINED weights"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Recipe:
    """What open_clip is asked to build for a resolved spec."""

    build: str  # open_clip's model name, or hf-hub:ORG/REPO
    pretrained: str | None = None  # a pretrained tag or a checkpoint file; None: untrained, or an hf-hub model's own
    force_quick_gelu: bool = False
    seeded: bool = False  # untrained weights, initialised under RANDOM_SEED


class Built(NamedTuple):
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable


_BUILDING = threading.Lock()  # one build at a time: the threads of a stage may ask for the model together


@dataclass
class Backbone:
    """A frozen CLIP backbone: its identity at once, its model, image preprocessing and tokenizer built on first use.

    ``model``, ``preprocess`` and ``tokenizer`` build it (``build()``) when first asked for. Pickled, it travels
    without them and builds where it is used.
    """

    spec: str
    arch: str
    weights: str
    untrained: bool
    device: torch.device
    id: str
    embed_dim: int
    quick_gelu: bool  # the towers' activation: QuickGELU (as OpenAI trained its weights) or open_clip's default
    logit_scale: float  # CLIP's learned temperature, exp(model.logit_scale); 100 for a model without one
    recipe: Recipe
    built: Built | None = field(default=None, repr=False, compare=False)  # None until first use

    def build(self) -> Built:
        """The model, preprocessing and tokenizer, built now if they were not."""
        if self.built is None:
            with _BUILDING:
                if self.built is None:
                    self.built = _build_recorded(self)
        return self.built

    @property
    def model(self) -> torch.nn.Module:
        return self.build().model

    @property
    def preprocess(self) -> Callable:
        return self.build().preprocess

    @property
    def tokenizer(self) -> Callable:
        return self.build().tokenizer

    def __getstate__(self) -> dict:
        return {**self.__dict__, "built": None}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TextadaptError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TextadaptError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return device


def _register_configs() -> None:
    import open_clip

    if MODEL_CONFIGS.is_dir() and not set(p.stem for p in MODEL_CONFIGS.glob("*.json")) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIGS)


def uses_quick_gelu(model: torch.nn.Module) -> bool:
    """Whether any tower of ``model`` applies open_clip's QuickGELU."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def weights_id(model: torch.nn.Module, preprocess, quick_gelu: bool = False) -> str:
    """sha256 over every tensor of the state dict (in key order), the image preprocessing and the activation.

    QuickGELU changes no tensor, so it is hashed in its own right; GELU builds hash as before this
    was added, so their cached embeddings stay theirs, and a QuickGELU build never reuses them.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    h.update(repr(preprocess).encode())
    if quick_gelu:
        h.update(b"activation=quick_gelu")
    return h.hexdigest()


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_offline():
    """Use only the Hugging Face hub's local cache: a miss fails at once."""
    from huggingface_hub import constants

    was, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


@contextmanager
def _offline_unless_reachable():
    """Without a route to the hub, use only its local cache: a miss fails at once, not after ~50 s of retries."""
    if _hub_reachable():
        yield
        return
    with _hub_offline():
        yield


@contextmanager
def _open_clip_quiet() -> Iterator[None]:
    """Hide what open_clip logs on the root logger (``logging.error``/``warning``) while textadapt handles the case and
    says so itself: one message per event, at the level it deserves."""

    def drop(record: logging.LogRecord) -> bool:
        return record.name != "root"

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _build_arch(arch: str) -> tuple[str, bool]:
    """(the open_clip config to build, force QuickGELU): ``X-quickgelu`` is X with QuickGELU where open_clip
    has no config of that name."""
    import open_clip

    if arch.startswith("hf-hub:") or arch in open_clip.list_models():
        return arch, False
    base = arch.removesuffix(QUICKGELU)
    if base != arch and base in open_clip.list_models():
        return base, True
    return arch, False


def _tag_says_quick_gelu(arch: str, tag: str) -> bool:
    import open_clip

    return bool((open_clip.get_pretrained_cfg(arch, tag) or {}).get("quick_gelu", False))


def _sidecar(path: Path) -> Path:
    return path.parent / "open_clip_config.json"


def _sidecar_says_quick_gelu(path: Path) -> bool:
    """What the ``open_clip_config.json`` beside a checkpoint (a hub snapshot's) says of QuickGELU; False without one."""
    config = _sidecar(path)
    try:
        data = json.loads(config.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:
        raise TextadaptError(f"{config}: not a readable open_clip config ({e}); move it away or fix it") from None
    model_cfg = data.get("model_cfg", data) if isinstance(data, dict) else {}
    return bool(isinstance(model_cfg, dict) and model_cfg.get("quick_gelu", False))


def _init_untrained(model: torch.nn.Module) -> None:
    """Initialise what open_clip leaves uninitialised in an untrained model (call under the seeded RNG).

    open_clip 3.3 never initialises a CoCa text decoder's vocabulary projection (``torch.empty``:
    whatever memory held, usually zeros, so every caption token got probability 1/vocab whatever the
    image, and the backbone id was not reproducible). Same init as the text tower's projection.
    """
    from open_clip.transformer import MultimodalTransformer

    for module in model.modules():
        if isinstance(module, MultimodalTransformer) and module.text_projection is not None:
            torch.nn.init.normal_(module.text_projection, std=module.width**-0.5)


def _make(recipe: Recipe, device: torch.device, offline: bool = False) -> Built:
    """Build ``recipe`` on ``device``, in eval mode. The hub is asked only for what its local cache lacks and only when
    reachable; ``offline``: never (the recipe's files were found in the cache)."""
    import open_clip

    _register_configs()
    from_hub = recipe.build.startswith("hf-hub:") or (recipe.pretrained is not None and not Path(recipe.pretrained).is_file())
    hub = (_hub_offline() if offline else _offline_unless_reachable()) if from_hub else nullcontext()
    kwargs = {"force_quick_gelu": True} if recipe.force_quick_gelu else {}
    # Built on first use, maybe inside an encoder's inference_mode: its weights must still be ordinary tensors,
    # which the prompt learner can run autograd through.
    with hub, torch.inference_mode(False):
        if recipe.seeded:
            with torch.random.fork_rng(devices=[]), _open_clip_quiet():  # ("No pretrained weights loaded": said by us)
                torch.manual_seed(RANDOM_SEED)
                model, _, preprocess = open_clip.create_model_and_transforms(recipe.build, pretrained=None, **kwargs)
                _init_untrained(model)
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(recipe.build, pretrained=recipe.pretrained, **kwargs)
        tokenizer = open_clip.get_tokenizer(recipe.build)
    # Frozen by use, not by flag: every encoder runs under inference_mode and nothing builds an optimiser
    # over the backbone (the prompt learner turns the flags off while it trains and restores them).
    # requires_grad_(False) here made CPU text encoding about 6% slower than open_clip's own model
    # (benchmarks/encoders.py; same weights, same inputs).
    return Built(model.to(device).eval(), preprocess, tokenizer)


def _measure(built: Built, device: torch.device) -> tuple[bool, int, float]:
    """(QuickGELU towers, embedding dimension, logit scale) of a built model."""
    with torch.inference_mode():
        dim = int(built.model.encode_text(built.tokenizer(["a"]).to(device)).shape[-1])
        scale = getattr(built.model, "logit_scale", None)
        return uses_quick_gelu(built.model), dim, float(scale.exp().item()) if scale is not None else 100.0


def _ways_out(arch: str, weights: str, err: Exception) -> TextadaptError:
    return TextadaptError(
        f"could not get the weights of backbone {arch}:{weights}: {type(err).__name__}: {_first_line(err)}\n"
        f"Ways out:\n"
        f"  - with network access, run once so open_clip downloads and caches them (~/.cache/huggingface);\n"
        f"  - copy a checkpoint here and pass --backbone {arch}:/path/to/open_clip_model.safetensors;\n"
        f"  - pass --backbone {arch}:auto to fall back to untrained weights (a smoke run: accuracies mean nothing);\n"
        f"  - pass --backbone {arch}:random for untrained weights on purpose."
    )


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else ""


def _kind(arch: str, weights: str) -> str:
    """Which kind of spec: hf-hub, random, auto, file (a checkpoint) or tag."""
    if arch.startswith("hf-hub:"):
        return "hf-hub"
    if weights in ("random", "auto"):
        return weights
    if weights.endswith(CHECKPOINT_SUFFIXES) or "/" in weights or Path(weights).expanduser().exists():
        return "file"
    return "tag"


def load_backbone(spec: str, device: str = "auto") -> Backbone:
    """The frozen backbone of ``spec``: from its resolution record if still valid (nothing built), else built now;
    strict unless the spec says ``auto``."""
    arch, weights = parse_spec(spec)
    dev = resolve_device(device)
    kind = _kind(arch, weights)
    key = _record_key(arch, weights, kind)
    recorded = _recorded(spec, key, dev) if key is not None else None
    if recorded is not None:
        return recorded
    bb, evidence, untrained_because = _resolve(spec, arch, weights, kind, dev)
    if key is not None and evidence is not None:
        _write_record(key, bb, evidence, untrained_because)
    return bb


def _resolve(spec: str, arch: str, weights: str, kind: str, dev: torch.device) -> tuple[Backbone, dict | None, str | None]:
    """Build the backbone of ``spec`` now: (it, what its record must find unchanged or None: not to be recorded,
    why it is untrained where ``auto`` fell back)."""
    import open_clip

    _register_configs()
    build, quick = _build_arch(arch)  # quick: the spec says -quickgelu where open_clip has no such config
    if not build.startswith("hf-hub:") and build not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if arch.lower().replace("/", "-") in m.lower()][:8]
        raise TextadaptError(
            f"unknown open_clip architecture {arch!r} in backbone spec {spec!r}"
            + (f"; did you mean one of {close}?" if close else "; see open_clip.list_models()")
        )
    untrained, untrained_because, evidence = False, None, None
    if kind == "hf-hub":
        recipe = Recipe(build)  # open_clip reads quick_gelu from the hub's open_clip_config.json
        try:
            built = _make(recipe, dev)
        except Exception as e:
            raise _ways_out(arch, weights, e) from None
    elif kind == "random":
        recipe, untrained, evidence = Recipe(build, None, quick, seeded=True), True, {}
        built = _make(recipe, dev)
    elif kind == "auto":
        tags = open_clip.list_pretrained_tags_by_model(build)
        tag = "openai" if "openai" in tags else (tags[0] if tags else None)
        try:
            if tag is None:
                raise RuntimeError(f"open_clip lists no pretrained weights for {build}")
            recipe = Recipe(build, tag, quick or _tag_says_quick_gelu(build, tag))
            with _open_clip_quiet():  # its "Failed to download" ERROR: the warning below says it, and what happens next
                built = _make(recipe, dev)
        except Exception as e:
            untrained_because = _first_line(e) or type(e).__name__
            log.warning(UNTRAINED_WARNING, arch, untrained_because)
            recipe, untrained = Recipe(build, None, quick, seeded=True), True
            built = _make(recipe, dev)
            evidence = {} if tag is None else _absent_evidence(build, tag)
            weights = "random"
        else:
            weights, evidence = tag, _tag_evidence(build, tag)
    elif kind == "file":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise TextadaptError(f"backbone checkpoint file not found: {path} (from spec {spec!r})")
        recipe = Recipe(build, str(path), quick or _sidecar_says_quick_gelu(path))
        try:
            built = _make(recipe, dev)
        except TextadaptError:
            raise
        except Exception as e:
            raise TextadaptError(f"{path}: not a loadable {arch} checkpoint: {type(e).__name__}: {_first_line(e)}") from None
        weights, evidence = str(path), {"files": [_stat(path), _stat(_sidecar(path))]}
    else:
        tags = open_clip.list_pretrained_tags_by_model(build)
        if weights not in tags:
            raise TextadaptError(
                f"{arch} has no pretrained tag {weights!r}; open_clip knows {tags or 'none'}; or use a checkpoint path, random or auto"
            )
        recipe = Recipe(build, weights, quick or _tag_says_quick_gelu(build, weights))
        try:
            built = _make(recipe, dev)
        except Exception as e:
            raise _ways_out(arch, weights, e) from None
        evidence = _tag_evidence(build, weights)
    quick_gelu, embed_dim, logit_scale = _measure(built, dev)
    # The id names the architecture without the suffix and adds it for QuickGELU towers, so that
    # ViT-B-32:openai and ViT-B-32-quickgelu:/its/file.safetensors are one model with one cache.
    digest = weights_id(built.model, built.preprocess, quick_gelu)
    ident = f"{arch.removesuffix(QUICKGELU)}{QUICKGELU if quick_gelu else ''}@{digest[:16]}"
    bb = Backbone(spec, arch, weights, untrained, dev, ident, embed_dim, quick_gelu, logit_scale, recipe, built)
    return bb, (evidence if _recordable(build) else None), untrained_because


def _build_recorded(bb: Backbone) -> Built:
    """Build a backbone that came from its record (or from another process), and check it is what the record says."""
    try:
        built = _make(bb.recipe, bb.device, offline=True)  # a recorded tag's file is in the hub's cache
    except Exception as e:
        raise TextadaptError(
            f"backbone {bb.spec!r}: could not build it: {type(e).__name__}: {_first_line(e)} "
            f"(did its files change while this ran? run again: it is resolved anew)"
        ) from None
    found = _measure(built, bb.device)
    if found != (bb.quick_gelu, bb.embed_dim, bb.logit_scale):
        raise TextadaptError(
            f"backbone {bb.spec!r} built with (quick_gelu, embedding size, logit scale) {found}, but its record in "
            f"{_records_path()} says {(bb.quick_gelu, bb.embed_dim, bb.logit_scale)}: delete that file and run again"
        )
    return built


# --------------------------------------------------------------------------------------------
# Resolution records


def _records_path() -> Path:
    from textadapt.config import default_home

    return default_home() / RECORDS


def _configs_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(MODEL_CONFIGS.glob("*.json")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _record_key(arch: str, weights: str, kind: str) -> dict | None:
    """What a record is kept under: everything but files that decides what the spec builds; None: never recorded."""
    if kind == "hf-hub":
        return None
    return {
        "scheme": RECORD_SCHEME,
        "arch": arch,
        "weights": weights,
        "file": str(Path(weights).expanduser().absolute()) if kind == "file" else None,
        "open_clip": _version("open_clip_torch"),
        "torch": torch.__version__,
        "seed": RANDOM_SEED,
        "model_configs": _configs_digest(),
    }


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _stat(path: Path | str) -> dict:
    """A file as a record finds it: (size, mtime, ctime, inode) of what it links to, or None if it is not there."""
    try:
        st = os.stat(path)  # follows links: the Hugging Face cache links snapshot files to blobs
    except OSError:
        return {"path": str(path), "stat": None}
    return {"path": str(path), "stat": [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]}


def _recordable(build: str) -> bool:
    """Whether the build reads nothing from the hub but the weights file (not an HF text tower, not timm's weights)."""
    import open_clip

    cfg = open_clip.get_model_config(build) or {}
    text, vision = cfg.get("text_cfg") or {}, cfg.get("vision_cfg") or {}
    return not (text.get("hf_model_name") or text.get("hf_tokenizer_name") or vision.get("timm_model_pretrained"))


def _hub_files(build: str, tag: str) -> tuple[str, list[str]] | None:
    """The Hugging Face repository open_clip takes a pretrained tag's weights from, and the file names it tries there
    in its order (a .safetensors alternative first); None where it takes them from elsewhere (a URL, a file)."""
    import open_clip
    from open_clip import pretrained

    cfg = open_clip.get_pretrained_cfg(build, tag)
    if not cfg or "file" in cfg or not cfg.get("hf_hub") or not pretrained.has_hf_hub():
        return None
    repo, filename = os.path.split(cfg["hf_hub"])
    filename = filename or pretrained.HF_WEIGHTS_NAME
    try:
        safe = list(pretrained._get_safe_alternatives(filename)) if pretrained._has_safetensors else []
    except AttributeError:  # another open_clip: not recorded
        return None
    return repo, [*safe, filename]


def _hub_cached(repo: str, names: list[str]) -> str | None:
    """The first of ``names`` in the local Hugging Face cache of ``repo`` (no network), as open_clip would take it."""
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):  # else None, or a marker that the hub said it does not exist
            return found
    return None


def _tag_evidence(build: str, tag: str) -> dict | None:
    where = _hub_files(build, tag)
    found = _hub_cached(*where) if where else None
    if found is None:  # the weights loaded, yet not from the cache we can check: not recorded
        return None
    return {"hub": {"repo": where[0], "files": where[1], "found": _stat(found)}}


def _absent_evidence(build: str, tag: str) -> dict | None:
    """``auto`` fell back to untrained weights: recorded only if the tag's file is not in the cache and the hub is
    unreachable (so the fallback was not for another reason, such as a damaged file)."""
    where = _hub_files(build, tag)
    if where is None or _hub_cached(*where) is not None or _hub_reachable():
        return None
    return {"hub": {"repo": where[0], "files": where[1], "found": None}, "offline": True}


def _still_true(evidence: dict) -> bool:
    if any(_stat(entry["path"]) != entry for entry in evidence.get("files", [])):
        return False
    hub = evidence.get("hub")
    if hub is not None:
        found = _hub_cached(hub["repo"], hub["files"])
        if hub["found"] is None:
            return found is None and not _hub_reachable()  # with a network, auto would download the weights
        return found is not None and _stat(found) == hub["found"]
    return True


def _read_records() -> dict:
    try:
        known = json.loads(_records_path().read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _recorded(spec: str, key: dict, dev: torch.device) -> Backbone | None:
    """The backbone of ``spec`` from its record, unbuilt; None without a record that still holds."""
    record = _read_records().get(_digest(key))
    try:
        if record["key"] != key or not _still_true(record["evidence"]):
            return None
        b = record["backbone"]
        bb = Backbone(spec=spec, device=dev, recipe=Recipe(**b["recipe"]), **{f: kind(b[f]) for f, kind in RECORDED.items()})
    except Exception as e:  # noqa: BLE001 - no record, or a damaged one: resolve anew
        if record is not None:
            log.debug("backbone record for %s not used: %s: %s", spec, type(e).__name__, e)
        return None
    if record.get("untrained_because"):  # said on every use: the user must know
        log.warning(UNTRAINED_WARNING, bb.arch, record["untrained_because"])
    return bb


def _write_record(key: dict, bb: Backbone, evidence: dict, untrained_because: str | None) -> None:
    record = {
        "key": key,
        "backbone": {**{f: getattr(bb, f) for f in RECORDED}, "recipe": asdict(bb.recipe)},
        "evidence": evidence,
        "untrained_because": untrained_because,
    }
    known = {**_read_records(), _digest(key): record}
    path = _records_path()
    try:  # a write that fails costs only the next load's build
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".backbones.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(known, f, indent=1)
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as e:
        log.warning("could not keep the backbone's resolution in %s: %s", path, e)


# --------------------------------------------------------------------------------------------
# Encoders


def save_checkpoint(backbone: Backbone, path: Path) -> None:
    """Write the backbone's weights in a file ``load_backbone(f"{arch}:{path}")`` reads back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(path))
    else:
        torch.save(backbone.model.state_dict(), path)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def text_key(text: str) -> str:
    """A text's embedding cache key (with the backbone's identity)."""
    return _sha(text)


@torch.inference_mode()
def iter_text_embeddings(backbone: Backbone, texts: list[str], batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """L2-normalised embeddings of ``texts`` one batch at a time, as (indices into ``texts``, embeddings).

    Length-aware where the text tower is causal (``textadapt.text_tower``): batches of texts of similar
    token length, each encoded only up to its longest end-of-text token, so not in the order given.
    """
    if not texts:  # nothing to encode: the model is not built
        return
    for idx, features in iter_text_features(backbone.model, backbone.tokenizer, texts, batch_size, backbone.device):
        yield idx, features.float().cpu().numpy()


def embed_texts(backbone: Backbone, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """L2-normalised embeddings of ``texts`` in order, computed now (no cache): safe to run in any process."""
    out = np.zeros((len(texts), backbone.embed_dim), np.float32)
    for idx, emb in iter_text_embeddings(backbone, texts, batch_size):
        out[idx] = emb
    return out


@torch.inference_mode()
def embed_images(backbone: Backbone, images: ImageSet, batch_size: int = 256) -> np.ndarray:
    """L2-normalised embeddings of every image, computed now (no cache): safe to run in any process."""
    out = [np.zeros((0, backbone.embed_dim), np.float32)]
    for batch in iter_batches(images, batch_size):
        pixels = torch.stack([backbone.preprocess(im) for im in batch]).to(backbone.device)
        out.append(backbone.model.encode_image(pixels, normalize=True).float().cpu().numpy())
    return np.concatenate(out)


def uncached_texts(backbone: Backbone, texts: list[str], store: Store) -> list[str]:
    """The distinct texts whose embeddings under this backbone the cache does not hold, in first-seen order."""
    unique = list(dict.fromkeys(texts))
    cached = store.get_embeddings("text", backbone.id, [_sha(t) for t in unique])
    return [t for t in unique if _sha(t) not in cached]


def uncached_images(
    backbone: Backbone, images: ImageSet, store: Store, hashes: list[str] | None = None
) -> tuple[ImageSet, list[str]]:
    """The distinct images whose embeddings under this backbone the cache does not hold, and their keys
    (``hashes``: ``images.keys()`` if the caller has them already)."""
    hashes = hashes if hashes is not None else images.keys()
    cached = store.get_embeddings("image", backbone.id, list(set(hashes)))
    first_of: dict[str, int] = {}  # identical images are encoded once
    for i, h in enumerate(hashes):
        if h not in cached:
            first_of.setdefault(h, i)
    idx = list(first_of.values())
    return images.take(idx), list(first_of)


def encode_texts(backbone: Backbone, texts: list[str], store: Store, batch_size: int = 256) -> tuple[np.ndarray, int]:
    """L2-normalised embeddings of ``texts`` in order, and how many had to be encoded (not cached): one cache query
    when every text is cached."""
    if not texts:
        return np.zeros((0, backbone.embed_dim), np.float32), 0
    hashes = [_sha(t) for t in texts]
    found = store.get_embeddings("text", backbone.id, list(set(hashes)))
    todo = [t for t, h in dict(zip(texts, hashes)).items() if h not in found]
    for idx, emb in iter_text_embeddings(backbone, todo, batch_size):  # each batch stored as soon as it is encoded
        chunk = [todo[i] for i in idx]
        keys = [_sha(t) for t in chunk]
        store.put_embeddings("text", backbone.id, keys, emb, chunk)
        found.update(zip(keys, emb))
    return np.stack([found[h] for h in hashes]), len(todo)


def encode_images(
    backbone: Backbone, images: ImageSet, store: Store, batch_size: int = 256, progress: Progress | None = None
) -> tuple[np.ndarray, int]:
    """L2-normalised embeddings of every image in order, and how many had to be encoded.

    Each batch is stored as soon as it is encoded, so an interrupted run resumes where it stopped.
    """
    hashes = images.keys()
    todo, keys = uncached_images(backbone, images, store, hashes)
    if progress:
        progress(0, len(todo))
    for start in range(0, len(todo), batch_size):
        chunk = todo.subset((np.arange(len(todo)) >= start) & (np.arange(len(todo)) < start + batch_size))
        store.put_embeddings("image", backbone.id, keys[start : start + batch_size], embed_images(backbone, chunk, batch_size))
        if progress:
            progress(start + len(chunk), len(todo))
    cached = store.get_embeddings("image", backbone.id, list(set(hashes)))
    return np.stack([cached[h] for h in hashes]), len(todo)
