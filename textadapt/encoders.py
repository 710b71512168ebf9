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
by any route shares a cache, different ones never do. Hashing every weight costs about a second
for ViT-B-32, so where the weights come from a file the hash is kept in
``$TEXTADAPT_HOME/backbone_hashes.json`` under the file's path, size and modification time (and
the architecture, activation, preprocessing and open_clip version): a changed file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import open_clip
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
HASH_CACHE = "backbone_hashes.json"
HASH_SCHEME = 2  # 2: the activation joined the identity (QuickGELU towers)

Progress = Callable[[int, int], None]


@dataclass
class Backbone:
    spec: str
    arch: str
    weights: str
    untrained: bool
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: torch.device
    id: str = ""
    embed_dim: int = 0
    quick_gelu: bool = False  # the towers' activation: QuickGELU (as OpenAI trained its weights) or open_clip's default


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


def _hash_cache_path() -> Path:
    from textadapt.config import default_home

    return default_home() / HASH_CACHE


def _file_key(path: Path, parts: dict) -> str:
    """Where a file's weights hash is kept: its path, size and mtime, and what else goes into the id."""
    st = path.stat()  # follows links: the Hugging Face cache links snapshot files to blobs
    key = {
        "file": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "open_clip": open_clip.__version__,
        "scheme": HASH_SCHEME,
        **parts,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_hash_cache() -> dict:
    try:
        known = json.loads(_hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def cached_weights_id(model: torch.nn.Module, preprocess, quick_gelu: bool, weights_file: Path | None, arch: str) -> str:
    """``weights_id``, looked up by file identity where the weights come from ``weights_file``."""
    if weights_file is None:
        return weights_id(model, preprocess, quick_gelu)
    key = _file_key(weights_file, {"arch": arch, "quick_gelu": quick_gelu, "preprocess": repr(preprocess)})
    known = _read_hash_cache()
    if isinstance(known.get(key), str):
        return known[key]
    digest = weights_id(model, preprocess, quick_gelu)
    known[key] = digest
    path = _hash_cache_path()
    try:  # a write that fails costs only the next load's hashing time
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".backbone_hashes.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(known, f, indent=0)
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as e:
        log.warning("could not keep the backbone's weights hash in %s: %s", path, e)
    return digest


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


def _create(arch: str, pretrained: str | None, quick_gelu: bool = False):
    kwargs = {"force_quick_gelu": True} if quick_gelu else {}
    if pretrained is None or Path(pretrained).is_file():
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, **kwargs)
    else:
        with _offline_unless_reachable():
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, **kwargs)
    return model, preprocess


def _build_arch(arch: str) -> tuple[str, bool]:
    """(the open_clip config to build, force QuickGELU): ``X-quickgelu`` is X with QuickGELU where open_clip
    has no config of that name."""
    if arch.startswith("hf-hub:") or arch in open_clip.list_models():
        return arch, False
    base = arch.removesuffix(QUICKGELU)
    if base != arch and base in open_clip.list_models():
        return base, True
    return arch, False


def _tag_says_quick_gelu(arch: str, tag: str) -> bool:
    return bool((open_clip.get_pretrained_cfg(arch, tag) or {}).get("quick_gelu", False))


def _sidecar_says_quick_gelu(path: Path) -> bool:
    """What the ``open_clip_config.json`` beside a checkpoint (a hub snapshot's) says of QuickGELU; False without one."""
    config = path.parent / "open_clip_config.json"
    try:
        data = json.loads(config.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:
        raise TextadaptError(f"{config}: not a readable open_clip config ({e}); move it away or fix it") from None
    model_cfg = data.get("model_cfg", data) if isinstance(data, dict) else {}
    return bool(isinstance(model_cfg, dict) and model_cfg.get("quick_gelu", False))


def _tag_file(arch: str, tag: str) -> Path | None:
    """The local file open_clip loaded for a pretrained tag (in the Hugging Face cache: no network), or None."""
    try:
        with _hub_offline():
            found = open_clip.download_pretrained(open_clip.get_pretrained_cfg(arch, tag))
    except Exception:  # the weights loaded, so this only costs the hash cache
        return None
    return Path(found) if found and Path(found).is_file() else None


def _hub_file(hub_id: str) -> Path | None:
    """The local weights file open_clip loaded for an ``hf-hub:`` model (no network), or None."""
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        with _hub_offline():
            found = download_pretrained_from_hf(hub_id.removeprefix("hf-hub:"))
    except Exception:
        return None
    return Path(found) if found and Path(found).is_file() else None


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


def _ways_out(arch: str, weights: str, err: Exception) -> TextadaptError:
    return TextadaptError(
        f"could not get the weights of backbone {arch}:{weights}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        f"Ways out:\n"
        f"  - with network access, run once so open_clip downloads and caches them (~/.cache/huggingface);\n"
        f"  - copy a checkpoint here and pass --backbone {arch}:/path/to/open_clip_model.safetensors;\n"
        f"  - pass --backbone {arch}:auto to fall back to untrained weights (a smoke run: accuracies mean nothing);\n"
        f"  - pass --backbone {arch}:random for untrained weights on purpose."
    )


def load_backbone(spec: str, device: str = "auto") -> Backbone:
    """Build the frozen model for ``spec``; strict unless the spec says ``auto``."""
    _register_configs()
    arch, weights = parse_spec(spec)
    build, quick = _build_arch(arch)  # quick: the spec says -quickgelu where open_clip has no such config
    if not build.startswith("hf-hub:") and build not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if arch.lower().replace("/", "-") in m.lower()][:8]
        raise TextadaptError(
            f"unknown open_clip architecture {arch!r} in backbone spec {spec!r}"
            + (f"; did you mean one of {close}?" if close else "; see open_clip.list_models()")
        )
    untrained, weights_file = False, None
    if build.startswith("hf-hub:"):
        try:
            with _offline_unless_reachable():
                model, preprocess = _create(build, None)  # open_clip reads quick_gelu from the hub's open_clip_config.json
        except Exception as e:
            raise _ways_out(arch, weights, e) from None
        weights_file = _hub_file(build)
    elif weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model, preprocess = _create(build, None, quick)
            _init_untrained(model)
        untrained = True
    elif weights == "auto":
        tags = open_clip.list_pretrained_tags_by_model(build)
        tag = "openai" if "openai" in tags else (tags[0] if tags else None)
        try:
            if tag is None:
                raise RuntimeError(f"open_clip lists no pretrained weights for {build}")
            with _open_clip_quiet():  # its "Failed to download" ERROR: the warning below says it, and what happens next
                model, preprocess = _create(build, tag, quick or _tag_says_quick_gelu(build, tag))
            weights, weights_file = tag, _tag_file(build, tag)
        except Exception as e:
            log.warning(
                "no pretrained weights for %s (%s): using UNTRAINED weights",
                arch,
                str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
            with torch.random.fork_rng(devices=[]), _open_clip_quiet():  # ("No pretrained weights loaded": said above)
                torch.manual_seed(RANDOM_SEED)
                model, preprocess = _create(build, None, quick)
                _init_untrained(model)
            weights, untrained = "random", True
    elif weights.endswith(CHECKPOINT_SUFFIXES) or "/" in weights or Path(weights).expanduser().exists():
        path = Path(weights).expanduser()
        if not path.is_file():
            raise TextadaptError(f"backbone checkpoint file not found: {path} (from spec {spec!r})")
        try:
            model, preprocess = _create(build, str(path), quick or _sidecar_says_quick_gelu(path))
        except TextadaptError:
            raise
        except Exception as e:
            raise TextadaptError(
                f"{path}: not a loadable {arch} checkpoint: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
        weights, weights_file = str(path), path
    else:
        tags = open_clip.list_pretrained_tags_by_model(build)
        if weights not in tags:
            raise TextadaptError(
                f"{arch} has no pretrained tag {weights!r}; open_clip knows {tags or 'none'}; or use a checkpoint path, random or auto"
            )
        try:
            model, preprocess = _create(build, weights, quick or _tag_says_quick_gelu(build, weights))
        except Exception as e:
            raise _ways_out(arch, weights, e) from None
        weights_file = _tag_file(build, weights)
    dev = resolve_device(device)
    # Frozen by use, not by flag: every encoder runs under inference_mode and nothing builds an optimiser
    # over the backbone (the prompt learner turns the flags off while it trains and restores them).
    # requires_grad_(False) here made CPU text encoding about 6% slower than open_clip's own model
    # (benchmarks/encoders.py; same weights, same inputs).
    model = model.to(dev).eval()
    quick = uses_quick_gelu(model)
    bb = Backbone(spec, arch, weights, untrained, model, preprocess, open_clip.get_tokenizer(build), dev, quick_gelu=quick)
    # The id names the architecture without the suffix and adds it for QuickGELU towers, so that
    # ViT-B-32:openai and ViT-B-32-quickgelu:/its/file.safetensors are one model with one cache.
    digest = cached_weights_id(model, preprocess, quick, weights_file, build)
    bb.id = f"{arch.removesuffix(QUICKGELU)}{QUICKGELU if quick else ''}@{digest[:16]}"
    with torch.inference_mode():
        bb.embed_dim = int(model.encode_text(bb.tokenizer(["a"]).to(dev)).shape[-1])
    return bb


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
    """L2-normalised embeddings of ``texts`` in order, and how many had to be encoded (not cached)."""
    todo = uncached_texts(backbone, texts, store)
    for idx, emb in iter_text_embeddings(backbone, todo, batch_size):  # each batch stored as soon as it is encoded
        chunk = [todo[i] for i in idx]
        store.put_embeddings("text", backbone.id, [_sha(t) for t in chunk], emb, chunk)
    if not texts:
        return np.zeros((0, backbone.embed_dim), np.float32), 0
    hashes = [_sha(t) for t in texts]
    cached = store.get_embeddings("text", backbone.id, list(set(hashes)))
    return np.stack([cached[h] for h in hashes]), len(todo)


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
