"""Zero-shot classification with a captioner (open_clip CoCa), plain and information-gain scoring.

A captioner classifies an image by asking how likely each class caption t_c (e.g. "a photo of a
cat.") is as a caption of it: ``log P(t_c | image)``, the sum over the caption's tokens of
``log P(token_k | tokens_<k, image)`` under teacher forcing through CoCa's text decoder. The sum,
not the mean: it is the caption's log-probability, as in the IG captioner paper (Yang et al. 2023).
The tokens scored are every token after the start token up to and including the end-of-text
token (the EOT is what says "the caption ends here"); padding is never scored.

That likelihood is dominated by the decoder's text prior (short and frequent captions win whatever
the image). Information gain removes it: ``IG(c | image) = log P(t_c | image) - beta * log P(t_c)``.
The paper trains the captioner with an extra text-only objective so that it models ``P(t)``
itself; a frozen open_clip CoCa was never trained that way, so here ``log P(t_c)`` is estimated by
the same decoder conditioned on a *content-free* input. Estimators (``content_free=``):

- ``"null-image"`` (default): the decoder attends to the image tokens of one flat image whose every
  pixel is the preprocessing mean colour (an all-zero tensor after normalisation). This is the
  usual calibration trick (a content-free input, as in "Calibrate Before Use"): the input is an
  ordinary image, inside what the encoder has seen, that shows nothing. One image forward, exact
  and deterministic; the default for those reasons.
- ``"noise-images"``: ``log mean_k P(t_c | noise_k)`` over ``n_noise`` images of uniform random
  pixels (seeded), a Monte-Carlo marginal over images that carry no object. Less tied to one
  arbitrary null image, n times the cost, and noise is itself a texture the decoder may describe.
- ``"zeroed-tokens"``: the image tokens the decoder cross-attends to are all zero, so every key
  and value is the same vector and cross-attention adds one constant, the same for every image:
  the closest a frozen CoCa gets to the paper's "no image" branch. But the decoder never saw such
  tokens in training, so the estimate is off-distribution; offered for comparison.

The image encoder runs once per image; every caption's unimodal text-tower tokens are computed once;
and the decoder runs on (image, caption) pairs with each image's tokens shared by all its captions
(cross-attention has no mask, so the queries of all captions of one image are attended in one call
against that image's keys and values, which are projected once per image instead of once per pair).
Only the positions that are scored are projected onto the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from textadapt import TextadaptError
from textadapt.datasets import ImageSet, iter_batches
from textadapt.encoders import Backbone

Progress = Callable[[int, int], None]

CONTENT_FREE = ("null-image", "noise-images", "zeroed-tokens")
DEFAULT_CONTENT_FREE = "null-image"
DEFAULT_TEMPLATE = "a photo of a {}."
N_NOISE = 8
NOISE_SEED = 0
# Rows of decoder states (pairs x caption positions) per decoder call, and rows projected onto the
# vocabulary at once (2048 x 49408 float32 logits = 400 MB).
DECODER_ROWS = 16384
VOCAB_ROWS = 2048


class CaptionerScores(NamedTuple):
    """What the harness keeps: unpacks as ``loglik, prior``."""

    loglik: np.ndarray  # (N_images, C): log P(t_c | image)
    prior: np.ndarray  # (C,): log P(t_c), from a content-free input

    def ig(self, beta: float = 1.0) -> np.ndarray:
        return ig_scores(self.loglik, self.prior, beta)


@dataclass
class _Captions:
    """Captions tokenised once: decoder inputs, targets and which targets are scored."""

    token_embs: torch.Tensor  # (C, S, W): unimodal text-tower tokens fed to the decoder (positions 0..S-1)
    targets: torch.Tensor  # (C, S): the next token at each position (positions 1..S)
    scored: torch.Tensor  # (C, S) bool: target is a caption token or its EOT, not padding


def require_coca(backbone: Backbone):
    """The backbone's CoCa model, or a clear error."""
    import open_clip

    if not isinstance(backbone.model, open_clip.CoCa):
        raise TextadaptError(
            f"captioner scoring needs a CoCa backbone with a text decoder, but {backbone.spec!r} is a "
            f"{type(backbone.model).__name__}; use a coca_* architecture, e.g. coca_ViT-B-32:laion2b_s13b_b90k"
        )
    decoder = backbone.model.text_decoder
    if not getattr(decoder, "batch_first", True):
        raise TextadaptError(
            f"{backbone.spec}: the CoCa text decoder is not batch-first; captioner scoring supports open_clip's batch-first decoder only"
        )
    return backbone.model


def _tokenize(backbone: Backbone, captions: Sequence[str]) -> _Captions:
    model = backbone.model
    tokens = backbone.tokenizer(list(captions)).to(backbone.device)  # (C, context)
    eot = getattr(backbone.tokenizer, "eot_token_id", None)
    if eot is not None:
        # Everything up to and including the first EOT is the caption; the tokenizer always ends one with it.
        is_eot = tokens == eot
        ends = torch.where(is_eot.any(1), is_eot.int().argmax(1), torch.full_like(tokens[:, 0], tokens.shape[1] - 1))
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        real = positions[None, :] <= ends[:, None]
    else:
        real = tokens != model.pad_id
    length = int(real.sum(1).max())  # the longest caption, SOT and EOT included
    tokens, real = tokens[:, :length], real[:, :length]
    # The text tower is causal, so a caption's token states do not depend on what follows it: cutting
    # the padding shared by all captions changes nothing (tests compare with the model's full forward).
    _, token_embs = model._encode_text(tokens, normalize=False)
    return _Captions(token_embs[:, : length - 1], tokens[:, 1:], real[:, 1:])


def _pixels(backbone: Backbone, images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        size = (
            tuple(backbone.model.visual.image_size)
            if isinstance(backbone.model.visual.image_size, (tuple, list))
            else (backbone.model.visual.image_size,) * 2
        )
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != size:
            raise TextadaptError(
                f"preprocessed images must be a (N, 3, {size[0]}, {size[1]}) tensor for {backbone.spec}, got shape {tuple(images.shape)}"
            )
        return images.to(backbone.device, dtype=next(backbone.model.parameters()).dtype)
    images = list(images)
    if not images:
        raise TextadaptError("no images to score")
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TextadaptError(f"image {i} is a {type(im).__name__}; pass PIL images or a preprocessed tensor batch")
    return torch.stack([backbone.preprocess(im) for im in images]).to(backbone.device)


def _image_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    _, tokens = model._encode_image(pixels, normalize=False)
    return tokens  # (B, T, W): what the decoder cross-attends to


def _decode(decoder, image_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Final decoder states of every (image, caption) pair: (B, c, S, W) from image tokens (B, T, W)
    and caption tokens (c, S, W). Same layers as ``MultimodalTransformer.forward``; the cross-attention
    step takes each image's c*S caption queries in one sequence, which is exact because
    cross-attention has no mask (every query attends to the image's keys on its own)."""
    B, (c, S, W) = image_tokens.shape[0], text.shape
    x = text.unsqueeze(0).expand(B, c, S, W).reshape(B * c, S, W)
    causal = decoder.attn_mask[:S, :S]
    for self_block, cross_block in zip(decoder.resblocks, decoder.cross_attn):
        x = self_block(x, attn_mask=causal)
        x = cross_block(x.reshape(B, c * S, W), k_x=image_tokens, v_x=image_tokens).reshape(B * c, S, W)
    return decoder.ln_final(x).reshape(B, c, S, W)


def _scored_logprob_sums(decoder, states: torch.Tensor, caps: _Captions, c0: int) -> torch.Tensor:
    """(B, c) sums of log P(target) over the scored positions of captions c0..c0+c."""
    B, c, S, W = states.shape
    scored = caps.scored[c0 : c0 + c].unsqueeze(0).expand(B, c, S)
    rows = states[scored]  # (n, W): only the positions that count
    targets = caps.targets[c0 : c0 + c].unsqueeze(0).expand(B, c, S)[scored]
    pair = torch.arange(B * c, device=states.device).reshape(B, c, 1).expand(B, c, S)[scored]
    logp = torch.empty(rows.shape[0], dtype=torch.float32, device=states.device)
    for r0 in range(0, rows.shape[0], VOCAB_ROWS):
        h = rows[r0 : r0 + VOCAB_ROWS]
        logits = (h @ decoder.text_projection if decoder.text_projection is not None else h).float()
        logp[r0 : r0 + VOCAB_ROWS] = logits.log_softmax(-1).gather(1, targets[r0 : r0 + VOCAB_ROWS, None])[:, 0]
    return torch.zeros(B * c, dtype=torch.float32, device=states.device).index_add_(0, pair, logp).reshape(B, c)


def _loglik_from_tokens(model, image_tokens: torch.Tensor, caps: _Captions) -> torch.Tensor:
    """(B, C) log P(caption | image) for a batch of image tokens."""
    B = image_tokens.shape[0]
    C, S, _ = caps.token_embs.shape
    per_call = max(1, DECODER_ROWS // max(1, B * S))  # captions per decoder call
    out = []
    for c0 in range(0, C, per_call):
        states = _decode(model.text_decoder, image_tokens, caps.token_embs[c0 : c0 + per_call])
        out.append(_scored_logprob_sums(model.text_decoder, states, caps, c0))
    return torch.cat(out, 1) if out else torch.zeros(B, 0)


def _loglik_batches(backbone: Backbone, batches: Iterable, n: int, captions: list[str], progress: Progress | None) -> np.ndarray:
    model = require_coca(backbone)
    if progress:
        progress(0, n)
    if not captions:
        return np.zeros((n, 0), np.float32)
    caps = _tokenize(backbone, captions)
    out, done = [], 0
    for batch in batches:
        tokens = _image_tokens(model, _pixels(backbone, batch))
        out.append(_loglik_from_tokens(model, tokens, caps).cpu().numpy())
        done += tokens.shape[0]
        if progress:
            progress(done, n)
    return np.concatenate(out) if out else np.zeros((0, len(captions)), np.float32)


@torch.inference_mode()
def caption_log_likelihood(
    backbone: Backbone, images, captions: Sequence[str], batch_size: int = 32, progress: Progress | None = None
) -> np.ndarray:
    """(N_images, C) log P(caption | image): the summed log-probabilities of each caption's tokens
    (start token excluded, EOT included, padding excluded) under teacher forcing.

    ``images``: PIL images (preprocessed with the backbone's transform, ``batch_size`` at a time) or
    an already preprocessed (N, 3, H, W) tensor.
    """
    require_coca(backbone)
    if isinstance(images, torch.Tensor):
        _pixels(backbone, images)  # the shape check, before any work
    else:
        images = list(images)
    n = len(images)
    batches = (images[i : i + batch_size] for i in range(0, n, batch_size))
    return _loglik_batches(backbone, batches, n, list(captions), progress)


def content_free_pixels(backbone: Backbone, kind: str, n_noise: int = N_NOISE, seed: int = NOISE_SEED) -> torch.Tensor:
    """The preprocessed content-free images of an estimator: the null image (1 of them) or the noise images."""
    size = backbone.model.visual.image_size
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    if kind == "null-image":
        # Zero after normalisation = every pixel at the normalisation mean colour.
        return torch.zeros(1, 3, h, w, device=backbone.device, dtype=next(backbone.model.parameters()).dtype)
    if kind == "noise-images":
        if n_noise < 1:
            raise TextadaptError(f"n_noise must be at least 1, got {n_noise}")
        rng = np.random.default_rng(seed)
        noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n_noise)]
        return _pixels(backbone, noise)
    raise TextadaptError(f"content-free input {kind!r} has no images; estimators: {', '.join(CONTENT_FREE)}")


@torch.inference_mode()
def caption_prior(
    backbone: Backbone,
    captions: Sequence[str],
    content_free: str = DEFAULT_CONTENT_FREE,
    n_noise: int = N_NOISE,
    seed: int = NOISE_SEED,
) -> np.ndarray:
    """(C,) log P(caption) with no image, estimated from a content-free input (see the module docstring)."""
    model = require_coca(backbone)
    if content_free not in CONTENT_FREE:
        raise TextadaptError(f"unknown content-free estimator {content_free!r}; choose one of {', '.join(CONTENT_FREE)}")
    captions = list(captions)
    if not captions:
        return np.zeros(0, np.float32)
    caps = _tokenize(backbone, captions)
    if content_free == "zeroed-tokens":
        probe = _image_tokens(model, content_free_pixels(backbone, "null-image"))  # for the token count and width only
        loglik = _loglik_from_tokens(model, torch.zeros_like(probe), caps)
    else:
        loglik = _loglik_from_tokens(
            model, _image_tokens(model, content_free_pixels(backbone, content_free, n_noise, seed)), caps
        )
    # log of the mean probability over the content-free images (one image: the log-likelihood itself)
    return (torch.logsumexp(loglik, 0) - math.log(loglik.shape[0])).cpu().numpy()


def ig_scores(loglik: np.ndarray, prior: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """Information gain ``log P(t_c | image) - beta * log P(t_c)``; beta = 0 is the plain captioner."""
    loglik, prior = np.asarray(loglik), np.asarray(prior)
    if loglik.ndim != 2 or prior.shape != (loglik.shape[1],):
        raise TextadaptError(
            f"IG scores need loglik (images, classes) and prior (classes,); got {loglik.shape} and {prior.shape}"
        )
    return loglik - beta * prior[None, :]


def classify_with_captioner(
    backbone: Backbone,
    image_set: ImageSet,
    class_names: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 32,
    progress: Progress | None = None,
    content_free: str = DEFAULT_CONTENT_FREE,
) -> CaptionerScores:
    """Caption log-likelihoods of every image for every class caption, and the captions' prior.

    ``template`` turns a class name into its caption ("{}" is the name). Predict with
    ``scores.loglik.argmax(1)`` (plain captioner) or ``scores.ig(beta).argmax(1)`` (information gain).
    """
    require_coca(backbone)
    if "{}" not in template:
        raise TextadaptError(f"captioner template {template!r} has no {{}} for the class name")
    captions = [template.replace("{}", c) for c in class_names]
    prior = caption_prior(backbone, captions, content_free)
    with torch.inference_mode():
        loglik = _loglik_batches(backbone, iter_batches(image_set, batch_size), len(image_set), captions, progress)
    return CaptionerScores(loglik, prior)
