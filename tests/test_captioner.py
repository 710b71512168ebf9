"""Captioner scoring with CoCa: caption log-likelihoods, content-free priors, information gain.

The weights are untrained, so correctness is shown against the model's own forward pass (teacher
forcing through ``CoCa.forward``, one image and one caption at a time) and by invariants.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from textadapt import TextadaptError, captioner
from textadapt.captioner import (
    CONTENT_FREE,
    caption_log_likelihood,
    caption_prior,
    classify_with_captioner,
    content_free_pixels,
    ig_scores,
)
from textadapt.datasets import ImageSet

TINY_COCA = "textadapt-tiny-coca:random"  # textadapt/model_configs/textadapt-tiny-coca.json
CAPTIONS = ["a photo of a cat.", "dog", "a blurry photo of a small grey animal sitting on a red mat in the afternoon sun."]


@pytest.fixture(scope="module")
def coca():
    from textadapt.encoders import load_backbone

    return load_backbone(TINY_COCA, "cpu")


def noise_images(n: int, seed: int = 1, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@torch.no_grad()
def reference_loglik(backbone, pixels: torch.Tensor, caption: str, image_embs: torch.Tensor | None = None) -> float:
    """One (image, caption) pair through ``model(image, text)``: log_softmax of the decoder logits
    gathered at the labels, summed over the caption's tokens after SOT up to and including EOT."""
    text = backbone.tokenizer([caption])  # full context length, padded
    if image_embs is None:
        out = backbone.model(pixels, text)
    else:
        out = backbone.model(None, text, image_latent=torch.zeros(1, backbone.embed_dim), image_embs=image_embs)
    logp = out["logits"].float().log_softmax(-1).gather(2, out["labels"][..., None])[0, :, 0]
    n_scored = int((text[0] == backbone.tokenizer.eot_token_id).nonzero()[0])  # labels[:n] = tokens 1..EOT
    return float(logp[:n_scored].sum())


def test_batched_loglik_equals_the_models_own_forward(coca):
    images = noise_images(3)
    got = caption_log_likelihood(coca, images, CAPTIONS, batch_size=2)  # two image batches
    pixels = torch.stack([coca.preprocess(im) for im in images])
    want = np.array([[reference_loglik(coca, pixels[i : i + 1], c) for c in CAPTIONS] for i in range(len(images))])
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # A tensor batch gives the same as the PIL images it came from.
    np.testing.assert_allclose(caption_log_likelihood(coca, pixels, CAPTIONS), got, rtol=1e-6, atol=1e-5)
    # The image matters (an untrained CoCa from open_clip alone scored every caption alike; see encoders._init_untrained).
    assert np.abs(got[0] - got[1]).max() > 0.1


def test_padding_and_chunking_do_not_change_scores(coca, monkeypatch):
    images = noise_images(4)
    alone = caption_log_likelihood(coca, images, ["dog"])
    with_long = caption_log_likelihood(coca, images, [CAPTIONS[2], "dog", CAPTIONS[0]])
    np.testing.assert_allclose(with_long[:, 1], alone[:, 0], rtol=1e-5, atol=1e-4)
    # Tiny decoder calls (one caption at a time) and vocabulary chunks give the same numbers.
    monkeypatch.setattr(captioner, "DECODER_ROWS", 1)
    monkeypatch.setattr(captioner, "VOCAB_ROWS", 5)
    np.testing.assert_allclose(
        caption_log_likelihood(coca, images, [CAPTIONS[2], "dog", CAPTIONS[0]]), with_long, rtol=1e-5, atol=1e-4
    )


def test_image_encoder_runs_once_per_image(coca):
    seen = []
    hook = coca.model.visual.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    try:
        caption_log_likelihood(coca, noise_images(5), CAPTIONS * 4, batch_size=2)
    finally:
        hook.remove()
    assert sum(seen) == 5


def test_priors_are_the_likelihood_of_their_content_free_input(coca):
    null = caption_prior(coca, CAPTIONS, "null-image")
    # the null image is the all-zero preprocessed tensor: its IG score is 0 for every caption
    null_ll = caption_log_likelihood(coca, content_free_pixels(coca, "null-image"), CAPTIONS)
    np.testing.assert_allclose(ig_scores(null_ll, null), 0.0, atol=1e-4)
    np.testing.assert_allclose(
        null, [reference_loglik(coca, torch.zeros(1, 3, 32, 32), c) for c in CAPTIONS], rtol=1e-5, atol=1e-4
    )

    noise = caption_prior(coca, CAPTIONS, "noise-images", n_noise=3)
    per_image = caption_log_likelihood(coca, content_free_pixels(coca, "noise-images", n_noise=3), CAPTIONS)
    log_mean_exp = np.log(np.exp(per_image.astype(np.float64)).mean(0))
    np.testing.assert_allclose(noise, log_mean_exp, rtol=1e-5, atol=1e-4)
    assert not np.allclose(noise, null)

    zeroed = caption_prior(coca, CAPTIONS, "zeroed-tokens")
    n_tokens, width = coca.model._encode_image(torch.zeros(1, 3, 32, 32))[1].shape[1:]
    want = [reference_loglik(coca, None, c, image_embs=torch.zeros(1, n_tokens, width)) for c in CAPTIONS]
    np.testing.assert_allclose(zeroed, want, rtol=1e-5, atol=1e-4)


def test_ig_removes_the_text_prior(coca):
    """Longer captions have far lower likelihood whatever the image: the plain captioner predicts the
    shortest class for every image; IG compares each caption with itself and spreads the predictions."""
    names = ["cat", "spotted hyena", "red-eyed tree frog", "greater crested tern on a rock"]
    captions = [f"a photo of a {n}." for n in names]
    loglik = caption_log_likelihood(coca, noise_images(24), captions)
    prior = caption_prior(coca, captions)
    assert set(loglik.argmax(1)) == {0}
    ig = ig_scores(loglik, prior)
    assert np.array_equal(ig, loglik - prior[None, :])
    assert np.array_equal(ig_scores(loglik, prior, beta=0.5), loglik - 0.5 * prior[None, :])
    assert np.array_equal(ig_scores(loglik, prior, beta=0.0), loglik)
    assert len(set(ig.argmax(1))) >= 2 and (ig.argmax(1) != 0).any()
    # Any class-only bias in the likelihoods (a text prior) cancels when it is also in the prior.
    bias = np.array([30.0, -5.0, 12.0, 0.0], np.float32)
    assert np.array_equal(ig_scores(loglik + bias, prior + bias).argmax(1), ig.argmax(1))
    with pytest.raises(TextadaptError, match="prior"):
        ig_scores(loglik, prior[:3])


def test_classify_with_captioner_on_an_image_set(coca):
    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(5)]  # grey, like Fashion-MNIST
    images = ImageSet(arrays, np.array([0, 1, 2, 0, 1]), "synthetic")
    classes = ["T-shirt/top", "trouser", "ankle boot"]
    calls = []
    scores = classify_with_captioner(
        coca, images, classes, template="a photo of a {}.", batch_size=2, progress=lambda done, total: calls.append((done, total))
    )
    loglik, prior = scores  # unpacks for the harness
    captions = [f"a photo of a {c}." for c in classes]
    np.testing.assert_allclose(
        loglik, caption_log_likelihood(coca, [images.pil(i) for i in range(5)], captions), rtol=1e-6, atol=1e-5
    )
    np.testing.assert_allclose(prior, caption_prior(coca, captions), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(scores.ig(0.7), loglik - 0.7 * prior[None, :])
    assert calls[0] == (0, 5) and calls[-1] == (5, 5)
    with pytest.raises(TextadaptError, match=r"\{\}"):
        classify_with_captioner(coca, images, classes, template="a photo")


def test_untrained_coca_is_reproducible(coca):
    from textadapt.encoders import load_backbone

    again = load_backbone(TINY_COCA, "cpu")
    assert again.id == coca.id
    assert float(again.model.text_decoder.text_projection.detach().abs().mean()) > 0


def test_clear_errors(coca, tiny_backbone):
    with pytest.raises(TextadaptError, match=r"coca_\*.*coca_ViT-B-32:laion2b_s13b_b90k"):
        caption_log_likelihood(tiny_backbone, noise_images(1), ["a cat"])
    with pytest.raises(TextadaptError, match="coca_"):
        caption_prior(tiny_backbone, ["a cat"])
    with pytest.raises(TextadaptError, match="unknown content-free estimator 'blank'"):
        caption_prior(coca, ["a cat"], "blank")
    with pytest.raises(TextadaptError, match=r"\(N, 3, 32, 32\).*\(2, 3, 28, 28\)"):
        caption_log_likelihood(coca, torch.zeros(2, 3, 28, 28), ["a cat"])
    assert set(CONTENT_FREE) == {"null-image", "noise-images", "zeroed-tokens"}
    assert caption_log_likelihood(coca, noise_images(2), []).shape == (2, 0)
    assert math.isfinite(float(caption_prior(coca, ["a cat"])[0]))
