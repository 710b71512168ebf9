"""Prompt learning through the frozen text tower, on the tiny random backbone.

The weights are untrained, so correctness is shown by exact identities (step 0 with the context
initialised from "a photo of a" *is* zero-shot CLIP with that prompt; chunked and unchunked
training agree) and by synthetic description embeddings whose right answer is known.
"""

import dataclasses

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from textadapt import TextadaptError
from textadapt.prompt_learning import PromptedClasses, PromptRecipe, train_prompt_learner

NAMES = ["t-shirt", "trouser", "pullover", "dress", "ankle boot", "sandal"]
TINY_VISION = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8}
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}


def zero_shot(backbone, names, template="a photo of a {}."):
    with torch.no_grad():
        tokens = backbone.tokenizer([template.format(c) for c in names]).to(backbone.device)
        return backbone.model.encode_text(tokens, normalize=True).float().cpu().numpy()


def no_descriptions(backbone):
    return np.zeros((1, backbone.embed_dim), np.float32), np.zeros(1, int)


def noisy_copies(rng, centres, per_class, spread=1.0):
    dim = centres.shape[1]
    x = np.repeat(centres, per_class, axis=0) + rng.normal(scale=spread / np.sqrt(dim), size=(len(centres) * per_class, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.repeat(np.arange(len(centres)), per_class)


def separable_task(backbone, seed=0):
    """Descriptions: noisy copies of a random target direction per class (train and held-out sets)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(NAMES), backbone.embed_dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return noisy_copies(rng, centres, 20), noisy_copies(rng, centres, 20)


def accuracy(x, y, weight):
    return float(((x @ weight.T).argmax(axis=1) == y).mean())


def custom_text_backbone(tiny_backbone, **text_cfg):
    """The tiny backbone's tokenizer with a CustomTextCLIP model (text tower under ``model.text``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CustomTextCLIP(64, TINY_VISION, {**TINY_TEXT, **text_cfg}).eval().requires_grad_(False)
    return dataclasses.replace(tiny_backbone, spec="custom-text:random", built=tiny_backbone.build()._replace(model=model))


@pytest.mark.parametrize("class_specific", [False, True])
def test_step_zero_is_the_zero_shot_prompt(tiny_backbone, class_specific):
    x, y = no_descriptions(tiny_backbone)
    head = train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(steps=0, class_specific=class_specific))
    assert head.weight.shape == (len(NAMES), tiny_backbone.embed_dim)
    np.testing.assert_allclose(head.weight, zero_shot(tiny_backbone, NAMES), atol=1e-5)
    # and it is not just any prompt: another init gives other embeddings
    other = train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(steps=0, ctx_init="a blurry photo of a", n_ctx=5))
    np.testing.assert_allclose(other.weight, zero_shot(tiny_backbone, NAMES, "a blurry photo of a {}."), atol=1e-5)
    assert not np.allclose(other.weight, head.weight, atol=1e-3)


def test_step_zero_on_a_custom_text_tower(tiny_backbone):
    backbone = custom_text_backbone(tiny_backbone)
    x, y = no_descriptions(backbone)
    head = train_prompt_learner(backbone, x, y, NAMES, PromptRecipe(steps=0))
    np.testing.assert_allclose(head.weight, zero_shot(backbone, NAMES), atol=1e-5)


def test_only_the_context_is_trained(tiny_backbone):
    (x, y), _ = separable_task(tiny_backbone)
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    flags = [p.requires_grad for p in tiny_backbone.model.parameters()]
    head = train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(steps=5, lr=1e-2))
    after = tiny_backbone.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.grad is not None for p in tiny_backbone.model.parameters())  # no gradient reached the backbone
    assert [p.requires_grad for p in tiny_backbone.model.parameters()] == flags  # its flags are as they were
    assert not np.allclose(head.weight, zero_shot(tiny_backbone, NAMES), atol=1e-3)  # the context did move
    np.testing.assert_allclose(np.linalg.norm(head.weight, axis=1), 1.0, atol=1e-5)


def test_training_fits_descriptions_and_generalises(tiny_backbone):
    (x, y), (x_test, y_test) = separable_task(tiny_backbone)
    start = train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(steps=0))
    head = train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(steps=60, lr=1e-2))
    assert len(head.losses) == 7 and head.seconds > 0 and head.device == "cpu"
    assert head.losses[-1] < 0.5 * head.losses[0]
    before, after = accuracy(x_test, y_test, start.weight), accuracy(x_test, y_test, head.weight)
    assert after >= 0.8 and after > before + 0.3, (before, after)


def test_seeded_and_deterministic(tiny_backbone):
    (x, y), _ = separable_task(tiny_backbone)
    recipe = PromptRecipe(epochs=3, ctx_init=None, batch_size=32, lr=1e-2)
    a = train_prompt_learner(tiny_backbone, x, y, NAMES, recipe)
    b = train_prompt_learner(tiny_backbone, x, y, NAMES, recipe)
    c = train_prompt_learner(tiny_backbone, x, y, NAMES, dataclasses.replace(recipe, seed=1))
    assert np.array_equal(a.weight, b.weight) and a.losses == b.losses
    assert not np.allclose(a.weight, c.weight, atol=1e-4)


def test_chunked_classes_train_the_same(tiny_backbone):
    """Above class_chunk prompts, chunks are recomputed in backward: the gradients must not change."""
    (x, y), _ = separable_task(tiny_backbone)
    recipe = PromptRecipe(steps=6, lr=1e-2)
    whole = train_prompt_learner(tiny_backbone, x, y, NAMES, recipe)
    chunked = train_prompt_learner(tiny_backbone, x, y, NAMES, dataclasses.replace(recipe, class_chunk=4))
    np.testing.assert_allclose(chunked.weight, whole.weight, atol=1e-5)
    np.testing.assert_allclose(chunked.losses, whole.losses, rtol=1e-5)


def test_each_chunk_of_classes_runs_only_up_to_its_longest_prompt(tiny_backbone):
    """Classes are chunked by prompt length and each chunk is cut to its own longest prompt (the padding after a
    causal tower's pooled token changes nothing): fewer positions run, the same class embeddings."""
    names = ["dress", "bag", "sandal", "ankle boot with a very long and winding name of many words", "coat", "shirt"]
    seen = []
    with torch.no_grad():
        whole = PromptedClasses(tiny_backbone, names, PromptRecipe())().numpy()
    chunked = PromptedClasses(tiny_backbone, names, PromptRecipe(class_chunk=2))
    hook = chunked.tower.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            np.testing.assert_allclose(chunked().numpy(), whole, atol=1e-6)
    finally:
        hook.remove()
    assert len(seen) == 3 and max(seen) == chunked.ids.shape[1] and min(seen) < max(seen) / 2


@pytest.mark.parametrize("match_loss", ["l1", "l2"])
def test_match_objective_moves_classes_towards_their_descriptions(tiny_backbone, match_loss):
    (x, y), _ = separable_task(tiny_backbone)
    means = np.stack([x[y == c].mean(axis=0) for c in range(len(NAMES))])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    start = train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(steps=0))
    head = train_prompt_learner(
        tiny_backbone, x, y, NAMES, PromptRecipe(steps=40, lr=1e-2, objective="match", match_loss=match_loss)
    )
    assert head.losses[-1] < head.losses[0]
    cos_before, cos_after = (start.weight * means).sum(1), (head.weight * means).sum(1)
    assert cos_after.mean() > cos_before.mean() + 0.2, (cos_before, cos_after)


def test_custom_loss_gets_noisy_logits_labels_and_clean_embeddings(tiny_backbone):
    (x, y), _ = separable_task(tiny_backbone)
    seen = []

    def loss(logits, labels, embeddings):
        seen.append((logits.detach().clone(), labels.clone(), embeddings.clone()))
        return F.cross_entropy(logits, labels) * 2.0

    head = train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(steps=1), loss=loss)
    logits, labels, embeddings = seen[0]
    assert logits.shape == (len(x), len(NAMES)) and np.array_equal(labels.numpy(), y)
    assert np.array_equal(embeddings.numpy(), x)  # the clean embeddings (what OTTER's teacher sees)
    scale = tiny_backbone.model.logit_scale.exp().item()
    clean_logits = scale * x @ zero_shot(tiny_backbone, NAMES).T  # step 0's classes are the zero-shot prompt's
    assert np.abs(logits.numpy() - clean_logits).max() > 0.1  # ... but the logits come from the noisy ones
    plain = train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(steps=1, label_smoothing=0.0))
    assert head.losses[0] == pytest.approx(2.0 * plain.losses[0], rel=1e-5)


def test_bad_input_is_refused(tiny_backbone):
    (x, y), _ = separable_task(tiny_backbone)
    recipe = PromptRecipe(steps=1)
    with pytest.raises(TextadaptError, match="no training descriptions"):
        train_prompt_learner(tiny_backbone, np.zeros((0, tiny_backbone.embed_dim), np.float32), np.zeros(0, int), NAMES, recipe)
    with pytest.raises(TextadaptError, match="no class names"):
        train_prompt_learner(tiny_backbone, x, y, [], recipe)
    with pytest.raises(TextadaptError, match=r"labels must be in \[0, 3\)"):
        train_prompt_learner(tiny_backbone, x, y, NAMES[:3], recipe)
    with pytest.raises(TextadaptError, match="dimension 32"):
        train_prompt_learner(tiny_backbone, x[:, :32], y, NAMES, recipe)
    with pytest.raises(TextadaptError, match="is 4 tokens but n_ctx is 16"):
        train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(n_ctx=16))
    with pytest.raises(TextadaptError, match="objective must be"):
        train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(objective="align"))
    with pytest.raises(TextadaptError, match="custom loss applies to objective 'classify' only"):
        train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(objective="match"), loss=lambda *a: a[0].sum())


def test_unsupported_text_towers_are_refused(tiny_backbone):
    (x, y), _ = separable_task(tiny_backbone)
    coca_like = custom_text_backbone(tiny_backbone, embed_cls=True)
    with pytest.raises(TextadaptError, match="appends a class token"):
        train_prompt_learner(coca_like, x, y, NAMES, PromptRecipe(steps=1))
    vision_only = tiny_backbone.build()._replace(model=torch.nn.Linear(2, 2))
    no_tower = dataclasses.replace(tiny_backbone, spec="vision-only", built=vision_only)
    with pytest.raises(TextadaptError, match="needs open_clip's own text transformer.*'vision-only'"):
        train_prompt_learner(no_tower, x, y, NAMES, PromptRecipe(steps=1))


# ---------------------------------------------------------------------------------------------
# protext: ProText's recipe, against ProText's computation re-implemented from its code.
# Reference: muzairkhattak/ProText at f63d96b: trainers/protext.py (VLPromptLearner lines 71-153,
# TextEncoder lines 48-68, CustomCLIP.forward training branch lines 167-181, forward_backward line 280:
# F.l1_loss(..., reduction='mean')); clip/model.py (ResidualAttentionBlock_IVLP lines 191-256: from
# layer 1 to PROMPT_DEPTH_TEXT - 1, the n_ctx positions after the start token are replaced by that
# layer's own learned vectors before the layer runs); configs/trainers/ProText/text_only_supervised/*.yaml
# (AdamW, WEIGHT_DECAY 0.1, ADAM_BETA2 0.98, cosine, 5 constant warm-up epochs at 1e-5, batch 256);
# Dassl's schedulers as in tests/test_taskres.py (DasslConstantWarmup).

DESCRIPTIONS = {
    "t-shirt": ["a short-sleeved cotton top", "a plain shirt with a round neck", "a light top for summer"],
    "trouser": ["long trousers with two legs", "a pair of pants with a waistband", "straight-leg jeans"],
    "pullover": ["a knitted pullover with long sleeves", "a warm wool sweater", "a thick jumper"],
    "dress": ["a one-piece dress with a flared skirt", "a long evening gown", "a summer dress with straps"],
    "ankle boot": ["a leather boot that covers the ankle", "a short boot with a heel", "a sturdy boot with laces"],
    "sandal": ["an open shoe with straps", "a flat summer sandal", "a sandal with a thin sole"],
}


def protext_text_encoder(model, prompts, tokens, deep, depth, n_ctx):
    """ProText's TextEncoder with IVLP blocks: prompts + positional embedding; block i in 1 .. depth-1 first
    replaces positions 1 .. n_ctx by its own vectors deep[i - 1]; ln_final; the end-of-text token @ text_projection."""
    x = prompts + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if 0 < i < depth:
            x = torch.cat([x[:, :1], deep[i - 1].expand(x.shape[0], -1, -1), x[:, 1 + n_ctx :]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


def protext_prompts(model, ctx, tokens, n_ctx):
    """VLPromptLearner.forward: the prompt's token embeddings with the n_ctx after the start token replaced by ctx."""
    embedding = model.token_embedding(tokens)
    return torch.cat([embedding[:, :1], ctx.unsqueeze(0).expand(len(tokens), -1, -1), embedding[:, 1 + n_ctx :]], dim=1)


@pytest.mark.parametrize("dataset", ["oxford-pets", "dtd"])  # 4 vectors from "a photo of a"; 16 random ones in "X .. X {c}."
def test_protext_trains_as_protexts_code(tiny_backbone, dataset):
    from tests.test_taskres import DasslConstantWarmup
    from textadapt.prompt_learning import PromptedClasses, protext_recipe

    model, tok = tiny_backbone.model, tiny_backbone.tokenizer
    texts = [t for c in NAMES for t in DESCRIPTIONS[c]]
    labels = np.repeat(np.arange(len(NAMES)), 3)
    with torch.no_grad():
        targets = model.encode_text(tok(texts), normalize=True)  # the frozen CLIP's description embeddings
    epochs = 7
    recipe = protext_recipe(dataset, seed=5, epochs=epochs)
    assert recipe.depth == 9 and recipe.betas == (0.9, 0.98) and recipe.weight_decay == 0.1 and recipe.warmup_epochs == 5
    head = train_prompt_learner(tiny_backbone, targets.numpy(), labels, NAMES, recipe)

    start = PromptedClasses(tiny_backbone, NAMES, recipe)  # the same seeded initial vectors
    n_ctx, depth = recipe.n_ctx, 2  # depth 9, capped at the tiny tower's 2 layers
    assert start.depth == depth and start.deep.shape == (1, n_ctx, 64)
    if recipe.ctx_init:  # ProText's init: the token embeddings of "a photo of a" (protext.py:88-95)
        assert torch.equal(start.ctx, model.token_embedding(tok(["a photo of a"])[0, 1 : 1 + n_ctx]))
        prompt = "a photo of a {}."
    else:
        prompt = " ".join(["X"] * n_ctx) + " {}."
    tokens = tok([prompt.format(c) for c in NAMES])  # full 77 tokens, as ProText encodes them
    ctx = torch.nn.Parameter(start.ctx.detach().clone())
    deep = [torch.nn.Parameter(d.detach().clone()) for d in start.deep]
    optim = torch.optim.AdamW([ctx, *deep], lr=recipe.lr, weight_decay=0.1, betas=(0.9, 0.98))
    sched = DasslConstantWarmup(optim, torch.optim.lr_scheduler.CosineAnnealingLR(optim, float(epochs)), 5, 1e-5)
    order, y, first = torch.Generator().manual_seed(5), torch.as_tensor(labels), None
    for _epoch in range(epochs):
        idx = torch.randperm(len(texts), generator=order)  # fewer than 256: one batch per epoch
        out = protext_text_encoder(model, protext_prompts(model, ctx, tokens[y[idx]], n_ctx), tokens[y[idx]], deep, depth, n_ctx)
        loss = F.l1_loss(out / out.norm(dim=-1, keepdim=True), targets[idx], reduction="mean")
        first = loss.item() if first is None else first
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()
    with torch.no_grad():
        final = protext_text_encoder(model, protext_prompts(model, ctx, tokens, n_ctx), tokens, deep, depth, n_ctx)
    assert head.losses[0] == pytest.approx(first, rel=1e-5)
    np.testing.assert_allclose(head.weight, F.normalize(final, dim=-1).numpy(), atol=2e-5)
    assert (
        np.abs(
            head.weight
            - F.normalize(
                protext_text_encoder(model, protext_prompts(model, start.ctx, tokens, n_ctx), tokens, start.deep, depth, n_ctx),
                dim=-1,
            )
            .detach()
            .numpy()
        ).max()
        > 1e-3
    )


def test_protext_recipe_per_dataset():
    from textadapt.prompt_learning import PROTEXT_DEFAULT, protext_recipe

    dtd, eurosat, other = protext_recipe("dtd"), protext_recipe("eurosat"), protext_recipe("fashion-mnist")
    assert (dtd.lr, dtd.epochs, dtd.n_ctx, dtd.ctx_init) == (0.03, 200, 16, None)
    assert (eurosat.lr, eurosat.epochs, eurosat.n_ctx, eurosat.ctx_init) == (0.0025, 300, 4, "a photo of a")
    assert (other.lr, other.epochs, other.n_ctx) == PROTEXT_DEFAULT
    assert all(r.objective == "match" and r.match_loss == "l1" and r.batch_size == 256 for r in (dtd, eurosat, other))


def test_deep_prompts_change_the_deeper_layers_only_from_depth_two(tiny_backbone):
    x, y = no_descriptions(tiny_backbone)
    shallow = train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(steps=0, depth=1))
    deep = train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(steps=0, depth=2))
    np.testing.assert_allclose(shallow.weight, zero_shot(tiny_backbone, NAMES), atol=1e-5)
    assert np.abs(deep.weight - shallow.weight).max() > 1e-3  # layer 1 sees its own (random) context vectors


def test_chunked_full_batch_steps_train_the_same(tiny_backbone):
    """tap-coop's full-batch step over descriptions in chunks of 16 (gradients accumulated): the same context."""
    (x, y), _ = separable_task(tiny_backbone)
    whole = train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(steps=5, lr=1e-2))
    chunked = train_prompt_learner(tiny_backbone, x, y, NAMES, PromptRecipe(steps=5, lr=1e-2, chunk=16))
    np.testing.assert_allclose(chunked.weight, whole.weight, atol=1e-5)
    np.testing.assert_allclose(chunked.losses, whole.losses, rtol=1e-5)
