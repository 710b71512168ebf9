"""Using the result: export a run's adapted classifier, and predict with it.

An exported classifier is two files side by side:

- ``NAME.safetensors``: ``weight`` (classes, dim), float32, logits = normalise(image embedding) @ weight.T;
  and ``log_prior`` (classes,) for information-gain scoring (logits - beta * log_prior).
- ``NAME.json``: what it needs and what it is: the backbone spec to load, the backbone's cache
  identity (``ARCH@sha256`` of its weights, checked at load), the class names in order, the
  scoring and beta, the run, method and seed it came from, and its accuracy in that run.

``predict`` loads the backbone once, embeds the images in batches, and returns the top-k classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from textadapt import TextadaptError
from textadapt.encoders import Backbone
from textadapt.images import IMAGE_SUFFIXES, WHITE, Colour, open_rgb
from textadapt.store import Store

FORMAT = "textadapt-classifier/1"


@dataclass
class ExportedClassifier:
    weight: np.ndarray
    log_prior: np.ndarray | None
    meta: dict

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def logits(self, image_embeddings: np.ndarray) -> np.ndarray:
        logits = image_embeddings @ self.weight.T
        if self.log_prior is not None:
            logits = logits - self.meta["beta"] * self.log_prior[None, :]
        return logits


def default_method(store: Store, run_id: str) -> str:
    """The run's best adapted method by mean top-1; in a run without scores, its first adapted classifier."""
    _, rows = store.sql(
        f"SELECT method FROM results WHERE run_id = '{_q(run_id)}' AND kind = 'adapted' ORDER BY top1 DESC, method LIMIT 1"
    )
    if rows:
        return rows[0][0]
    _, rows = store.sql(
        f"SELECT method FROM classifiers WHERE run_id = '{_q(run_id)}' AND method NOT LIKE 'zero-shot:%' "
        "AND method NOT LIKE 'cupl:%' AND method NOT LIKE 'dclip:%' AND method NOT LIKE 'waffle%' ORDER BY method LIMIT 1"
    )
    if rows:
        return rows[0][0]
    raise TextadaptError(f"run {run_id!r} stored no adapted classifier (it failed before training, or predates schema v3)")


def _q(text: str) -> str:
    return text.replace("'", "''")


def export(store: Store, run_id: str, method: str | None, out_dir: Path) -> tuple[Path, Path]:
    """Write ``out_dir/RUN__METHOD.safetensors`` and ``.json``; returns both paths."""
    from safetensors.numpy import save_file

    _, run = store.sql(
        f"SELECT r.dataset, r.status, b.spec, b.arch, b.weights, b.backbone, b.untrained FROM runs r "
        f"JOIN backbones b ON b.backbone = r.backbone WHERE r.run_id = '{_q(run_id)}'"
    )
    if not run:
        _, known = store.sql("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 5")
        raise TextadaptError(
            f'no run {run_id!r} in {store.path}; recent runs: {", ".join(r[0] for r in known) or "none"} (`textadapt sql "SELECT * FROM runs"`)'
        )
    dataset, status, spec, arch, weights, backbone_id, untrained = run[0]
    method = method or default_method(store, run_id)
    try:
        seed, weight, classes, log_prior, beta = store.classifier(run_id, method)
    except KeyError:
        _, methods = store.sql(f"SELECT method FROM classifiers WHERE run_id = '{_q(run_id)}' ORDER BY method")
        raise TextadaptError(
            f"run {run_id!r} has no classifier {method!r}; it has: {', '.join(m[0] for m in methods) or 'none'}"
        ) from None
    _, result = store.sql(f"SELECT top1, top1_per_seed FROM results WHERE run_id = '{_q(run_id)}' AND method = '{_q(method)}'")
    meta = {
        "format": FORMAT,
        "run_id": run_id,
        "dataset": dataset,
        "run_status": status,
        "method": method,
        "seed": seed,
        "backbone_spec": _loadable_spec(spec, arch, weights),
        "backbone_id": backbone_id,
        "untrained_backbone": bool(untrained),
        "classes": classes,
        "scoring": "ig" if log_prior is not None else "plain",
        "beta": beta,
        "top1_in_run": result[0][1][0] if result and result[0][1] else None,
        "top1_mean_in_run": result[0][0] if result else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{run_id}__{method.replace(':', '_').replace('/', '_').replace('+', '_')}"
    tensors = {"weight": weight} | ({"log_prior": log_prior} if log_prior is not None else {})
    st, js = out_dir / f"{stem}.safetensors", out_dir / f"{stem}.json"
    save_file(tensors, str(st), metadata={"format": FORMAT})
    js.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return st, js


def _loadable_spec(spec: str, arch: str, weights: str) -> str:
    """The spec that loads these exact weights again: an ``auto`` spec is pinned to what it resolved to."""
    if arch.startswith("hf-hub:"):
        return arch
    return f"{arch}:{weights}"


def load(path: Path) -> ExportedClassifier:
    """Read ``NAME.json`` and ``NAME.safetensors`` (either path may be given)."""
    from safetensors.numpy import load_file

    path = Path(path)
    js, st = path.with_suffix(".json"), path.with_suffix(".safetensors")
    for p in (js, st):
        if not p.is_file():
            raise TextadaptError(
                f"{p}: not found (an exported classifier is NAME.json + NAME.safetensors; see `textadapt export`)"
            )
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
        tensors = load_file(str(st))
    except Exception as e:
        raise TextadaptError(f"{path}: not a textadapt classifier ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT or "weight" not in tensors:
        raise TextadaptError(f"{js}: not a {FORMAT} file (format: {meta.get('format')!r})")
    return ExportedClassifier(tensors["weight"], tensors.get("log_prior"), meta)


def check_backbone(clf: ExportedClassifier, backbone: Backbone) -> None:
    if backbone.id != clf.meta["backbone_id"]:
        raise TextadaptError(
            f"this classifier was trained on backbone {clf.meta['backbone_id']} "
            f"({clf.meta['backbone_spec']}), but {backbone.spec} loads as {backbone.id}: its weights, image "
            f"preprocessing or activation differ (an id with -quickgelu has QuickGELU towers); train it again "
            f"on this backbone"
        )


def image_paths(paths: list[Path]) -> list[Path]:
    """Image files among ``paths``; folders are searched recursively, in sorted order."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise TextadaptError(f"{p}: no such file or folder")
    if not out:
        raise TextadaptError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return out


@torch.inference_mode()
def embed_files(
    backbone: Backbone, paths: list[Path], batch_size: int = 64, progress=None, background: Colour = WHITE
) -> np.ndarray:
    """Embeddings of image files, decoded as the test images of a run are (``images.open_rgb``)."""
    out = []
    for start in range(0, len(paths), batch_size):
        batch = [backbone.preprocess(open_rgb(p, background)) for p in paths[start : start + batch_size]]
        pixels = torch.stack(batch).to(backbone.device)
        out.append(backbone.model.encode_image(pixels, normalize=True).float().cpu().numpy())
        if progress:
            progress(min(start + batch_size, len(paths)), len(paths))
    return np.concatenate(out)


def top_k(clf: ExportedClassifier, image_embeddings: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
    """Per image, the k best classes with their softmax probability under the classifier's scoring."""
    logits = clf.logits(image_embeddings)
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return [[(clf.classes[j], float(probs[i, j])) for j in row] for i, row in enumerate(order)]
