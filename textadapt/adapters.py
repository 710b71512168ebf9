"""Text-side adapters, trained on text embeddings only and applied to image embeddings.

Every adapter is a linear classifier on L2-normalised embeddings, so training on text and scoring
images share one loop and one output: a (classes, dim) weight W with logits = v @ W.T.

- ``tap-head``: TAP's recipe as in its reference code (methods.md): one bias-free linear layer
  with its default (random) init; fresh Gaussian noise N(0, 0.1^2) added to the embeddings at
  every step (not re-normalised; it bridges the text/image modality gap); cross-entropy with label
  smoothing 0.1; AdamW (lr 1e-3, betas 0.9/0.999, weight decay 0.01, constant lr); full batch; a
  fixed number of steps.
- ``zs-head``: the same layer and recipe, but W starts at the zero-shot class prototypes times
  CLIP's logit scale, so at step 0 it is zero-shot CLIP, and training moves it from there.
- ``residual`` (TaskRes): W = logit_scale * normalise(t + alpha * x) with t the frozen zero-shot
  prototypes and x, initialised to zero, the only trained tensor (alpha 0.5).

The prompt-learning adapter (learned context vectors through the text tower) is in
``prompt_learning.py``; it returns the same ``TrainedHead``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from textadapt.losses import CrossEntropy


ADAPTERS = ("tap-head", "zs-head", "residual")


@dataclass
class TapRecipe:
    steps: int
    noise_std: float = 0.1
    label_smoothing: float = 0.1
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    seed: int = 7777
    residual_alpha: float = 0.5  # TaskRes's alpha (residual adapter only)


@dataclass
class TrainedHead:
    weight: np.ndarray  # (classes, dim): logits = image_embedding @ weight.T
    losses: list[float] = field(default_factory=list)  # every 10 steps, and the last
    seconds: float = 0.0
    device: str = "cpu"
    seed: int = 0


class _Linear(torch.nn.Module):
    """tap-head (random init) or zs-head (init at logit_scale * prototypes)."""

    def __init__(self, dim: int, n_classes: int, init: torch.Tensor | None, device: torch.device):
        super().__init__()
        self.layer = torch.nn.Linear(dim, n_classes, bias=False, device=device)  # default init, seeded by the caller
        if init is not None:
            with torch.no_grad():
                self.layer.weight.copy_(init)

    def weight(self) -> torch.Tensor:
        return self.layer.weight


class _Residual(torch.nn.Module):
    """TaskRes: W = scale * normalise(t + alpha * x), x starts at zero and is all that trains."""

    def __init__(self, prototypes: torch.Tensor, logit_scale: float, alpha: float):
        super().__init__()
        self.register_buffer("base", prototypes)
        self.residual = torch.nn.Parameter(torch.zeros_like(prototypes))
        self.scale, self.alpha = logit_scale, alpha

    def weight(self) -> torch.Tensor:
        return self.scale * F.normalize(self.base + self.alpha * self.residual, dim=-1)


def train_adapter(adapter: str, embeddings: np.ndarray, labels: np.ndarray, n_classes: int, recipe: TapRecipe,
                  prototypes: np.ndarray | None = None, logit_scale: float = 100.0, loss: Callable | None = None,
                  device: torch.device | str = "cpu") -> TrainedHead:
    """Train one adapter on (N, D) L2-normalised text embeddings with labels in [0, n_classes).

    ``prototypes`` (classes, D), the normalised zero-shot class embeddings, are needed by zs-head
    and residual. ``loss(logits, labels, embeddings)`` defaults to TAP's cross-entropy with label
    smoothing; an ``OTSoftLabels`` loss with an EMA teacher is updated after every step.
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; known: {', '.join(ADAPTERS)}")
    if len(embeddings) == 0:
        raise ValueError("no training descriptions")
    if adapter != "tap-head" and prototypes is None:
        raise ValueError(f"{adapter} starts from the zero-shot prototypes; pass prototypes")
    device = torch.device(device)
    loss = loss or CrossEntropy(recipe.label_smoothing)
    x = torch.as_tensor(embeddings, dtype=torch.float32, device=device)
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    protos = None if prototypes is None else F.normalize(torch.as_tensor(prototypes, dtype=torch.float32, device=device), dim=-1)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(recipe.seed)
        if adapter == "residual":
            model = _Residual(protos, logit_scale, recipe.residual_alpha)
        else:
            model = _Linear(x.shape[1], n_classes, logit_scale * protos if adapter == "zs-head" else None, device)
        noise = torch.Generator(device=device).manual_seed(recipe.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
        losses: list[float] = []
        t0 = time.perf_counter()
        for step in range(recipe.steps):
            noisy = x + torch.randn(x.shape, generator=noise, device=device) * recipe.noise_std
            value = loss(noisy @ model.weight().T, y, noisy)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            if hasattr(loss, "update_ema"):
                loss.update_ema(model.weight())
            if step % 10 == 0 or step == recipe.steps - 1:
                losses.append(value.item())
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            weight = model.weight().detach().cpu().numpy()
    return TrainedHead(weight, losses, seconds, str(device), recipe.seed)


def train_tap_head(embeddings: np.ndarray, labels: np.ndarray, n_classes: int, recipe: TapRecipe,
                   device: torch.device | str = "cpu", loss: Callable | None = None) -> TrainedHead:
    """TAP's linear head (random init), exactly the reference recipe when ``loss`` is None."""
    return train_adapter("tap-head", embeddings, labels, n_classes, recipe, loss=loss, device=device)
