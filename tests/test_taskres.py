"""``taskres``: TaskRes's recipe, checked against TaskRes's own computation re-implemented from its code.

Reference: geekyutao/TaskRes at 5195359 (``trainers/taskres.py``: TextEncoder lines 68-88,
TaskResLearner lines 91-101, ``_get_base_text_features`` lines 118-142, CustomCLIP.forward lines
198-217, TaskRes.forward_backward lines 270-295; ``configs/trainers/TaskRes/adam_lr2e-3_B256_ep200.yaml``;
``train_regular.sh`` for alpha per dataset) and the Dassl it runs on (KaiyangZhou/Dassl.pytorch at
c61a1b5: ``dassl/optim/optimizer.py`` lines 88-94 (torch.optim.Adam, weight decay 5e-4 from
``dassl/config/defaults.py``), ``dassl/optim/lr_scheduler.py`` (ConstantWarmupScheduler around
CosineAnnealingLR), ``dassl/data/data_manager.py`` line 43 (drop_last)).
"""

import numpy as np
import torch
import torch.nn.functional as F

from textadapt.adapters import TaskResRecipe, _Residual, taskres_base, taskres_recipe, taskres_templates, train_adapter
from textadapt.scoring import predict

NAMES = ["t-shirt", "trouser", "pullover", "dress", "ankle boot", "sandal"]


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def taskres_text_encoder(model, tokens):
    """TaskRes's TextEncoder.forward (taskres.py:77-88) on an open_clip CLIP: token embeddings + positional
    embedding, the transformer, ln_final, the end-of-text token's features @ text_projection; no normalisation."""
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


@torch.no_grad()
def taskres_base_reference(backbone, class_names, templates):
    """_get_base_text_features (taskres.py:118-142): per class, its templates encoded, stacked, mean over templates."""
    per_class = [taskres_text_encoder(backbone.model, backbone.tokenizer([t.format(c) for t in templates])) for c in class_names]
    return torch.stack(per_class).mean(1)


def taskres_logits(image_features, base, residual, alpha, logit_scale):
    """TaskResLearner.forward (t + alpha * x) and CustomCLIP.forward (both sides normalised, times exp(logit_scale))."""
    text_features = base + alpha * residual
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return logit_scale.exp() * image_features @ text_features.t()


class DasslConstantWarmup(torch.optim.lr_scheduler.LRScheduler):
    """dassl/optim/lr_scheduler.py: _BaseWarmupScheduler.step and ConstantWarmupScheduler.get_lr, as written there."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)


def test_base_is_taskres_raw_template_features(tiny_backbone):
    for dataset in ("dtd", "imagenet1k", "fashion-mnist"):
        templates = taskres_templates(dataset)
        ours = taskres_base(tiny_backbone, NAMES, templates)
        theirs = taskres_base_reference(tiny_backbone, NAMES, templates).numpy()
        np.testing.assert_allclose(ours, theirs, atol=2e-5)
        assert np.linalg.norm(ours, axis=1).std() > 0  # raw: not normalised
    assert len(taskres_templates("imagenet1k")) == 8 and taskres_templates("dtd") == ["{} texture."]
    assert taskres_templates("fashion-mnist") == ["a photo of a {}."]


def test_logits_agree_with_taskres(tiny_backbone):
    """Same image features, base, residual and alpha: TaskRes's logits equal textadapt's (image embeddings are
    L2-normalised before they reach a classifier in textadapt: logits = v @ W.T)."""
    rng = np.random.default_rng(0)
    base = torch.as_tensor(taskres_base(tiny_backbone, NAMES, taskres_templates("dtd")))
    residual = torch.as_tensor(rng.normal(scale=0.3, size=base.shape), dtype=torch.float32)
    images = torch.as_tensor(rng.normal(size=(50, base.shape[1])), dtype=torch.float32)
    logit_scale = tiny_backbone.model.logit_scale.detach()
    for alpha in (0.5, 1.0):
        ours = _Residual(base, logit_scale.exp().item(), alpha)
        with torch.no_grad():
            ours.residual.copy_(residual)
            weight = ours()
        theirs = taskres_logits(images, base, residual, alpha, logit_scale)
        torch.testing.assert_close(F.normalize(images, dim=-1) @ weight.T, theirs, atol=1e-4, rtol=1e-5)


def test_training_agrees_with_taskres_loop():
    """TaskRes's loop re-implemented (Adam with Dassl's weight decay, the constant warm-up epoch then the cosine
    stepped at the end of every epoch, cross-entropy without smoothing, the last short batch dropped) on the same
    batches gives the same classifier as train_adapter("taskres")."""
    rng = np.random.default_rng(1)
    n_classes, dim, n = 5, 32, 600  # two batches of 256 per epoch; the last 88 descriptions are dropped, as Dassl drops them
    base = rng.normal(size=(n_classes, dim)).astype(np.float32) * 0.2  # raw features: not unit length
    labels = rng.integers(0, n_classes, n)
    centres = rng.normal(size=(n_classes, dim))  # the descriptions disagree with the base: there is something to learn
    x = unit(centres[labels] + rng.normal(scale=0.5, size=(n, dim))).astype(np.float32)
    recipe = TaskResRecipe(epochs=20, seed=3)
    head = train_adapter("taskres", x, labels, n_classes, recipe, base, logit_scale=100.0)

    residual = torch.nn.Parameter(torch.zeros(n_classes, dim))
    optim = torch.optim.Adam([residual], lr=2e-3, weight_decay=5e-4, betas=(0.9, 0.999))
    sched = DasslConstantWarmup(optim, torch.optim.lr_scheduler.CosineAnnealingLR(optim, float(20)), 1, 1e-5)
    order = torch.Generator().manual_seed(3)  # the batches: a new permutation each epoch (Dassl's RandomSampler)
    xt, yt, bt, logit_scale = torch.as_tensor(x), torch.as_tensor(labels), torch.as_tensor(base), torch.tensor(100.0).log()
    for _epoch in range(20):
        perm = torch.randperm(n, generator=order)
        batches = [perm[s : s + 256] for s in range(0, n - n % 256, 256)]
        for batch_idx, idx in enumerate(batches):
            loss = F.cross_entropy(taskres_logits(xt[idx], bt, residual, 0.5, logit_scale), yt[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
            if batch_idx + 1 == len(batches):
                sched.step()  # update_lr at the last batch of the epoch
    with torch.no_grad():
        theirs = 100.0 * F.normalize(bt + 0.5 * residual, dim=-1)
    np.testing.assert_allclose(head.weight, theirs.numpy(), atol=1e-3)  # betas 0.99 or no warm-up: off by > 0.01
    assert np.abs(head.weight - 100.0 * unit(base)).max() > 1  # it did train


def test_recipe_per_dataset_and_step_zero_is_its_zero_shot(tiny_backbone):
    assert (taskres_recipe("flowers102").alpha, taskres_recipe("flowers102").lr) == (1.0, 2e-3)
    assert (taskres_recipe("imagenet1k").alpha, taskres_recipe("imagenet1k").lr) == (0.5, 2e-4)
    assert (taskres_recipe("dtd").alpha, taskres_recipe("dtd").lr, taskres_recipe("dtd").epochs) == (0.5, 2e-3, 200)
    base = taskres_base(tiny_backbone, NAMES, taskres_templates("dtd"))
    rng = np.random.default_rng(2)
    images = unit(rng.normal(size=(100, base.shape[1]))).astype(np.float32)
    text = unit(rng.normal(size=(30, base.shape[1]))).astype(np.float32)
    head = train_adapter("taskres", text, np.arange(30) % 6, 6, TaskResRecipe(epochs=0), base, logit_scale=100.0)
    np.testing.assert_allclose(head.weight, 100 * unit(base), atol=1e-4)
    with torch.no_grad():
        tokens = tiny_backbone.tokenizer([f"{c} texture." for c in NAMES])
        zero_shot = tiny_backbone.model.encode_text(tokens, normalize=True).numpy()
    assert np.array_equal(predict(images, head.weight), predict(images, zero_shot))
