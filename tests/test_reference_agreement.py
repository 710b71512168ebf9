"""Each method that carries a paper's name, against a re-implementation of its reference's computation.

Every test re-implements the reference's own code path (repository, commit, file and line in its
docstring), runs it and textadapt on the same inputs (and, where the method is random, on the same
random stream), and requires the same texts, weights or scores. A test fails when textadapt drifts
from its reference. What textadapt does differently on purpose is in docs/methods.md.
OTTER's targets, TaskRes's logits and ProText's loss have their tests beside their code.
"""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from textadapt import harness, scoring
from textadapt.adapters import TapRecipe, train_adapter
from textadapt.captioner import caption_log_likelihood
from textadapt.pipeline import TrainingSet
from textadapt.store import Store

# --------------------------------------------------------------------------------------------
# WaffleCLIP: ExplainableML/WaffleCLIP at 7a1b8ee (waffle_tools.py)


def waffle_reference(class_names: list[str], rep: int, word_list: list[str], characters: str) -> dict[str, list[str]]:
    """WaffleCLIP's ``waffle`` mode, re-implemented from waffle_tools.py ``load_gpt_descriptions``:
    lines 458-505 (the mode), 253 (``structured_descriptor_builder``: pre_descriptor_text '' +
    label_before_text 'A photo of a ' + wordify(cls) + descriptor_separator ', ' + modify_descriptor +
    label_after_text '.', the defaults of base_main.py lines 36-44), 214-222 (``make_descriptor_sentence``)
    and 210-212 (``wordify``), on NumPy's global stream seeded as base_main.py line 118
    (``seed_everything(rep)``, waffle_tools.py line 70). ``characters`` stands for lines 467-469 (the
    characters of the dataset's GPT descriptors), ``word_list`` for line 460 (``word_list.pkl``)."""

    def wordify(s):
        return s.replace("_", " ")

    def make_descriptor_sentence(d):
        if d.startswith("a") or d.startswith("an"):
            return f"which is {d}"
        elif (
            d.startswith("has")
            or d.startswith("often")
            or d.startswith("typically")
            or d.startswith("may")
            or d.startswith("can")
        ):
            return f"which {d}"
        elif d.startswith("used"):
            return f"which is {d}"
        return f"which has {d}"

    def build(item, cls):
        return f"A photo of a {wordify(cls)}, {make_descriptor_sentence(item)}."

    np.random.seed(rep)
    key_list = list(class_names)
    avg_num_words = int(np.max([np.round(np.mean([len(wordify(x).split(" ")) for x in key_list])), 1]))
    avg_word_length = int(np.round(np.mean([np.mean([len(y) for y in wordify(x).split(" ")]) for x in key_list])))
    word_list = [x[:avg_word_length] for x in word_list]
    character_list = np.unique(list(characters))
    num_spaces = int(np.round(np.mean([np.sum(np.array(list(x)) == " ") for x in key_list]))) + 1
    num_chars = int(np.ceil(np.mean([np.max([len(y) for y in x.split(" ")]) for x in key_list])))
    num_chars += num_spaces - num_chars % num_spaces
    sample_key = ""
    for s in range(num_spaces):
        for _ in range(num_chars // num_spaces):
            sample_key += "a"
        if s < num_spaces - 1:
            sample_key += " "
    descriptions = {key: [] for key in key_list}
    for key in key_list:
        for _ in range(15):  # --waffle_count 15 (README.md's command)
            base_word = ""
            for a in range(avg_num_words):
                base_word += np.random.choice(word_list, 1, replace=False)[0]
                if a < avg_num_words - 1:
                    base_word += " "
            descriptions[key].append(build(base_word, key))
            noise_word = ""
            for c in sample_key:
                if c != " ":
                    noise_word += np.random.choice(character_list, 1, replace=False)[0]
                else:
                    noise_word += ", "
            descriptions[key].append(build(noise_word, key))
    match_key = np.random.choice(key_list)
    # Lines 503-505 replace the chosen class's name everywhere in its sentences: where the name also occurs
    # inside a random word this rewrites the word too, a quirk textadapt does not copy (docs/methods.md).
    # The class lists below have no such collision, which this checks.
    for d in descriptions[match_key]:
        assert d.count(wordify(match_key)) == 1, f"collision: {match_key!r} in {d!r}; choose other test classes"
    return {key: [x.replace(wordify(match_key), wordify(key)) for x in descriptions[match_key]] for key in key_list}


# Fashion-MNIST's classes, and names with several words, an underscore (wordify) and varied lengths.
WAFFLE_CLASSES = [
    ["T-shirt or top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"],
    ["great white shark", "tree frog", "hair_dryer", "sea lion", "brass memorial plaque", "pizza", "yellow lady's slipper"],
]


def test_waffle_vocabulary_is_made_here_the_same_every_time():
    """WaffleCLIP's word list is not redistributed: textadapt draws from the 4,330 most frequent whole words of
    CLIP's BPE vocabulary (the size of the reference's list) and letters and digits (docs/methods.md)."""
    words, characters = harness._waffle_vocabulary()
    assert len(words) == harness.WAFFLE_VOCABULARY and list(words) == sorted(set(words))
    assert all(w.isascii() and w.isalpha() and w.islower() and len(w) >= 2 for w in words)
    assert {"photo", "red", "small"} <= set(words)  # common words, not rare merges
    assert characters == "".join(sorted(set(characters))) and len(characters) == 62
    harness._waffle_vocabulary.cache_clear()
    assert harness._waffle_vocabulary() == (words, characters)
    # read from the BPE file without open_clip, the words are those of open_clip's own tokenizer, in its id order
    from open_clip.tokenizer import SimpleTokenizer

    by_id = sorted(SimpleTokenizer().encoder.items(), key=lambda kv: kv[1])
    merged = [t[:-4] for t, _ in by_id if t.endswith("</w>") and re.fullmatch(r"[a-z]{2,}", t[:-4])]
    assert words == tuple(sorted(dict.fromkeys(merged[: harness.WAFFLE_VOCABULARY])))


@pytest.mark.parametrize("classes", WAFFLE_CLASSES, ids=["fashion-mnist", "multi-word"])
def test_waffle_texts_are_the_references_on_the_same_stream(classes):
    words, characters = harness._waffle_vocabulary()
    for rep in harness.WAFFLE_SEEDS:
        ours = harness.waffle_texts(classes, rep)
        theirs = waffle_reference(classes, rep, list(words), characters)
        assert ours == [t for c in classes for t in theirs[c]], f"draw {rep}"
    # One set shared by every class, 15 (words, characters) pairs; a new set per draw.
    first = harness.waffle_descriptors(tuple(classes), 0)
    assert len(first) == 30 and first != harness.waffle_descriptors(tuple(classes), 1)


def test_waffle_score_is_the_mean_of_the_similarities(tiny_backbone, fmnist, tmp_path):
    """base_main.py lines 123-145 (merge_predictions off, aggregate 'mean', waffle_tools.py lines 763-777):
    per class, the image's similarities to each normalised description embedding, averaged."""
    with Store(tmp_path / "c.duckdb") as store:
        free, _ = harness.training_free(tiny_backbone, fmnist, store, {}, set())
    waffle = next(c for c in free if c.method == "waffle")
    assert waffle.seeds == list(range(7)) and len(waffle.weights) == 7  # --reps 7
    images = F.normalize(torch.randn(25, tiny_backbone.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    scale = tiny_backbone.logit_scale
    for rep, weight in [(waffle.seeds[0], waffle.weights[0]), (waffle.seeds[-1], waffle.weights[-1])]:  # two draws: time
        texts = harness.waffle_texts(fmnist.classes, rep)
        per_class = [texts[i * 30 : (i + 1) * 30] for i in range(len(fmnist.classes))]
        with torch.inference_mode():
            encodings = [F.normalize(tiny_backbone.model.encode_text(tiny_backbone.tokenizer(v))) for v in per_class]
            theirs = torch.stack([(images @ v.T).mean(dim=1) for v in encodings], dim=1).numpy()
        ours = images.numpy() @ weight.T / scale
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
        assert np.array_equal(ours.argmax(1), theirs.argmax(1))
        # A renormalised class mean (what textadapt scored before) is a different score.
        renormalised = np.stack([v.mean(0) / v.mean(0).norm() for v in encodings]).T
        assert not np.allclose(images.numpy() @ renormalised, theirs, atol=1e-3)


# --------------------------------------------------------------------------------------------
# DCLIP: sachit-menon/classify_by_description_release at d1a3d89


def dclip_reference(descriptors: dict[str, list[str]]) -> dict[str, list[str]]:
    """loading_helpers.py ``load_gpt_descriptions`` lines 38-75 with main's hparams (load.py lines 38-66:
    category_name_inclusion 'prepend', before_text '', between_text ', ', after_text '',
    apply_descriptor_modification True), ``make_descriptor_sentence`` lines 20-28, ``wordify`` lines 16-18."""

    def make_descriptor_sentence(d):
        if d.startswith("a") or d.startswith("an"):
            return f"which is {d}"
        elif (
            d.startswith("has")
            or d.startswith("often")
            or d.startswith("typically")
            or d.startswith("may")
            or d.startswith("can")
        ):
            return f"which {d}"
        elif d.startswith("used"):
            return f"which is {d}"
        return f"which has {d}"

    out = {}
    for k, v in descriptors.items():
        if len(v) == 0:
            v = [""]  # line 55-56
        out[k] = [f"{k.replace('_', ' ')}, {make_descriptor_sentence(item)}" for item in v]
    return out


def test_dclip_sentences_and_score_are_the_references(tiny_backbone, fmnist, tmp_path):
    descriptors = {  # DCLIP's descriptor lists are lower-case and have no final period
        "T-shirt or top": [
            "a short-sleeved garment",
            "an item worn on the upper body",
            "has a round neck",
            "used for casual wear",
            "can be printed with designs",
            "often made of cotton",
            "typically loose",
            "short sleeves",
        ],
        "trouser": ["two long legs", "may have pockets", "a zip fly"],
        "pullover": [],  # no descriptor: DCLIP scores the class on its name with the empty descriptor
    }
    classes = list(descriptors)
    spec = fmnist.model_copy(update={"classes": classes})
    texts = [d for c in classes for d in descriptors[c]]
    labels = np.array([i for i, c in enumerate(classes) for _ in descriptors[c]])
    theirs_texts = dclip_reference(descriptors)
    ours_texts, ours_labels = harness.dclip_texts(classes, texts, labels)
    assert {c: [t for t, y in zip(ours_texts, ours_labels) if y == i] for i, c in enumerate(classes)} == theirs_texts

    ts = TrainingSet("attributes", texts, labels, [str(i) for i in range(len(texts))], len(texts))
    with Store(tmp_path / "c.duckdb") as store:
        free, _ = harness.training_free(tiny_backbone, spec, store, {"attributes": ts}, {"attributes"})
    dclip = next(c for c in free if c.method == "dclip:attributes")
    images = F.normalize(torch.randn(20, tiny_backbone.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.inference_mode():  # main.py lines 53-63: mean over each class's descriptor similarities
        encodings = [F.normalize(tiny_backbone.model.encode_text(tiny_backbone.tokenizer(v))) for v in theirs_texts.values()]
        theirs = torch.stack([(images @ v.T).mean(dim=1) for v in encodings], dim=1).numpy()
    ours = images.numpy() @ dclip.weights[0].T / tiny_backbone.logit_scale
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# CuPL: sarahpratt/CuPL at 719619c


def test_cupl_class_weights_are_the_references(tiny_backbone, fmnist, tmp_path):
    """classify_imagenet.py ``zeroshot_classifier_gpt`` lines 39-63 (use_both False): per class, the
    normalised embeddings of its descriptions (tokenised with truncate=True), averaged, renormalised."""
    described = {
        "T-shirt or top": [
            "A T-shirt is a short-sleeved top.",
            "It has a round neck and no buttons.",
            "A plain cotton shirt " + "with a small printed logo on its front " * 12 + ".",
        ],  # > 77 tokens
        "trouser": ["Trousers cover both legs from the waist to the ankles."],
    }
    classes = list(described)
    spec = fmnist.model_copy(update={"classes": classes})
    texts = [d for c in classes for d in described[c]]
    labels = np.array([i for i, c in enumerate(classes) for _ in described[c]])
    ts = TrainingSet("generic", texts, labels, [str(i) for i in range(len(texts))], len(texts))
    with Store(tmp_path / "c.duckdb") as store:
        free, _ = harness.training_free(tiny_backbone, spec, store, {"generic": ts}, set())
    cupl = next(c for c in free if c.method == "cupl:generic")
    weights = []
    with torch.inference_mode():
        for c in classes:
            class_embeddings = tiny_backbone.model.encode_text(tiny_backbone.tokenizer(described[c]))  # truncates at 77
            class_embeddings /= class_embeddings.norm(dim=-1, keepdim=True)
            class_embedding = class_embeddings.mean(dim=0)
            class_embedding /= class_embedding.norm()
            weights.append(class_embedding)
    theirs = torch.stack(weights, dim=1).numpy()  # (D, C): logits = image_features @ zeroshot_weights
    np.testing.assert_allclose(cupl.weights[0].T / tiny_backbone.logit_scale, theirs, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# TAP's head: jmiemirza/LaFTer at 9ced649 (TAP's code)


def test_tap_head_is_lafters_training_loop():
    """trainers/text_cls.py line 28 (``nn.Sequential(nn.Linear(512, C, bias=False))``, default init) and
    lines 105-112 (``train_txt_clas``: fresh N(0, 0.1^2) noise added to the normalised text features at
    every step); main.py lines 199-222 (AdamW over the head, lr --lr 0.001 (scripts/tap.sh), betas
    (0.9, 0.999), weight decay 0.01 for every parameter not named bias/LayerNorm), line 246
    (CrossEntropyLoss(label_smoothing=0.1)) and lines 247-251 (full batch, zero_grad, backward, step,
    ``txt_epochs`` steps). The reference draws its noise from torch's global stream after its other
    work; here both draw it from one generator seeded with the seed, and init the head right after
    torch.manual_seed(seed): the same stream, so the same weights."""
    gen = torch.Generator().manual_seed(3)
    n_classes, per_class, dim, steps, seed = 5, 8, 32, 60, 7777
    feats = F.normalize(torch.randn(n_classes * per_class, dim, generator=gen), dim=-1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)

    torch.manual_seed(seed)
    text_adapter = torch.nn.Sequential(torch.nn.Linear(dim, n_classes, bias=False))
    initial = text_adapter[0].weight.detach().clone()
    params = [(f"text_adapter.{k}", p) for k, p in text_adapter.named_parameters()]
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    groups = [
        {"params": [p for n, p in params if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in params if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=0.001, betas=(0.9, 0.999))
    criteria = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    noise_stream = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        noise = torch.randn(feats.shape, generator=noise_stream) * 0.1
        loss = criteria(text_adapter(feats.to(torch.float32) + noise), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    ours = train_adapter("tap-head", feats.numpy(), labels.numpy(), n_classes, TapRecipe(steps=steps, seed=seed))
    np.testing.assert_allclose(ours.weight, text_adapter[0].weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(ours.weight - initial.numpy()).max() > 1e-2  # it trained


def test_imagenet_templates_read_without_importing_open_clip_are_open_clips():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    ours = scoring.openclip_imagenet_templates()
    assert len(ours) == len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert ours == [t("{}") if callable(t) else t for t in OPENAI_IMAGENET_TEMPLATES]


# --------------------------------------------------------------------------------------------
# CoCa's caption likelihood: open_clip 3.3.0 (mlfoundations/open_clip tag v3.3.0)


def test_coca_caption_likelihood_is_open_clips_caption_loss():
    """log P(caption | image) is minus the caption loss CoCa is trained with, times the tokens it counts:
    src/open_clip/coca_model.py ``CoCa.forward`` lines 256-284 (labels = text[:, 1:], the decoder's
    teacher-forced logits) and src/open_clip/loss.py ``CoCaLoss`` lines 158-200 (CrossEntropyLoss with
    ignore_index = pad_id over logits.permute(0, 2, 1): the mean over the non-padding labels, EOT included)."""
    from open_clip.loss import CoCaLoss

    from textadapt.encoders import load_backbone

    coca = load_backbone("textadapt-tiny-coca:random", "cpu")
    model = coca.model
    captions = ["a photo of a cat.", "dog", "a photo of a small grey animal sitting on a red mat."]
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    pixels = torch.stack([coca.preprocess(im) for im in images])
    loss = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0, pad_id=model.pad_id)
    theirs = np.zeros((len(images), len(captions)))
    with torch.inference_mode():
        for i in range(len(images)):
            for j, caption in enumerate(captions):
                out = model(pixels[i : i + 1], coca.tokenizer([caption]))
                _, caption_loss = loss(
                    out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]
                )
                theirs[i, j] = -caption_loss.item() * int((out["labels"] != model.pad_id).sum())
    ours = caption_log_likelihood(coca, images, captions)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
