"""Prompt learning through the frozen text encoder, from text alone: ``tap-coop`` and ``protext``.

A few learned context vectors ``[V1 .. Vm]`` take the place of the words of an init prompt ("a photo
of a") in the token-embedding sequence of ``"[V1 .. Vm] CLASSNAME."``; the sequence goes through
CLIP's frozen text transformer, and the L2-normalised outputs, one per class, are the classifier.
Only the context vectors get gradients: every parameter of the backbone stays as it was. With
``depth`` d > 1 (ProText's deep prompts, its IVLP text branch), layers 1 .. d-1 of the transformer
each get their own m learned vectors too, which replace the outputs of the previous layer at the
context positions before the layer runs (ProText clip/model.py, ``ResidualAttentionBlock_IVLP``).

Two recipes (the harness's adapters):

- ``tap-coop`` (``PromptRecipe()``): CoOp's shallow unified context (4 vectors from "a photo of a",
  so step 0 is zero-shot CLIP with that prompt), trained with TAP's recipe around it: each description
  embedding, with fresh Gaussian noise N(0, 0.1^2) at every step, is classified against the prompted
  class embeddings (``logits = logit_scale * x @ class_emb.T``), cross-entropy with label smoothing
  0.1 or any ``loss(logits, labels, clean embeddings)`` (e.g. OTTER's soft labels); AdamW lr 2e-3 with
  a cosine to 0 over the steps; full batch. Not CoOp's recipe (SGD on labelled images) nor ProText's.
- ``protext`` (``protext_recipe(dataset)``): ProText's recipe (muzairkhattak/ProText,
  ``trainers/protext.py`` and ``configs/trainers/ProText/text_only_supervised``): the prompted
  "a photo of a {c}." embedding of each description's class is pulled towards the frozen embedding of
  the description by the L1 loss (mean over descriptions and dimensions); deep prompts of depth 9
  (capped at the text tower's depth); no noise; AdamW (weight decay 0.1, betas 0.9/0.98), batches of
  256, Dassl's schedule (5 warm-up epochs at lr 1e-5, then a cosine over the epochs); learning rate,
  epochs and context length from ProText's config for the dataset (``PROTEXT_CONFIGS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from textadapt import TextadaptError
from textadapt.adapters import TrainedHead, dassl_lr, epoch_batches, fit, full_batch
from textadapt.encoders import Backbone
from textadapt.losses import CrossEntropy
from textadapt.text_tower import is_causal_mask

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PromptRecipe:
    """How the context vectors are learned. The defaults are ``tap-coop``'s; ``protext_recipe`` gives ProText's."""

    steps: int = 200  # full-batch steps (TAP's schedule); unused when ``epochs`` is set
    # Context: a unified (shared) context; n_ctx 4 initialised from "a photo of a" (CoOp's initialised
    # variant, ProText's setting for n_ctx <= 4), so at depth 1 step 0 is exactly zero-shot CLIP with
    # that prompt. ctx_init None: n_ctx random N(0, 0.02^2) vectors in "X X .. X CLASSNAME." (CoOp's
    # default, ProText's for n_ctx > 4).
    n_ctx: int = 4
    ctx_init: str | None = "a photo of a"
    depth: int = 1  # layers with learned context: 1 = the input only (CoOp); ProText's deep prompts: 9
    class_specific: bool = False  # CoOp's CSC variant: one context per class
    objective: Literal["classify", "match"] = "classify"
    match_loss: Literal["l1", "l2"] = "l1"  # "match" only; ProText uses L1 (L2: its L_TWO_NORM option)
    optimizer: Literal["adamw"] = "adamw"
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    cosine: bool = True  # full-batch steps: lr follows a cosine from lr to 0 over the steps
    epochs: int | None = None  # set: Dassl's schedule, ``batch_size`` descriptions per step in a new order every epoch
    batch_size: int = 256  # with ``epochs`` only
    warmup_epochs: int = 0  # with ``epochs``: constant warmup_lr first, then a cosine over the epochs
    warmup_lr: float = 1e-5
    noise_std: float = 0.1  # "classify" only; averaged away in "match", so not applied there
    label_smoothing: float = 0.1
    logit_scale: float | None = None  # None: the backbone's own (exp of its learned logit scale)
    seed: int = 7777
    class_chunk: int = 256  # prompts per forward pass; above this, chunks are recomputed in backward
    chunk: int | None = None  # descriptions per chunk of a step (adapters.fit); None: as many as CHUNK_BYTES allows
    amp: bool = True  # bfloat16 autocast through the tower on CUDA (never on CPU)


# ProText's configs/trainers/ProText/text_only_supervised/*.yaml (its setting closest to textadapt's:
# trained on LLM descriptions of the very classes it is tested on): learning rate, epochs, context length.
PROTEXT_CONFIGS = {
    "caltech101": (0.03, 30, 16),
    "dtd": (0.03, 200, 16),
    "eurosat": (0.0025, 300, 4),
    "fgvc-aircraft": (0.03, 200, 4),
    "food101": (0.03, 30, 16),
    "imagenet1k": (0.0025, 200, 16),
    "flowers102": (0.0025, 300, 4),
    "oxford-pets": (0.03, 50, 4),
    "stanford-cars": (0.03, 20, 8),
    "sun397": (0.03, 150, 16),
    "ucf101": (0.0025, 100, 8),
}
# Any other dataset: lr 0.03 (7 of those 11 configs, and ProText's cross-dataset config), 4 context
# vectors from "a photo of a" (its cross-dataset config), 200 epochs (its most frequent count).
PROTEXT_DEFAULT = (0.03, 200, 4)
PROTEXT_DEPTH = 9


def protext_recipe(dataset: str, seed: int = 7777, epochs: int | None = None) -> PromptRecipe:
    """ProText's recipe for ``dataset`` (its config where it has one, else PROTEXT_DEFAULT); ``epochs`` overrides."""
    lr, n_epochs, n_ctx = PROTEXT_CONFIGS.get(dataset, PROTEXT_DEFAULT)
    return PromptRecipe(
        n_ctx=n_ctx,
        ctx_init="a photo of a" if n_ctx <= 4 else None,
        depth=PROTEXT_DEPTH,
        objective="match",
        match_loss="l1",
        lr=lr,
        betas=(0.9, 0.98),
        weight_decay=0.1,
        epochs=epochs or n_epochs,
        batch_size=256,
        warmup_epochs=5,
        warmup_lr=1e-5,
        seed=seed,
    )


@dataclass
class _Tower:
    """The pieces of an open_clip text tower that encode_text runs, in its order."""

    token_embedding: torch.nn.Embedding
    positional_embedding: torch.Tensor
    transformer: torch.nn.Module
    ln_final: torch.nn.Module
    text_projection: torch.nn.Module | torch.Tensor | None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None


def _text_tower(backbone: Backbone) -> _Tower:
    """The standard CLIP text transformer of ``backbone``, or a TextadaptError naming what it has instead."""
    import open_clip
    from open_clip.transformer import TextTransformer

    model = backbone.model
    name = f"backbone {backbone.spec!r} ({type(model).__name__})"
    if isinstance(model, open_clip.CLIP):
        tower = _Tower(
            model.token_embedding,
            model.positional_embedding,
            model.transformer,
            model.ln_final,
            model.text_projection,
            model.attn_mask,
            model.text_pool_type,
            getattr(model, "text_eos_id", None),
        )
    elif isinstance(getattr(model, "text", None), TextTransformer):
        text = model.text
        if text.cls_emb is not None or getattr(text, "use_pad_mask", False):
            raise TextadaptError(
                f"prompt learning does not support the text tower of {name}: it appends a class "
                f"token or masks padding (CoCa-style); use a standard CLIP text tower"
            )
        tower = _Tower(
            text.token_embedding,
            text.positional_embedding,
            text.transformer,
            text.ln_final,
            text.text_projection,
            text.attn_mask,
            text.pool_type,
            getattr(text, "eos_id", None),
        )
    else:
        kind = type(getattr(model, "text", None)).__name__ if hasattr(model, "text") else "none found"
        raise TextadaptError(
            f"prompt learning needs open_clip's own text transformer; {name} has text tower "
            f"{kind} (Hugging Face text towers are not supported); use a standard CLIP backbone"
        )
    if tower.pool_type not in ("argmax", "eos", "last"):
        raise TextadaptError(
            f"prompt learning does not support text pooling {tower.pool_type!r} of {name}: "
            f"the pooled token must come after the context (argmax, eos or last)"
        )
    return tower


class PromptedClasses(torch.nn.Module):
    """The class embeddings of ``"[ctx] CLASSNAME."`` through the frozen tower; the context vectors (``ctx``,
    and ``deep`` for layers 1 .. depth-1) are its only parameters; ``forward()`` gives them all, normalised."""

    def __init__(self, backbone: Backbone, class_names: list[str], recipe: PromptRecipe):
        super().__init__()
        self.tower = _text_tower(backbone)
        tokenizer, device = backbone.tokenizer, backbone.device
        init = recipe.ctx_init if recipe.ctx_init is not None else " ".join(["X"] * recipe.n_ctx)
        empty, prefix_ids = tokenizer([""])[0], tokenizer([init])[0]
        pad = empty[-1]
        # Leading special tokens (CLIP's start-of-text) are those the empty string starts with too.
        start = 0
        while start < len(empty) and empty[start] == prefix_ids[start] and empty[start] != pad:
            start += 1
        n_ctx = int((prefix_ids != pad).sum() - (empty != pad).sum())
        if n_ctx != recipe.n_ctx:
            raise TextadaptError(
                f"ctx_init {recipe.ctx_init!r} is {n_ctx} tokens but n_ctx is {recipe.n_ctx}; "
                f"set n_ctx to {n_ctx} (or ctx_init to None for random context)"
            )
        ids = tokenizer([f"{init} {name}." for name in class_names])
        ctx_ids = prefix_ids[start : start + n_ctx]
        for name, row in zip(class_names, ids):
            if not torch.equal(row[start : start + n_ctx], ctx_ids):
                raise TextadaptError(
                    f"class name {name!r}: the tokenizer merges it with the context {init!r}; "
                    f"cannot place the context tokens in front of it"
                )
        ids = ids.to(device)
        # With a causal mask, tokens after the pooled one do not change it: cut the padding off, for all classes
        # here and, per chunk of classes, down to the chunk's own longest prompt (``_encode``; the same length-aware
        # idea as textadapt.text_tower, which cannot take the deep prompts inserted between layers).
        self.lengths = torch.full((len(ids),), ids.shape[1], dtype=torch.long)
        if is_causal_mask(self.tower.attn_mask) and self.tower.pool_type in ("argmax", "eos"):
            if self.tower.pool_type == "argmax":
                pooled_at = ids.argmax(dim=-1)
            else:
                pooled_at = (ids == self.tower.eos_id).int().argmax(dim=-1)
            self.lengths = pooled_at + 1
        length = int(self.lengths.max())
        self.lengths = self.lengths.to(device)
        self.ids = ids[:, :length]
        self.mask = self.tower.attn_mask[:length, :length] if self.tower.attn_mask is not None else None
        self.start, self.n_ctx = start, n_ctx
        self.depth = max(1, min(recipe.depth, len(self.tower.transformer.resblocks)))
        with torch.no_grad():
            emb = self.tower.token_embedding(self.ids).float()
            self.prefix = emb[:, :start]  # start-of-text
            self.suffix = emb[:, start + n_ctx :]  # class name, period, end-of-text, (padding)
            width = self.prefix.shape[-1]
            shape = ((len(class_names),) if recipe.class_specific else ()) + (n_ctx, width)
            if recipe.ctx_init is not None:
                ctx = self.tower.token_embedding(prefix_ids[start : start + n_ctx].to(device)).float().expand(shape)
            else:  # independent per class in the class-specific case, as CoOp's CSC
                ctx = torch.randn(shape, generator=torch.Generator().manual_seed(recipe.seed)) * 0.02
            # ProText's deeper layers start from N(0, 0.02^2) (nn.init.normal_ in ResidualAttentionBlock_IVLP)
            deep = torch.randn((self.depth - 1, n_ctx, width), generator=torch.Generator().manual_seed(recipe.seed + 1)) * 0.02
        self.ctx = torch.nn.Parameter(ctx.clone().to(device))
        self.deep = torch.nn.Parameter(deep.to(device)) if self.depth > 1 else None
        self.chunk = max(1, recipe.class_chunk)
        self.autocast = device.type == "cuda" and recipe.amp

    def _layers(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The transformer's blocks on (B, L, W); before block i in 1 .. depth-1, the context positions get ``deep[i - 1]``."""
        transformer = self.tower.transformer
        if self.deep is None:
            return transformer(x, attn_mask=mask)
        first = getattr(transformer, "batch_first", True)
        seq = 1 if first else 0
        x = x if first else x.transpose(0, 1)
        a, b = self.start, self.start + self.n_ctx
        for i, block in enumerate(transformer.resblocks):
            if 0 < i < self.depth:
                deep = self.deep[i - 1].to(x.dtype)
                deep = deep.unsqueeze(0).expand(x.shape[0], -1, -1) if first else deep.unsqueeze(1).expand(-1, x.shape[1], -1)
                x = torch.cat([x.narrow(seq, 0, a), deep, x.narrow(seq, b, x.shape[seq] - b)], dim=seq)
            x = block(x, attn_mask=mask)
        return x if first else x.transpose(0, 1)

    def _encode(self, idx: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        tower = self.tower
        cast = tower.transformer.get_cast_dtype()
        ctx = self.ctx[idx] if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(len(idx), -1, -1)
        length = int(self.lengths[idx].max())  # the longest prompt of these classes: the rest is padding they never see
        x = torch.cat([self.prefix[idx], ctx, self.suffix[idx]], dim=1)[:, :length].to(cast)
        x = x + tower.positional_embedding[:length].to(cast)
        x = self._layers(x, None if self.mask is None else self.mask[:length, :length])
        x = tower.ln_final(x)
        x = text_global_pool(x, self.ids[idx, :length], tower.pool_type, eos_token_id=tower.eos_id)
        if tower.text_projection is not None:
            x = tower.text_projection(x) if isinstance(tower.text_projection, torch.nn.Module) else x @ tower.text_projection
        return F.normalize(x.float(), dim=-1)

    def forward(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """(C, D) L2-normalised class embeddings (of ``classes`` only, if given); above ``class_chunk`` classes,
        activations are recomputed per chunk in backward."""
        every = torch.arange(len(self.ids), device=self.ids.device) if classes is None else classes.to(self.ids.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            if len(every) <= self.chunk:
                return self._encode(every)
            # Chunks of classes with prompts of similar length, each cut to its own longest; then the given order back.
            order = torch.argsort(self.lengths[every], descending=True, stable=True)
            parts = []
            for s in range(0, len(every), self.chunk):
                idx = every[order[s : s + self.chunk]]
                parts.append(checkpoint(self._encode, idx, use_reentrant=False) if torch.is_grad_enabled() else self._encode(idx))
            return torch.cat(parts)[torch.argsort(order)]


def _check(
    backbone: Backbone,
    embeddings: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    recipe: PromptRecipe,
    loss: Loss | None,
) -> None:
    if len(class_names) == 0:
        raise TextadaptError("prompt learning: no class names")
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise TextadaptError(f"prompt learning: no training descriptions (embeddings of shape {embeddings.shape})")
    if backbone.embed_dim and embeddings.shape[1] != backbone.embed_dim:
        raise TextadaptError(
            f"prompt learning: description embeddings have dimension {embeddings.shape[1]}, "
            f"backbone {backbone.spec!r} embeds in {backbone.embed_dim}"
        )
    if labels.shape != (len(embeddings),):
        raise TextadaptError(f"prompt learning: {len(embeddings)} embeddings but labels of shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise TextadaptError(f"prompt learning: labels must be in [0, {len(class_names)}), got {labels.min()}..{labels.max()}")
    if recipe.steps < 0:
        raise TextadaptError(f"prompt learning: steps must be >= 0, got {recipe.steps}")
    if recipe.objective not in ("classify", "match"):
        raise TextadaptError(f"prompt learning: objective must be 'classify' or 'match', got {recipe.objective!r}")
    if recipe.match_loss not in ("l1", "l2"):
        raise TextadaptError(f"prompt learning: match_loss must be 'l1' or 'l2', got {recipe.match_loss!r}")
    if recipe.objective == "match" and loss is not None:
        raise TextadaptError("prompt learning: a custom loss applies to objective 'classify' only; 'match' uses match_loss")
    if recipe.batch_size < 1:
        raise TextadaptError(f"prompt learning: batch_size must be >= 1, got {recipe.batch_size}")
    if recipe.epochs is not None and recipe.epochs < 0:
        raise TextadaptError(f"prompt learning: epochs must be >= 0 or None, got {recipe.epochs}")


def train_prompt_learner(
    backbone: Backbone,
    embeddings: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    recipe: PromptRecipe,
    loss: Loss | None = None,
) -> TrainedHead:
    """Learn the context vectors on (N, D) L2-normalised description embeddings with labels in
    [0, len(class_names)); return the final L2-normalised class embeddings as the classifier.

    ``loss(logits (B, C), labels (B,), clean embeddings (B, D))`` replaces the default cross-entropy
    with label smoothing for objective "classify" (the logits are computed on the noisy embeddings).
    """
    embeddings, labels = np.asarray(embeddings), np.asarray(labels)
    _check(backbone, embeddings, labels, class_names, recipe, loss)
    device = backbone.device
    state = {k: v for k, v in backbone.model.named_parameters()}
    was_grad = {k: p.requires_grad for k, p in state.items()}
    backbone.model.requires_grad_(False)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(recipe.seed)
            prompts = PromptedClasses(backbone, class_names, recipe)
            x = torch.as_tensor(embeddings, dtype=torch.float32, device=device)
            y = torch.as_tensor(labels, dtype=torch.long, device=device)
            scale = (
                recipe.logit_scale if recipe.logit_scale is not None else float(backbone.model.logit_scale.exp().clamp(max=100))
            )
            opt = torch.optim.AdamW(prompts.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
            if recipe.epochs is not None:
                lr = lambda epoch: dassl_lr(epoch, recipe.lr, recipe.epochs, recipe.warmup_epochs, recipe.warmup_lr)  # noqa: E731
                schedule = epoch_batches(len(x), recipe.batch_size, recipe.epochs, lr, recipe.seed)
            elif recipe.cosine:
                schedule = (
                    (0.5 * recipe.lr * (1 + math.cos(math.pi * step / recipe.steps)), None) for step in range(recipe.steps)
                )
            else:
                schedule = full_batch(recipe.steps)
            if recipe.objective == "classify":
                losses, seconds = fit(
                    prompts,
                    x,
                    y,
                    loss or CrossEntropy(recipe.label_smoothing),
                    opt,
                    schedule,
                    noise_std=recipe.noise_std,
                    seed=recipe.seed,
                    chunk=recipe.chunk,
                    scale=scale,
                )
            else:
                match = F.l1_loss if recipe.match_loss == "l1" else F.mse_loss
                losses, seconds = fit(
                    prompts,
                    x,
                    y,
                    None,
                    opt,
                    schedule,
                    seed=recipe.seed,
                    chunk=recipe.chunk,
                    batch_classes=True,
                    objective=lambda w, noisy, yb, clean: match(w[yb], clean),
                )
            with torch.no_grad():
                weight = prompts().float().cpu().numpy()
    finally:
        for k, p in state.items():
            p.requires_grad_(was_grad[k])
    return TrainedHead(weight, losses, seconds, str(device), recipe.seed)
