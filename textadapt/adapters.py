"""Text-side adapters, trained on text embeddings only and applied to image embeddings.

``train_tap_head`` is TAP's recipe as in its reference code (methods.md): one bias-free linear
layer on the L2-normalised text embeddings of the descriptions, fresh Gaussian noise N(0, 0.1^2)
added to the embeddings at every step (not re-normalised; it bridges the text/image modality gap),
cross-entropy with label smoothing 0.1, AdamW (lr 1e-3, betas 0.9/0.999, weight decay 0.01,
constant lr), full batch, a fixed number of steps. At inference the L2-normalised image embedding
goes through the same layer and the argmax is the class.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class TapRecipe:
    steps: int
    noise_std: float = 0.1
    label_smoothing: float = 0.1
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    seed: int = 7777


@dataclass
class TrainedHead:
    weight: np.ndarray  # (classes, dim): logits = image_embedding @ weight.T
    losses: list[float] = field(default_factory=list)  # every 10 steps, and the last
    seconds: float = 0.0
    device: str = "cpu"


def train_tap_head(embeddings: np.ndarray, labels: np.ndarray, n_classes: int, recipe: TapRecipe,
                   device: torch.device | str = "cpu") -> TrainedHead:
    """Train the TAP linear head on (N, D) L2-normalised text embeddings with labels in [0, n_classes)."""
    if len(embeddings) == 0:
        raise ValueError("no training descriptions")
    device = torch.device(device)
    x = torch.as_tensor(embeddings, dtype=torch.float32, device=device)
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(recipe.seed)
        head = torch.nn.Linear(x.shape[1], n_classes, bias=False, device=device)  # default (random) init, seeded
        noise = torch.Generator(device=device).manual_seed(recipe.seed)
        opt = torch.optim.AdamW(head.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
        losses: list[float] = []
        t0 = time.perf_counter()
        for step in range(recipe.steps):
            noisy = x + torch.randn(x.shape, generator=noise, device=device) * recipe.noise_std
            loss = F.cross_entropy(head(noisy), y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 10 == 0 or step == recipe.steps - 1:
                losses.append(loss.item())
        seconds = time.perf_counter() - t0
    return TrainedHead(head.weight.detach().cpu().numpy(), losses, seconds, str(device))
