"""OTTER's soft labels (textadapt.losses.OTTERSoftLabels), checked against OTTER's own code and on a
synthetic world whose ambiguous descriptions are known.

Reference: facebookresearch/OTTER at 605d317 (the same files as 31ba0a5, "Commit before releasing"):
``models/model_util.py`` (sinkhorn, lines 14-46), ``models/model.py`` (ImageTextModel.compute_sims,
lines 119-139; DistillationModel.compute_dist_loss, lines 232-281; DistillationModel.forward,
lines 287-308), ``models/ema.py`` (ExponentialMovingAverage.update, lines 31-48),
``loss/contrastive_loss.py`` (HardContrastiveLoss, lines 33-46), ``loss/kl_div_loss.py`` (lines 10-27),
``launch_scripts/train_OTTER.sh`` (alpha 0.5, sinkhorn_lambda 0.15, sinkhorn_iter 5, --remove_diag).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from textadapt.adapters import TapRecipe, _Linear, train_adapter
from textadapt.losses import OTTERSoftLabels


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# OTTER's computation, re-implemented from its code (cited above), in its own terms: a batch of
# B (image, text) pairs, image i matching text i.


def otter_sinkhorn(cost_mat, eps, niter):
    """models/model_util.py:14-46 without marginals: Q = exp(-C / eps) normalised to sum 1, then
    niter times: rows scaled to 1/M, columns scaled to 1/N."""
    q = torch.exp(-cost_mat / eps)
    q = q / q.sum(dim=[-2, -1], keepdim=True)
    m, n = q.shape
    for _ in range(niter):
        q = q / q.sum(dim=-1, keepdim=True) * (1 / m)
        q = q / q.sum(dim=-2, keepdim=True) * (1 / n)
    return q


def otter_image_targets(img_emb, txt_emb, eps=0.15, niter=5, remove_diag=True):
    """model.py:119-139 (vv, tt, vt similarities of normalised features) and 232-264 (the image-side cost
    with 1e2 taken off both self-similarity diagonals, Sinkhorn, rows normalised into targets)."""
    vt_sim, vv_sim, tt_sim = img_emb @ txt_emb.T, img_emb @ img_emb.T, txt_emb @ txt_emb.T
    diag = torch.eye(*vv_sim.shape) * float(remove_diag) * 1e2
    img_cost_mat = -((vv_sim - diag) + (tt_sim - diag) + vt_sim)
    target = otter_sinkhorn(img_cost_mat, eps, niter)
    return target / target.sum(dim=1, keepdim=True)


class OtterEMA:
    """models/ema.py:13-48: shadow = copy of the student; update n: decay = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, params, decay=0.999):
        self.decay, self.num_updates = decay, 0
        self.shadow = [p.clone().detach() for p in params]

    def update(self, params):
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, params):
            s.sub_((1.0 - decay) * (s - p))


def otter_image_loss(img_logits, target, alpha):
    """The image side of DistillationModel.forward (model.py:287-308) with both learned temperatures at
    exp(T) = 1: alpha * InfoNCE (contrastive_loss.py:38-46, labels = arange) + (1 - alpha) * KL(target ||
    student) (kl_div_loss.py:20-27, KLDivLoss batchmean)."""
    info_nce = F.cross_entropy(img_logits, torch.arange(len(img_logits)))
    kl = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(img_logits, dim=1), target)
    return alpha * info_nce + (1 - alpha) * kl


# ---------------------------------------------------------------------------------------------


def world(seed, n_classes=8, dim=64, per_class=30, ambiguous=6, class_spread=0.5, noise=0.35):
    """CLIP-like geometry: class directions share a common component (pairwise cosine ~0.8, as CLIP's class
    prompts do); a class's clear descriptions lie near its direction, its ambiguous ones halfway between it
    and the next class. Returns descriptions, labels, the class each ambiguous one leans to (-1: clear), classes."""
    rng = np.random.default_rng(seed)
    u = unit(unit(rng.normal(size=dim)) + class_spread * unit(rng.normal(size=(n_classes, dim))))
    x, y, leans = [], [], []
    for c in range(n_classes):
        for k in range(per_class):
            other = (c + 1) % n_classes if k >= per_class - ambiguous else -1
            centre = u[c] if other < 0 else unit(u[c] + u[other])
            x.append(unit(centre + noise * unit(rng.normal(size=dim))))
            y.append(c)
            leans.append(other)
    return (
        torch.tensor(np.array(x), dtype=torch.float32),
        torch.tensor(y),
        np.array(leans),
        torch.tensor(u, dtype=torch.float32),
    )


def teacher_at(classes, scale=100.0):
    """A linear head whose class weights are ``classes`` (times a logit scale), as zs-head starts."""
    return _Linear(classes.shape[1], len(classes), scale * classes, torch.device("cpu"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_plan_keeps_clear_descriptions_and_spreads_ambiguous_ones(seed):
    x, y, leans, classes = world(seed)
    loss = OTTERSoftLabels()
    loss.start(teacher_at(classes))
    loss.step(teacher_at(classes))
    plan = loss.class_plan(y, x).numpy()
    assert np.allclose(plan.sum(axis=1), 1, atol=1e-5)
    yy, clear, amb = y.numpy(), leans < 0, leans >= 0
    own = plan[np.arange(len(yy)), yy]
    assert own[clear].mean() > 0.75 and np.median(own[clear]) > 0.75  # most of a clear description's mass: its class
    assert own[amb].mean() < own[clear].mean() - 0.15  # an ambiguous one keeps less of it...
    towards = plan[amb, leans[amb]]
    rest = plan[amb].copy()
    rest[np.arange(amb.sum()), yy[amb]] = rest[np.arange(amb.sum()), leans[amb]] = 0
    assert (towards > rest.max(axis=1)).mean() >= 0.8  # ... and gives the class it leans to more than any other
    assert towards.mean() > 1.5 * rest.max(axis=1).mean()
    next_class = (yy + 1) % len(classes)
    assert towards.mean() > 2 * plan[clear, next_class[clear]].mean()  # far more than a clear description gives that class
    assert own.mean() > 2 / len(classes)  # far from a uniform plan (1/8), unlike a plan computed on noisy embeddings


@pytest.mark.parametrize("block", [512, 40])
def test_targets_and_teacher_agree_with_otters_code(block):
    """The same student weights over 4 steps: OTTER's EMA (ema.py) and image-side targets (model.py,
    model_util.py) on the batch's (description, class-weight) pairs, summed over the columns of each class,
    equal textadapt's targets; with a smaller plan block, each block is its own OTTER batch."""
    x, y, _, classes = world(3, per_class=15)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_classes = len(classes)
    student = teacher_at(classes)
    ours = OTTERSoftLabels(alpha=0.5, eps=0.15, iters=5, block=block)
    ours.start(student)
    ema = OtterEMA([student.layer.weight])
    rng = torch.Generator().manual_seed(1)
    for step in range(4):
        if step:
            with torch.no_grad():  # the optimiser's step, whatever it was
                student.layer.weight.add_(torch.randn(student.layer.weight.shape, generator=rng) * 20)
        ema.update([student.layer.weight])
        ours.step(student)
        teacher_classes = F.normalize(ema.shadow[0], dim=-1)
        expected = torch.zeros(len(y), n_classes)
        for s in range(0, len(y), block):
            yb = y[s : s + block]
            otter = otter_image_targets(x[s : s + block], teacher_classes[yb])  # column j: the text of pair j, i.e. y_j
            expected[s : s + block] = otter @ F.one_hot(yb, n_classes).float()  # columns summed class by class
        assert torch.allclose(ours.teacher, teacher_classes, atol=1e-6)
        assert torch.allclose(ours.class_plan(y, x), expected, atol=1e-5)
        assert torch.allclose(ours.targets(y, x), 0.5 * F.one_hot(y, n_classes) + 0.5 * expected, atol=1e-5)
    # OTTER's warm-up decays: 2/11, 3/12, 4/13, 5/14; without the warm-up (0.999) the teacher would still be the init
    assert not torch.allclose(ours.teacher, F.normalize(classes, dim=-1), atol=1e-2)


def test_loss_equals_otters_when_every_class_is_one_pair():
    """With one description per class, OTTER's batch columns are the classes themselves: its image-side
    loss (alpha InfoNCE + (1 - alpha) KL, temperatures 1) equals textadapt's loss up to (1 - alpha) times
    the plan's entropy (constant in the logits: the gradients are the same)."""
    x, y, _, classes = world(4, n_classes=12, per_class=1, ambiguous=0)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    x, y = x[order], y[order]
    loss = OTTERSoftLabels(alpha=0.5)
    loss.start(teacher_at(classes))
    loss.step(teacher_at(classes))
    logits = torch.randn(12, 12, generator=torch.Generator().manual_seed(3), requires_grad=True)  # (description, class)
    ours = loss(logits, y, x)
    img_logits = logits[:, y]  # OTTER's: image i against the text of pair j (the class y_j)
    target = otter_image_targets(x, F.normalize(classes, dim=-1)[y])
    theirs = otter_image_loss(img_logits, target, alpha=0.5)
    entropy = -(target * torch.log(target.clamp_min(1e-30))).sum(dim=1).mean()
    assert torch.allclose(ours, theirs + 0.5 * entropy, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_theirs,) = torch.autograd.grad(otter_image_loss(logits[:, y], target, 0.5), logits)
    assert torch.allclose(g_ours, g_theirs, atol=1e-6)


def test_the_hard_term_has_no_label_smoothing():
    """alpha = 1: the target is the one-hot label alone, so the loss is plain cross-entropy (OTTER's
    --label_smoothing 0.0), not TAP's smoothed one."""
    x, y, _, classes = world(5)
    loss = OTTERSoftLabels(alpha=1.0)
    loss.start(teacher_at(classes))
    loss.step(teacher_at(classes))
    logits = torch.randn(len(y), len(classes), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(loss(logits, y, x), F.cross_entropy(logits, y), atol=1e-6)


def test_the_training_loop_feeds_otter_clean_embeddings_and_an_ema_teacher():
    """Through train_adapter: the loss sees the clean embeddings (the noise is on the logits' input only),
    the plan says something (labelled-class mass far above 1/classes), and the teacher trails the student."""
    x, y, _, classes = world(6)
    seen = []

    class Spy(OTTERSoftLabels):
        def __call__(self, logits, labels, embeddings):
            seen.append(embeddings.clone())
            return super().__call__(logits, labels, embeddings)

    loss = Spy()
    head = train_adapter("tap-head", x.numpy(), y.numpy(), len(classes), TapRecipe(steps=30), loss=loss)
    rows = (seen[0] @ x.T).argmax(dim=1)
    assert torch.equal(torch.sort(rows).values, torch.arange(len(x)))  # every description once, in a shuffled order ...
    assert torch.equal(seen[0], x[rows])  # ... and noise-free
    mass = loss.labelled_mass()
    assert len(mass) == 30 and min(mass) > 2 / len(classes)
    student = F.normalize(torch.as_tensor(head.weight), dim=-1)
    cos = (loss.teacher * student).sum(dim=1)
    assert cos.max() < 0.9999 and cos.min() > 0.95, cos  # the EMA teacher lags the student, but follows it
