"""Prompt learning through the frozen text encoder (CoOp / ProText style), from text alone.

A few learned context vectors ``[V1 .. Vm]`` take the place of the words of an init prompt ("a photo
of a") in the token-embedding sequence of ``"[V1 .. Vm] CLASSNAME."``; the sequence goes through
CLIP's frozen text transformer, and the L2-normalised outputs, one per class, are the classifier.
Only the context vectors get gradients: every parameter of the backbone stays as it was.

Two objectives (``PromptRecipe.objective``):

- ``"classify"`` (default): CoOp's objective with the LLM descriptions in place of images, and TAP's
  recipe around it. Each description embedding, with fresh Gaussian noise N(0, noise_std^2) at every
  step (TAP's modality-gap noise, not renormalised), is classified against the prompted class
  embeddings with ``logits = logit_scale * x @ class_emb.T`` and cross-entropy with label smoothing
  0.1, or any ``loss(logits, labels, embeddings)`` the caller passes (e.g. OTTER soft labels). It is
  the default because it is discriminative (it moves the classes apart where their descriptions
  overlap) and shares its loss with every other adapter of the harness.
- ``"match"``: ProText's objective (its reference trainer): each prompted class embedding is pulled
  towards the embeddings of that class's descriptions, L1 (ProText's default) or L2 (mean squared
  error) over (description, class) pairs. Other classes play no part, so with L2 the optimum is the
  class's mean description direction: close to CuPL's averaged-description classifier.

What differs from the papers: CoOp trains on labelled images with SGD (lr 2e-3, cosine); here the
training data are text embeddings only, and AdamW (lr 2e-3, cosine to 0, no warm-up) is used;
ProText uses AdamW with a cosine too (lr 0.0025 to 0.03, weight decay 0.1, 5 warm-up epochs).
ProText also learns "deep" prompts in the first layers of the text transformer; here the context
is shallow (input tokens only, as CoOp). n_ctx 4 from "a photo of a" is ProText's cross-dataset
setting; CoOp's default and ProText's per-dataset settings use 16 random vectors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, text_global_pool
from torch.utils.checkpoint import checkpoint

from textadapt import TextadaptError
from textadapt.adapters import TrainedHead
from textadapt.encoders import Backbone

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PromptRecipe:
    """How the context vectors are learned. Defaults: see the module docstring and README."""

    steps: int = 200
    # Context: CoOp's unified (shared) context; n_ctx 4 initialised from "a photo of a" (CoOp's
    # initialised variant, ProText's cross-dataset setting), so step 0 is exactly zero-shot CLIP with
    # that prompt. ctx_init None: n_ctx random N(0, 0.02^2) vectors (CoOp's default, with n_ctx 16).
    n_ctx: int = 4
    ctx_init: str | None = "a photo of a"
    class_specific: bool = False  # CoOp's CSC variant: one context per class
    objective: Literal["classify", "match"] = "classify"
    match_loss: Literal["l1", "l2"] = "l1"  # "match" only; ProText uses L1
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    cosine: bool = True  # lr follows a cosine from lr to 0 over the steps (CoOp, ProText)
    batch_size: int | None = None  # descriptions per step; None: all of them (TAP's full batch)
    noise_std: float = 0.1  # "classify" only; averaged away in "match", so not applied there
    label_smoothing: float = 0.1
    logit_scale: float | None = None  # None: the backbone's own (exp of its learned logit scale)
    seed: int = 7777
    class_chunk: int = 256  # prompts per forward pass; above this, chunks are recomputed in backward
    amp: bool = True  # bfloat16 autocast through the tower on CUDA (never on CPU)


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
    model = backbone.model
    name = f"backbone {backbone.spec!r} ({type(model).__name__})"
    if isinstance(model, open_clip.CLIP):
        tower = _Tower(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                       model.text_projection, model.attn_mask, model.text_pool_type, getattr(model, "text_eos_id", None))
    elif isinstance(getattr(model, "text", None), TextTransformer):
        text = model.text
        if text.cls_emb is not None or getattr(text, "use_pad_mask", False):
            raise TextadaptError(f"prompt learning does not support the text tower of {name}: it appends a class "
                                 f"token or masks padding (CoCa-style); use a standard CLIP text tower")
        tower = _Tower(text.token_embedding, text.positional_embedding, text.transformer, text.ln_final,
                       text.text_projection, text.attn_mask, text.pool_type, getattr(text, "eos_id", None))
    else:
        kind = type(getattr(model, "text", None)).__name__ if hasattr(model, "text") else "none found"
        raise TextadaptError(f"prompt learning needs open_clip's own text transformer; {name} has text tower "
                             f"{kind} (Hugging Face text towers are not supported); use a standard CLIP backbone")
    if tower.pool_type not in ("argmax", "eos", "last"):
        raise TextadaptError(f"prompt learning does not support text pooling {tower.pool_type!r} of {name}: "
                             f"the pooled token must come after the context (argmax, eos or last)")
    return tower


def _is_causal(mask: torch.Tensor | None) -> bool:
    if mask is None or mask.dim() != 2:
        return False
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.equal(torch.isneginf(mask), upper) and torch.all(mask[~upper] == 0))


class PromptedClasses(torch.nn.Module):
    """The class embeddings of ``"[ctx] CLASSNAME."`` through the frozen tower; ``ctx`` is the only parameter."""

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
            raise TextadaptError(f"ctx_init {recipe.ctx_init!r} is {n_ctx} tokens but n_ctx is {recipe.n_ctx}; "
                                 f"set n_ctx to {n_ctx} (or ctx_init to None for random context)")
        ids = tokenizer([f"{init} {name}." for name in class_names])
        ctx_ids = prefix_ids[start : start + n_ctx]
        for name, row in zip(class_names, ids):
            if not torch.equal(row[start : start + n_ctx], ctx_ids):
                raise TextadaptError(f"class name {name!r}: the tokenizer merges it with the context {init!r}; "
                                     f"cannot place the context tokens in front of it")
        ids = ids.to(device)
        # With a causal mask, tokens after the pooled one do not change it: cut the padding off.
        length = ids.shape[1]
        if _is_causal(self.tower.attn_mask) and self.tower.pool_type in ("argmax", "eos"):
            if self.tower.pool_type == "argmax":
                pooled_at = ids.argmax(dim=-1)
            else:
                pooled_at = (ids == self.tower.eos_id).int().argmax(dim=-1)
            length = int(pooled_at.max()) + 1
        self.ids = ids[:, :length]
        self.mask = self.tower.attn_mask[:length, :length] if self.tower.attn_mask is not None else None
        with torch.no_grad():
            emb = self.tower.token_embedding(self.ids).float()
            self.prefix = emb[:, :start]  # start-of-text
            self.suffix = emb[:, start + n_ctx :]  # class name, period, end-of-text, (padding)
            shape = ((len(class_names),) if recipe.class_specific else ()) + (n_ctx, self.prefix.shape[-1])
            if recipe.ctx_init is not None:
                ctx = self.tower.token_embedding(prefix_ids[start : start + n_ctx].to(device)).float().expand(shape)
            else:  # independent per class in the class-specific case, as CoOp's CSC
                ctx = torch.randn(shape, generator=torch.Generator().manual_seed(recipe.seed)) * 0.02
        self.ctx = torch.nn.Parameter(ctx.clone().to(device))
        self.chunk = max(1, recipe.class_chunk)

    def _encode(self, idx: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        cast = tower.transformer.get_cast_dtype()
        ctx = self.ctx[idx] if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(len(idx), -1, -1)
        x = torch.cat([self.prefix[idx], ctx, self.suffix[idx]], dim=1).to(cast)
        x = x + tower.positional_embedding[: x.shape[1]].to(cast)
        x = tower.transformer(x, attn_mask=self.mask)
        x = tower.ln_final(x)
        x = text_global_pool(x, self.ids[idx], tower.pool_type, eos_token_id=tower.eos_id)
        if tower.text_projection is not None:
            x = tower.text_projection(x) if isinstance(tower.text_projection, torch.nn.Module) else x @ tower.text_projection
        return F.normalize(x.float(), dim=-1)

    def forward(self) -> torch.Tensor:
        """(C, D) L2-normalised class embeddings; above ``class_chunk`` classes, activations are recomputed per chunk in backward."""
        n = len(self.ids)
        every = torch.arange(n, device=self.ids.device)
        if n <= self.chunk:
            return self._encode(every)
        parts = []
        for s in range(0, n, self.chunk):
            idx = every[s : s + self.chunk]
            parts.append(checkpoint(self._encode, idx, use_reentrant=False) if torch.is_grad_enabled() else self._encode(idx))
        return torch.cat(parts)


def _check(backbone: Backbone, embeddings: np.ndarray, labels: np.ndarray, class_names: list[str],
           recipe: PromptRecipe, loss: Loss | None) -> None:
    if len(class_names) == 0:
        raise TextadaptError("prompt learning: no class names")
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise TextadaptError(f"prompt learning: no training descriptions (embeddings of shape {embeddings.shape})")
    if backbone.embed_dim and embeddings.shape[1] != backbone.embed_dim:
        raise TextadaptError(f"prompt learning: description embeddings have dimension {embeddings.shape[1]}, "
                             f"backbone {backbone.spec!r} embeds in {backbone.embed_dim}")
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
    if recipe.batch_size is not None and recipe.batch_size < 1:
        raise TextadaptError(f"prompt learning: batch_size must be >= 1 or None, got {recipe.batch_size}")


def train_prompt_learner(backbone: Backbone, embeddings: np.ndarray, labels: np.ndarray, class_names: list[str],
                         recipe: PromptRecipe, loss: Loss | None = None) -> TrainedHead:
    """Learn the context vectors on (N, D) L2-normalised description embeddings with labels in
    [0, len(class_names)); return the final L2-normalised class embeddings as the classifier.

    ``loss(logits (B, C), labels (B,), embeddings (B, D) as classified, noise included)`` replaces
    the default cross-entropy with label smoothing for objective "classify".
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
            scale = recipe.logit_scale if recipe.logit_scale is not None else float(backbone.model.logit_scale.exp().clamp(max=100))
            noise = torch.Generator(device=device).manual_seed(recipe.seed)
            order = torch.Generator().manual_seed(recipe.seed)
            opt = torch.optim.AdamW([prompts.ctx], lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
            autocast = device.type == "cuda" and recipe.amp
            losses: list[float] = []
            batch = len(x) if recipe.batch_size is None else min(recipe.batch_size, len(x))
            perm, at = torch.randperm(len(x), generator=order), 0
            t0 = time.perf_counter()
            for step in range(recipe.steps):
                if recipe.cosine:
                    for group in opt.param_groups:
                        group["lr"] = 0.5 * recipe.lr * (1 + math.cos(math.pi * step / recipe.steps))
                if batch == len(x):
                    xb, yb = x, y
                else:
                    if at + batch > len(x):
                        perm, at = torch.randperm(len(x), generator=order), 0
                    take = perm[at : at + batch].to(device)
                    at += batch
                    xb, yb = x[take], y[take]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    classes = prompts()
                if recipe.objective == "classify":
                    noisy = xb + torch.randn(xb.shape, generator=noise, device=device) * recipe.noise_std
                    logits = scale * noisy @ classes.T
                    value = (loss(logits, yb, noisy) if loss is not None
                             else F.cross_entropy(logits, yb, label_smoothing=recipe.label_smoothing))
                else:
                    matched = classes[yb]
                    value = F.l1_loss(matched, xb) if recipe.match_loss == "l1" else F.mse_loss(matched, xb)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                if step % 10 == 0 or step == recipe.steps - 1:
                    losses.append(value.item())
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                weight = prompts().cpu().numpy()
    finally:
        for k, p in state.items():
            p.requires_grad_(was_grad[k])
    return TrainedHead(weight, losses, seconds, str(device))
