"""Trained heads in the cache, content-addressed like generations and embeddings.

Training a head is deterministic given its inputs: the same adapter, recipe (seed included), training embeddings and
labels, starting weights, backbone and code give the same weights. So each trained head is stored under the sha256 of
those inputs (``head_key``: the one place that says what they are), and a run looks its heads up before training:
a head whose inputs are unchanged is read back (with the losses, seconds and device of when it was trained), and only
the missing ones are trained. Whatever changes the inputs changes the key: an edited or refreshed description (its
embedding), another seed, steps or OT setting, another backbone or torch version. A change to the training code that
changes its numerics changes none of them: whoever makes one bumps ``TRAINING_SCHEME``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from dataclasses import dataclass

import numpy as np
import torch

from textadapt.adapters import TrainedHead
from textadapt.store import StoredHead

# Bump this whenever a change to the training code (adapters.py's fit and train_adapter, prompt_learning.py, losses.py,
# the harness's recipes) changes the weights a head trains to on the same inputs: every head stored under the old
# scheme then has another key, and is trained again.
TRAINING_SCHEME = 1


@dataclass
class HeadInputs:
    """Everything that determines one trained head's weights: what ``head_key`` hashes."""

    adapter: str  # tap-head, zs-head, tap-residual, taskres, tap-coop, protext
    loss: str  # as in results.loss: ce, ot or l1
    recipe: object  # TapRecipe, TaskResRecipe or PromptRecipe (a dataclass): every field, the seed included
    ot: object | None  # the OTTERSoftLabels of a +ot head (its settings are hashed), else None
    embeddings: np.ndarray  # (N, D) training description embeddings
    labels: np.ndarray  # (N,) their classes
    start: np.ndarray | None  # the weights training starts from (zs-head, tap-residual: teacher; taskres: base), or None
    logit_scale: float
    classes: list[str]  # class names (the prompt learners put them in their prompts)
    backbone: str  # Backbone.id: the weights (text tower, logit scale) and the towers' activation
    device: str  # where it trains: torch.device's type (cpu, cuda), whose random streams and kernels differ

    def settings(self) -> dict:
        """The inputs but the arrays, as JSON values: hashed into the key, and stored (``trained_heads.settings``)."""
        ot = None
        if self.ot is not None:  # the loss's constructor arguments (OTTERSoftLabels: alpha, eps, iters, block, ema_decay)
            ot = {p: getattr(self.ot, p) for p in inspect.signature(type(self.ot)).parameters}
        return {
            "scheme": TRAINING_SCHEME,
            "adapter": self.adapter,
            "loss": self.loss,
            "recipe": {"type": type(self.recipe).__name__, **dataclasses.asdict(self.recipe)},
            "ot": ot,
            "logit_scale": float(self.logit_scale),
            "n_classes": len(self.classes),
            "classes": list(self.classes),
            "backbone": self.backbone,
            "torch": torch.__version__,
            "device": self.device,
        }


def head_key(inputs: HeadInputs) -> str:
    """The content address of a trained head: sha256 of ``inputs.settings()`` (canonical JSON) and the exact bytes (with
    dtype and shape) of the training embeddings (float32), labels (int64) and starting weights (float32), as training
    reads them. Hashing costs about a millisecond per MB of embeddings, far less than training."""
    h = hashlib.sha256(json.dumps(inputs.settings(), sort_keys=True).encode())
    arrays = [
        ("embeddings", inputs.embeddings, np.float32),
        ("labels", inputs.labels, np.int64),
        ("start", inputs.start, np.float32),
    ]
    for name, array, dtype in arrays:
        if array is None:
            h.update(f"|{name}:none".encode())
            continue
        a = np.ascontiguousarray(array, dtype=dtype)
        h.update(f"|{name}:{a.dtype.str}:{a.shape}|".encode())
        h.update(a.data)
    return h.hexdigest()


def head_row(key: str, inputs: HeadInputs, head: TrainedHead) -> StoredHead:
    """A head just trained, as ``Store.put_trained_heads`` stores it."""
    return StoredHead(
        key,
        inputs.adapter,
        inputs.loss,
        head.seed,
        inputs.backbone,
        inputs.settings(),
        head.weight,
        head.losses,
        head.seconds,
        head.device,
        head.labelled_mass or None,
    )


def cached_head(row: StoredHead) -> TrainedHead:
    """A head read back from the cache (``cached`` set: its losses, seconds and device are from when it was trained)."""
    return TrainedHead(row.weight, row.losses, row.seconds, row.device, row.seed, row.labelled_mass or [], cached=True)
