"""Training losses for the text-side classifiers.

Every loss is called as ``loss(logits, labels, embeddings)``: the classifier's logits for a chunk of
descriptions (computed on the noisy embeddings where the recipe adds noise), the descriptions' class
labels, and their *clean* embeddings (what a teacher sees). The loss is the chunk's mean.

- ``CrossEntropy``: TAP's recipe, cross-entropy with label smoothing 0.1 (0 for TaskRes's).
- ``OTTERSoftLabels``: OTTER's optimal-transport soft labels (facebookresearch/OTTER), translated to
  (description, class) pairs; below.

OTTER, and how its batch maps onto descriptions
-----------------------------------------------
OTTER trains on a batch of B (image, text) pairs. An EMA copy of the model (the teacher) embeds the
batch, and the plan between images (rows) and texts (columns) comes from the cost
``-(S_image-image + S_text-text + S_image-text)``, with 100 subtracted from the diagonals of both
self-similarities (``--remove_diag``), so the plan puts no mass on an item's own pair and models
only the other pairings; Sinkhorn (eps 0.15, 5 iterations, uniform marginals, row then column
scaling), rows normalised into targets. The loss is ``alpha * InfoNCE + (1 - alpha) * KL(target ||
student)``, alpha 0.5 (the prior that a given pairing is right), no label smoothing.

Here a pair is (description i, its class y_i): the description plays the image, its class the text.
A batch holds many descriptions of each class, so the batch's B "texts" are the classes y_1..y_B,
with repeats. With the teacher's clean features -- the description embedding x_i (the text tower is
frozen, so the teacher and the student share it) and the teacher's class weight w_c, normalised
(an EMA of the adapter's own class weights) -- the three similarities of OTTER's cost become

    S_dd[i, j] = x_i . x_j          (description i resembles description j, which is of class y_j)
    S_tt[i, j] = w_{y_i} . w_{y_j}  (i's class resembles j's class; 1 when they are the same class)
    S_dt[i, j] = x_i . w_{y_j}      (the teacher scores description i as class y_j)

each about "description i belongs to y_j", as OTTER's are about "image i matches text j". The
diagonal i = j is removed as OTTER removes it; other descriptions of the same class stay (OTTER
would treat two identical captions the same way). Column j of the plan is "the class of batch item
j", so a row of the plan becomes a target over classes by adding up its columns class by class:
``target_i(c) = sum_{j: y_j = c} plan[i, j]``. Each class thus receives mass in proportion to its
share of the batch (OTTER's uniform column marginal, seen through the classes). The hard term is the
cross-entropy on y_i over all classes (the classifier's softmax, where OTTER's InfoNCE is over the
batch's texts), and since ``alpha * CE(y) + (1 - alpha) * CE(plan)`` is linear in the target, the
loss is one cross-entropy against ``alpha * one-hot + (1 - alpha) * target`` (OTTER's KL up to the
plan's entropy, which has no gradient).

What differs from OTTER, and why: only the description -> class direction is trained (OTTER adds
the text -> image direction, which here would be a softmax of each class over descriptions: not the
classifier a user applies to images); one logit scale (the classifier's own) serves both terms where
OTTER learns a temperature for each; the teacher sees the clean embeddings while the student sees
TAP's noisy ones (the noise, of norm ~2.3 in 512 dimensions against a unit signal, is TAP's
modality-gap augmentation, and a plan computed on it is noise: the labelled class got 0.134 of the
mass against 0.100 for uniform when textadapt did that).

Batches: OTTER's plan is over its global batch of 512 (64 per GPU x 8 GPUs, ``--global_ot``). TAP's
step is the full batch, and a plan over all descriptions (a million for ImageNet-sized sets) cannot
be held, so the plan is computed over ``block`` = 512 descriptions at a time: the training loop hands
the loss the step's descriptions in a new random order every step (an epoch of OTTER is a new
shuffle), and every run of 512 consecutive ones forms one plan (the last may be shorter). Mini-batch
recipes (TaskRes, batch 256) get one plan per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIAGONAL_PENALTY = 100.0  # OTTER models/model.py: torch.eye * remove_diag * 1e2


def sinkhorn(
    cost: torch.Tensor, eps: float, iters: int, a: torch.Tensor | None = None, b: torch.Tensor | None = None
) -> torch.Tensor:
    """Entropic OT plan for ``cost`` (n, m) with marginals a (n,) and b (m,) (uniform when None).

    Sinkhorn-Knopp with a fixed number of iterations and no early stop, the same updates as POT's
    ``ot.sinkhorn(a, b, cost, reg=eps, numItermax=iters, stopThr=0)``: K = exp(-cost / eps),
    u, v start at 1/n, 1/m; each iteration sets v = b / (K^T u), then u = a / (K v); the plan is
    diag(u) K diag(v), so its rows sum to a exactly and its columns to b approximately. Computed in
    the log domain (the same numbers, without overflow when cost / eps is large).
    """
    n, m = cost.shape
    a = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device) if a is None else a
    b = torch.full((m,), 1.0 / m, dtype=cost.dtype, device=cost.device) if b is None else b
    log_k = -cost / eps
    log_u = torch.full((n,), -torch.log(torch.tensor(float(n))).item(), dtype=cost.dtype, device=cost.device)
    log_v = torch.full((m,), -torch.log(torch.tensor(float(m))).item(), dtype=cost.dtype, device=cost.device)
    log_a, log_b = torch.log(a), torch.log(b)
    for _ in range(iters):
        log_v = log_b - torch.logsumexp(log_k + log_u[:, None], dim=0)
        log_u = log_a - torch.logsumexp(log_k + log_v[None, :], dim=1)
    return torch.exp(log_u[:, None] + log_k + log_v[None, :])


@dataclass
class CrossEntropy:
    label_smoothing: float = 0.1
    name: str = "ce"

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


class EMATeacher:
    """OTTER's EMA teacher (models/ema.py): after update n (counted from 1), every trained parameter's
    shadow moves by (1 - d) towards it, d = min(decay, (1 + n) / (10 + n)) (a warm-up: the first
    updates follow the student closely). The shadow starts as a copy of the student."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay, self.updates = decay, 0
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}

    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in self.shadow:
                    self.shadow[k].sub_((1 - d) * (self.shadow[k] - p.detach()))

    @torch.no_grad()
    def class_weights(self, model: torch.nn.Module) -> torch.Tensor:
        """(classes, dim): the model's class weights (its ``forward()``) with the shadow parameters in place of its own."""
        return torch.func.functional_call(model, self.shadow, ())


class OTTERSoftLabels:
    """OTTER's soft labels for (description, class) pairs; see the module docstring for the mapping."""

    name = "ot"

    def __init__(self, alpha: float = 0.5, eps: float = 0.15, iters: int = 5, block: int = 512, ema_decay: float = 0.999):
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], not {alpha}")
        self.alpha, self.eps, self.iters, self.block, self.ema_decay = alpha, eps, iters, block, ema_decay
        self.ema: EMATeacher | None = None
        self.teacher: torch.Tensor | None = None  # (classes, dim), normalised: the teacher's class features this step
        self._mass: list[torch.Tensor] = []  # per step: (sum, count) of the plan's mass on each description's labelled class

    # The training loop calls start() once with the model, then step() before every optimiser step
    # (OTTER's DistillationModel.forward updates the EMA first, then computes the teacher's features).
    def start(self, model: torch.nn.Module) -> None:
        self.ema = EMATeacher(model, self.ema_decay)

    def step(self, model: torch.nn.Module) -> None:
        self.ema.update(model)
        self.teacher = F.normalize(self.ema.class_weights(model).float(), dim=-1)
        self._mass.append(torch.zeros(2, device=self.teacher.device))

    def labelled_mass(self) -> list[float]:
        """Per step so far: the mean share of a description's plan row that falls on its own labelled class
        (1 / classes for a plan that says nothing; a diagnostic the harness logs)."""
        return [float(m[0] / m[1]) for m in self._mass if m[1] > 0]

    def plan(self, labels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """(b, b): OTTER's row-normalised transport plan for one block of descriptions (rows) and their classes (columns)."""
        x = F.normalize(embeddings.float(), dim=-1)
        w = self.teacher.to(x.device)[labels]
        sims = x @ (x + w).T + w @ w.T  # S_dd + S_dt + S_tt, two products instead of three
        sims.diagonal().sub_(2 * DIAGONAL_PENALTY)  # the diagonals of S_dd and S_tt, as --remove_diag
        cost = -sims
        # OTTER's Sinkhorn scales rows first and columns last; ``sinkhorn`` (POT's order) scales columns
        # first and rows last, so OTTER's plan is ours on the transposed problem, transposed back.
        plan = sinkhorn(cost.T, self.eps, self.iters).T
        return plan / plan.sum(dim=1, keepdim=True)

    @torch.no_grad()
    def class_plan(self, labels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, classes): each description's plan row summed class by class, one plan per ``block`` consecutive descriptions."""
        out = torch.zeros(len(labels), self.teacher.shape[0], device=embeddings.device)
        with torch.autocast(embeddings.device.type, enabled=False):  # float32 plans under mixed precision too
            for s in range(0, len(labels), self.block):
                y = labels[s : s + self.block]
                out[s : s + self.block].index_add_(1, y, self.plan(y, embeddings[s : s + self.block]))
        if self._mass:
            count = torch.tensor(float(len(labels)), device=out.device)
            self._mass[-1] += torch.stack([out.gather(1, labels[:, None]).sum(), count])
        return out

    def targets(self, labels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, classes) soft targets: alpha * one-hot + (1 - alpha) * the plan over classes."""
        one_hot = F.one_hot(labels, self.teacher.shape[0]).float()
        return self.alpha * one_hot + (1 - self.alpha) * self.class_plan(labels, embeddings)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("OTTERSoftLabels: call start(model) and step(model) before the loss (the training loops do)")
        return F.cross_entropy(logits, self.targets(labels, embeddings).to(logits.dtype))
