"""Training losses for the text-side adapters.

Every loss is called as ``loss(logits, labels, embeddings)``: the adapter's logits for a batch of
(noisy) description embeddings, the descriptions' class labels, and the embeddings themselves.

- ``CrossEntropy``: TAP's recipe, cross-entropy with label smoothing 0.1.
- ``OTSoftLabels``: OTTER's idea applied to (description, class) pairs. A generated description
  is a noisy pair: "a small animal with fur" fits several classes. Within the batch, an entropic
  optimal-transport plan between the description embeddings and the class prototypes of a
  teacher says how much of each description belongs to each class; the target is
  ``alpha * one-hot + (1 - alpha) * plan row``, and the loss is
  ``alpha * CE(logits, y) + (1 - alpha) * CE(logits, plan row)`` (the KL of OTTER up to a constant
  that has no gradient). Defaults from OTTER's released script: alpha 0.5, eps 0.15, 5 Sinkhorn
  iterations.

OTTER's teacher is an EMA copy of the model, and its cost adds image-image and text-text
similarities because both sides of its pairs are batch items. Here one side is the fixed class
list, so the cost is the negative cosine similarity between each description and each class
prototype. The teacher is either the frozen zero-shot prototypes (default: they exist before
training, so the soft targets are meaningful from step 0) or an EMA of the adapter's own class
weights (``teacher="ema"``, decay 0.999, which the training loop updates through ``update_ema``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sinkhorn(cost: torch.Tensor, eps: float, iters: int, a: torch.Tensor | None = None,
             b: torch.Tensor | None = None) -> torch.Tensor:
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


class OTSoftLabels:
    """OTTER-style soft labels from an entropic OT plan between descriptions and class prototypes."""

    name = "ot"

    def __init__(self, teacher: torch.Tensor, alpha: float = 0.5, eps: float = 0.15, iters: int = 5,
                 marginal: str = "counts", label_smoothing: float = 0.1, teacher_kind: str = "zero-shot",
                 ema_decay: float = 0.999):
        if marginal not in ("uniform", "counts"):
            raise ValueError(f"marginal must be 'uniform' or 'counts', not {marginal!r}")
        if teacher_kind not in ("zero-shot", "ema"):
            raise ValueError(f"teacher must be 'zero-shot' or 'ema', not {teacher_kind!r}")
        self.teacher = F.normalize(teacher.float(), dim=-1)  # (classes, dim)
        self.alpha, self.eps, self.iters, self.marginal = alpha, eps, iters, marginal
        self.label_smoothing, self.teacher_kind, self.ema_decay = label_smoothing, teacher_kind, ema_decay

    def plan_rows(self, labels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """(batch, classes): each description's row of the OT plan, normalised into a distribution."""
        n_classes = self.teacher.shape[0]
        with torch.no_grad():
            x = F.normalize(embeddings.float(), dim=-1)
            cost = -(x @ self.teacher.to(x.device).T)
            b = None
            if self.marginal == "counts":  # each class's share of the batch; absent classes get a sliver
                counts = torch.bincount(labels, minlength=n_classes).to(cost.dtype) + 1e-3
                b = counts / counts.sum()
            plan = sinkhorn(cost, self.eps, self.iters, b=b)
            return plan / plan.sum(dim=1, keepdim=True)

    def targets(self, labels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """(batch, classes) soft targets: alpha * one-hot + (1 - alpha) * the OT plan's rows."""
        one_hot = F.one_hot(labels, self.teacher.shape[0]).float()
        return self.alpha * one_hot + (1 - self.alpha) * self.plan_rows(labels, embeddings)

    def update_ema(self, weight: torch.Tensor) -> None:
        """After an optimiser step: move an EMA teacher towards the adapter's current class weights."""
        if self.teacher_kind == "ema":
            w = F.normalize(weight.detach().float(), dim=-1).to(self.teacher.device)
            self.teacher = F.normalize(self.ema_decay * self.teacher + (1 - self.ema_decay) * w, dim=-1)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        soft = F.cross_entropy(logits, self.plan_rows(labels, embeddings).to(logits.dtype))
        return self.alpha * hard + (1 - self.alpha) * soft
