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
- ``tap-residual``: TaskRes's parametrisation with TAP's recipe around it: W = logit_scale *
  normalise(t + alpha * x), t the *normalised* zero-shot ensemble prototypes, x from zero the only
  trained tensor (alpha 0.5), trained with TAP's noise, loss, optimiser and full batch.
- ``taskres``: TaskRes's own recipe (geekyutao/TaskRes, ``trainers/taskres.py`` and its configs):
  t = the *raw* (unnormalised) text features of the dataset's TaskRes template (a 7+1 template
  ensemble for ImageNet), averaged; W = logit_scale * normalise(t + alpha * x), alpha 0.5 (1.0 for
  Flowers); plain cross-entropy, no noise; Adam (lr 2e-3, 2e-4 for ImageNet; L2 weight decay 5e-4),
  batches of 256 in a new random order every epoch, Dassl's schedule (one warm-up epoch at lr 1e-5,
  then a cosine over the epochs), 200 epochs (its 8- and 16-shot configs); trained on description
  embeddings where TaskRes used image features.

The prompt learners (context vectors through the text tower) are in ``prompt_learning.py``; they
use the same loop (``fit``) and return the same ``TrainedHead``.

Bounded memory: a full-batch step runs over the descriptions in chunks, accumulating gradients, so
memory grows with the chunk, not with descriptions x classes. The noise of each chunk is drawn from
the same generator in order, so on the CPU the noise stream -- and the weights, up to float
summation order -- are those of one step over everything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from textadapt.losses import CrossEntropy
from textadapt.methods import HEADS

CHUNK_BYTES = 256 * 2**20  # working memory of one chunk of a full-batch step (noise, logits, their gradients)
NOISE_ALIGN = 16  # CPU randn fills 16 values at a time: chunks of whole 16-value runs keep one noise stream


@dataclass
class TapRecipe:
    steps: int
    noise_std: float = 0.1
    label_smoothing: float = 0.1
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    seed: int = 7777
    residual_alpha: float = 0.5  # tap-residual only
    chunk: int | None = None  # descriptions per chunk of a full-batch step; None: as many as CHUNK_BYTES allows


@dataclass
class TaskResRecipe:
    """TaskRes's recipe (Dassl configs ``adam_lr2e-3_B256_ep200.yaml``; ``scripts`` set alpha per dataset)."""

    alpha: float = 0.5
    lr: float = 2e-3
    weight_decay: float = 5e-4  # Dassl's default, coupled (torch.optim.Adam adds it to the gradient)
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 200
    batch_size: int = 256
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    seed: int = 7777


# TaskRes's CUSTOM_TEMPLATES (trainers/taskres.py), keyed by textadapt's dataset names; every other
# dataset gets "a photo of a {}.". ImageNet's base averages IMAGENET_TEMPLATES_SELECT and that template.
TASKRES_TEMPLATES = {
    "oxford-pets": ["a photo of a {}, a type of pet."],
    "flowers102": ["a photo of a {}, a type of flower."],
    "fgvc-aircraft": ["a photo of a {}, a type of aircraft."],
    "dtd": ["{} texture."],
    "eurosat": ["a centered satellite photo of {}."],
    "food101": ["a photo of {}, a type of food."],
    "ucf101": ["a photo of a person doing {}."],
    "imagenet1k": [
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
        "a photo of a {}.",
    ],
}


def taskres_templates(dataset: str) -> list[str]:
    return TASKRES_TEMPLATES.get(dataset, ["a photo of a {}."])


def taskres_recipe(dataset: str, seed: int = 7777) -> TaskResRecipe:
    """TaskRes's per-dataset settings (its train_regular.sh): alpha 1.0 for Flowers, lr 2e-4 for ImageNet."""
    return TaskResRecipe(alpha=1.0 if dataset == "flowers102" else 0.5, lr=2e-4 if dataset == "imagenet1k" else 2e-3, seed=seed)


@dataclass
class TrainedHead:
    weight: np.ndarray  # (classes, dim): logits = image_embedding @ weight.T
    losses: list[float] = field(default_factory=list)  # every 10 steps, and the last
    seconds: float = 0.0
    device: str = "cpu"
    seed: int = 0
    labelled_mass: list[float] = field(default_factory=list)  # +ot: per step, the OT plan's mass on the labelled class
    cached: bool = False  # read back from the cache (head_cache.py): losses, seconds and device are from when it trained


class _Linear(torch.nn.Module):
    """tap-head (random init) or zs-head (init at logit_scale * prototypes); forward() is the class weights."""

    def __init__(self, dim: int, n_classes: int, init: torch.Tensor | None, device: torch.device):
        super().__init__()
        self.layer = torch.nn.Linear(dim, n_classes, bias=False, device=device)  # default init, seeded by the caller
        if init is not None:
            with torch.no_grad():
                self.layer.weight.copy_(init)

    def forward(self) -> torch.Tensor:
        return self.layer.weight


class _Residual(torch.nn.Module):
    """TaskRes's classifier: W = scale * normalise(base + alpha * x); x starts at zero and is all that trains."""

    def __init__(self, base: torch.Tensor, logit_scale: float, alpha: float):
        super().__init__()
        self.register_buffer("base", base)
        self.residual = torch.nn.Parameter(torch.zeros_like(base))
        self.scale, self.alpha = logit_scale, alpha

    def forward(self) -> torch.Tensor:
        return self.scale * F.normalize(self.base + self.alpha * self.residual, dim=-1)


# --------------------------------------------------------------------------------------------
# The training loop, shared by every adapter and prompt learner


Step = tuple[float | None, torch.Tensor | None]  # (learning rate or None to keep it, description indices or None for all)


def full_batch(steps: int) -> Iterator[Step]:
    """TAP's schedule: every step over all descriptions, constant learning rate."""
    return iter([(None, None)] * steps)


def dassl_lr(epoch: int, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
    """Dassl's learning rate in ``epoch`` (from 0) for ``LR_SCHEDULER: cosine`` with a constant warm-up
    (dassl/optim/lr_scheduler.py; WARMUP_RECOUNT on): warmup_lr for the first warmup_epochs, then
    CosineAnnealingLR(T_max=epochs) counted from the end of the warm-up."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def epoch_batches(n: int, batch_size: int, epochs: int, lr: Callable[[int], float], seed: int) -> Iterator[Step]:
    """Mini-batches as Dassl's train loader draws them: a new random order every epoch, the last short
    batch dropped when there is at least one full batch; ``lr(epoch)`` for every batch of the epoch."""
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=order)
        stop = n - n % batch_size if n >= batch_size else n
        for s in range(0, stop, batch_size):
            yield lr(epoch), perm[s : s + batch_size]


def chunk_size(n: int, dim: int, n_classes: int, block: int | None = None, budget: int = CHUNK_BYTES) -> int:
    """Descriptions per chunk: the noise and noisy copy (2 x dim floats) and the logits, probabilities and
    their gradients (~4 x classes floats) of a chunk fit ``budget``; a multiple of NOISE_ALIGN and of an
    OT loss's plan ``block``, and never more than needed for ``n``."""
    rows = max(1, budget // (4 * (2 * dim + 4 * n_classes)))
    align = math.lcm(NOISE_ALIGN, block or 1)
    return min(max(align, rows // align * align), -(-n // align) * align)


def fit(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable,
    opt: torch.optim.Optimizer,
    schedule: Iterable[Step],
    *,
    noise_std: float = 0.0,
    seed: int = 0,
    chunk: int | None = None,
    scale: float = 1.0,
    objective: Callable | None = None,
    batch_classes: bool = False,
) -> tuple[list[float], float]:
    """Train ``model`` (whose ``forward()`` gives the (classes, dim) class weights) on embeddings ``x`` (N, D).

    Each step of ``schedule`` sets the learning rate (if given) and runs over its descriptions (all of
    them, or the given indices) in chunks: fresh noise N(0, noise_std^2) on each chunk's embeddings, then
    ``objective(W, noisy, labels, clean)``, by default ``loss(scale * noisy @ W.T, labels, clean)``; the
    gradients of the chunks, each weighted by its share of the step, add up to the step's gradient.
    The class weights are computed once per step and their gradient is collected from every chunk
    before it flows back into the model (one pass through a prompt learner's text tower per step).
    ``batch_classes``: W only for the classes of the step's descriptions (labels renumbered), for
    objectives that never compare a description with other classes.

    A loss with ``start(model)`` / ``step(model)`` (OTTER's EMA teacher) is started before the first step
    and stepped before each; a loss with a plan ``block`` gets the full-batch steps' descriptions in a
    new random order every step, in chunks of whole blocks. Returns the step losses (every 10 steps and
    the last) and the seconds spent.
    """
    block = getattr(loss, "block", None)
    n_classes = int(y.max()) + 1 if len(y) else 1
    chunk = chunk or chunk_size(len(x), x.shape[1], n_classes, block)
    if block and chunk % block:
        raise ValueError(f"chunk {chunk} must be a multiple of the loss's plan block {block}")
    objective = objective or (lambda w, noisy, labels, clean: loss(scale * noisy @ w.T, labels, clean))
    noise = torch.Generator(device=x.device).manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    if hasattr(loss, "start"):
        loss.start(model)
    losses: list[float] = []
    step, t0 = 0, time.perf_counter()
    for step, (lr, idx) in enumerate(schedule):
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        if block and idx is None:
            idx = torch.randperm(len(x), generator=order)
        idx = idx.to(x.device) if idx is not None else None
        if hasattr(loss, "step"):
            loss.step(model)
        if batch_classes:
            present = torch.unique(y if idx is None else y[idx])
            local = torch.full((n_classes,), -1, dtype=torch.long, device=y.device)
            local[present] = torch.arange(len(present), device=y.device)
            weight = model(present)
        else:
            weight = model()
        leaf = weight.detach().requires_grad_()
        n = len(x) if idx is None else len(idx)
        total = torch.zeros((), device=x.device)
        for s in range(0, n, chunk):
            rows = slice(s, s + chunk) if idx is None else idx[s : s + chunk]
            clean, labels = x[rows], y[rows]
            noisy = clean + torch.randn(clean.shape, generator=noise, device=x.device) * noise_std if noise_std else clean
            value = objective(leaf, noisy, local[labels] if batch_classes else labels, clean) * (len(clean) / n)
            value.backward()
            total += value.detach()
        opt.zero_grad(set_to_none=True)
        weight.backward(leaf.grad)
        opt.step()
        if step % 10 == 0:
            losses.append(total.item())
    if step % 10:
        losses.append(total.item())
    return losses, time.perf_counter() - t0


def train_adapter(
    adapter: str,
    embeddings: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    recipe: TapRecipe | TaskResRecipe,
    prototypes: np.ndarray | None = None,
    logit_scale: float = 100.0,
    loss: Callable | None = None,
    device: torch.device | str = "cpu",
) -> TrainedHead:
    """Train one adapter on (N, D) L2-normalised text embeddings with labels in [0, n_classes).

    ``prototypes`` (classes, D): where zs-head and tap-residual start (the zero-shot class embeddings,
    normalised here), and TaskRes's base t (its raw template features, used as given: ``taskres_base``).
    ``recipe``: a ``TapRecipe`` for tap-head, zs-head and tap-residual, a ``TaskResRecipe`` for taskres.
    ``loss(logits, labels, clean embeddings)`` defaults to the recipe's cross-entropy (TAP's label
    smoothing 0.1; none for TaskRes); ``OTTERSoftLabels`` gives OTTER's soft labels.
    """
    if adapter not in HEADS:
        raise ValueError(f"unknown adapter {adapter!r}; known: {', '.join(HEADS)}")
    if len(embeddings) == 0:
        raise ValueError("no training descriptions")
    if adapter != "tap-head" and prototypes is None:
        raise ValueError(f"{adapter} starts from the zero-shot prototypes (taskres: its template features); pass prototypes")
    taskres = adapter == "taskres"
    if taskres != isinstance(recipe, TaskResRecipe):
        raise ValueError(f"{adapter} takes a {'TaskResRecipe' if taskres else 'TapRecipe'}, not a {type(recipe).__name__}")
    device = torch.device(device)
    x = torch.as_tensor(embeddings, dtype=torch.float32, device=device)
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    base = None if prototypes is None else torch.as_tensor(prototypes, dtype=torch.float32, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(recipe.seed)
        if taskres:
            model = _Residual(base, logit_scale, recipe.alpha)
            opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
            lr = lambda epoch: dassl_lr(epoch, recipe.lr, recipe.epochs, recipe.warmup_epochs, recipe.warmup_lr)  # noqa: E731
            schedule = epoch_batches(len(x), recipe.batch_size, recipe.epochs, lr, recipe.seed)
            losses, seconds = fit(model, x, y, loss or CrossEntropy(0.0), opt, schedule, seed=recipe.seed)
        else:
            if adapter == "tap-residual":
                model = _Residual(F.normalize(base, dim=-1), logit_scale, recipe.residual_alpha)
            else:
                init = logit_scale * F.normalize(base, dim=-1) if adapter == "zs-head" else None
                model = _Linear(x.shape[1], n_classes, init, device)
            opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
            losses, seconds = fit(
                model,
                x,
                y,
                loss or CrossEntropy(recipe.label_smoothing),
                opt,
                full_batch(recipe.steps),
                noise_std=recipe.noise_std,
                seed=recipe.seed,
                chunk=recipe.chunk,
            )
        with torch.no_grad():
            weight = model().detach().cpu().numpy()
    return TrainedHead(weight, losses, seconds, str(device), recipe.seed)


def train_tap_head(
    embeddings: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    recipe: TapRecipe,
    device: torch.device | str = "cpu",
    loss: Callable | None = None,
) -> TrainedHead:
    """TAP's linear head (random init), exactly the reference recipe when ``loss`` is None."""
    return train_adapter("tap-head", embeddings, labels, n_classes, recipe, loss=loss, device=device)


@torch.inference_mode()
def taskres_base(backbone, class_names: list[str], templates: list[str], batch_size: int = 256) -> np.ndarray:
    """TaskRes's base t (trainers/taskres.py ``_get_base_text_features``): per class, the mean over the
    templates of the text tower's *raw* output (no normalisation), (classes, dim)."""
    texts = [t.format(c) for c in class_names for t in templates]
    out = []
    for s in range(0, len(texts), batch_size):
        tokens = backbone.tokenizer(texts[s : s + batch_size]).to(backbone.device)
        out.append(backbone.model.encode_text(tokens, normalize=False).float().cpu())
    return torch.cat(out).view(len(class_names), len(templates), -1).mean(dim=1).numpy()
