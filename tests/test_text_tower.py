"""Length-aware text encoding (textadapt.text_tower) against open_clip's own ``model.encode_text``.

Every open_clip 3.3.0 text-tower family that builds here (random weights; Hugging Face text towers
need ``transformers``, which is not installed): the real ViT-B-32, RN50 and coca_ViT-B-32 configs,
textadapt's tiny configs, and tiny towers with the text flags of the shipped EVA / MobileCLIP-B,
PE-Core (32-token context), worldwide (eos pooling), SigLIP, CLIPA and MobileCLIP-S configs.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import TextTransformer

import textadapt.text_tower as text_tower
from textadapt.encoders import _register_configs, embed_texts, encode_texts
from textadapt.store import Store
from textadapt.text_tower import causal_tower, iter_text_features

CUPL = Path(importlib.util.find_spec("clip_benchmark").submodule_search_locations[0]) / "datasets" / "cupl_prompts.json"
TEXTS = (
    [
        "",  # start and end of text only
        "a photo of a cat.",
        "Ünïcödé: 日本語のテキスト, café crème brûlée, Ελληνικά 🐱",
        " ".join(["a very long description"] * 40),  # truncated to the context, end-of-text in the last position
        "wow!! what a bag!",  # '!' is token 0, CoCa's padding id: masked like padding by open_clip itself
    ]
    + [d for descriptions in list(json.loads(CUPL.read_text())["imagenet1k"].values())[:3] for d in descriptions[:3]]
)
TOL = 1e-5  # measured: max differences 5e-8 to 2e-7


def _model(arch: str, **kwargs) -> torch.nn.Module:
    _register_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return open_clip.create_model(arch, **kwargs).eval()


def _tiny_text(**flags) -> dict:
    return {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, **flags}


def _features(model, tokenizer, texts, batch_size) -> torch.Tensor:
    with torch.inference_mode():
        out = None
        for idx, f in iter_text_features(model, tokenizer, texts, batch_size):
            out = torch.zeros(len(texts), f.shape[1]) if out is None else out
            out[idx] = f
    return out


def _reference(model, tokens) -> torch.Tensor:
    with torch.inference_mode():
        return model.encode_text(tokens, normalize=True)


def _positions_run(model, tokenizer, texts, batch_size) -> list[int]:
    """How many positions the text transformer was given, batch by batch."""
    tower = model.transformer if hasattr(model, "attn_mask") else model.text.transformer
    seen = []
    handle = tower.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].shape[1]), with_kwargs=True)
    try:
        _features(model, tokenizer, texts, batch_size)
    finally:
        handle.remove()
    return seen


CAUSAL = {
    # name: (open_clip model name, create_model overrides, tokenizer model name)
    "ViT-B-32": ("ViT-B-32", {}, "ViT-B-32"),
    "RN50": ("RN50", {}, "RN50"),
    "coca_ViT-B-32": ("coca_ViT-B-32", {}, "coca_ViT-B-32"),
    "textadapt-tiny": ("textadapt-tiny", {}, "textadapt-tiny"),
    "textadapt-tiny-coca": ("textadapt-tiny-coca", {}, "textadapt-tiny-coca"),
    "EVA/MobileCLIP-B kind (TextTransformer)": ("textadapt-tiny", {"force_custom_text": True}, "textadapt-tiny"),
    "PE-Core kind (32-token context, linear projection with bias)": (
        "textadapt-tiny",
        {"force_custom_text": True, "text_cfg": _tiny_text(context_length=32, proj_bias=True)},
        "PE-Core-B-16",
    ),
}


@pytest.mark.parametrize("name", list(CAUSAL))
def test_length_aware_encoding_equals_open_clip(name):
    arch, overrides, tokenizer_of = CAUSAL[name]
    model, tokenizer = _model(arch, **overrides), open_clip.get_tokenizer(tokenizer_of)
    assert causal_tower(model) is not None, "a causal tower must take the length-aware path"
    reference = _reference(model, tokenizer(TEXTS))
    # Which texts share a batch must not matter; the full-size models (~10 s each here) run one batch size.
    for batch_size in (1, 3, len(TEXTS)) if "tiny" in arch else (4,):
        got = _features(model, tokenizer, TEXTS, batch_size)
        assert (got - reference).abs().max() < TOL, f"{name}, batch size {batch_size}"


def test_coca_class_token_with_open_clips_corrected_padding_mask():
    """TextTransformer's correct_cls_mask (not reachable from a 3.3.0 config): the class token's keys unshifted."""
    model, tokenizer = _model("textadapt-tiny-coca"), open_clip.get_tokenizer("textadapt-tiny-coca")
    model.text.correct_cls_mask = True
    reference = _reference(model, tokenizer(TEXTS))
    assert (_features(model, tokenizer, TEXTS, 4) - reference).abs().max() < TOL


def test_eos_pooled_tower_worldwide_kind():
    """CLIP with eos pooling (the worldwide configs: an HF tokenizer, eos id 1 or 2): pooled at the first eos."""
    model = _model("textadapt-tiny", text_cfg=_tiny_text(pool_type="eos", eos_id=2))
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in (1, 3, 10, 40, 77):  # 77: truncated, no eos at all (pooled at position 0, as open_clip does)
        row = torch.ones(77, dtype=torch.long)  # padding
        row[:length] = torch.randint(3, 49408, (length,), generator=g)
        if length < 77:
            row[length - 1] = 2
        rows.append(row)
    tokens = torch.stack(rows)
    tower = causal_tower(model)
    assert tower is not None and tower.lengths(tokens).tolist() == [1, 3, 10, 40, 1]
    with torch.inference_mode():
        got = torch.nn.functional.normalize(tower.encode(tokens), dim=-1)
    assert (got - _reference(model, tokens)).abs().max() < TOL


NOT_CAUSAL = {
    "SigLIP kind (bidirectional, pooled last)": (
        "textadapt-tiny",
        {
            "force_custom_text": True,
            "text_cfg": _tiny_text(
                context_length=64, no_causal_mask=True, pool_type="last", proj_bias=True, norm_kwargs={"eps": 1e-6}
            ),
        },
    ),
    "CLIPA kind (inline, bidirectional, pooled last)": (
        "textadapt-tiny",
        {"text_cfg": _tiny_text(context_length=32, no_causal_mask=True, pool_type="last")},
    ),
    "MobileCLIP-S kind (bidirectional, argmax)": (
        "textadapt-tiny",
        {"force_custom_text": True, "text_cfg": _tiny_text(no_causal_mask=True)},
    ),
}


@pytest.mark.parametrize("name", list(NOT_CAUSAL))
def test_towers_that_are_not_causal_run_open_clip_at_full_length(name):
    arch, overrides = NOT_CAUSAL[name]
    model = _model(arch, **overrides)
    context = (model.text if hasattr(model, "text") else model).context_length
    tokenizer = open_clip.get_tokenizer("textadapt-tiny", context_length=context)
    assert causal_tower(model) is None
    assert set(_positions_run(model, tokenizer, TEXTS, 4)) == {context}
    assert (_features(model, tokenizer, TEXTS, 4) - _reference(model, tokenizer(TEXTS))).abs().max() < TOL


class _ShiftedTextTransformer(TextTransformer):
    """A text tower that is not open_clip's own class: its forward adds a learned offset."""

    def forward(self, text):
        return super().forward(text) + 1.0


def test_a_text_tower_of_another_class_runs_its_own_forward():
    model, tokenizer = _model("textadapt-tiny", force_custom_text=True), open_clip.get_tokenizer("textadapt-tiny")
    shifted = _ShiftedTextTransformer(context_length=77, width=64, heads=2, layers=2, output_dim=64)
    shifted.load_state_dict(model.text.state_dict())
    model.text = shifted.eval()
    assert causal_tower(model) is None
    assert (_features(model, tokenizer, TEXTS, 4) - _reference(model, tokenizer(TEXTS))).abs().max() < TOL


def test_each_batch_runs_only_up_to_its_longest_end_of_text():
    model, tokenizer = _model("textadapt-tiny"), open_clip.get_tokenizer("textadapt-tiny")
    texts = ["a cat.", "a dog.", "a photo of a small red bag with two handles.", "a shoe."]  # 5, 5, 13, 5 tokens
    assert _positions_run(model, tokenizer, texts, 2) == [13, 5]  # longest first; the short ones share a batch
    assert _positions_run(model, tokenizer, texts, 4) == [13]


def test_sorting_windows_do_not_change_the_embeddings(monkeypatch):
    model, tokenizer = _model("textadapt-tiny"), open_clip.get_tokenizer("textadapt-tiny")
    whole = _features(model, tokenizer, TEXTS, 2)
    monkeypatch.setattr(text_tower, "SORT_WINDOW", 4)  # several windows, each sorted on its own
    assert (_features(model, tokenizer, TEXTS, 2) - whole).abs().max() < TOL


def test_embed_texts_keeps_the_order_and_the_cache_keys(tmp_path, tiny_backbone):
    """The user's path: embeddings come back in the order given, and each is cached under its own text."""
    reference = _reference(tiny_backbone.model, tiny_backbone.tokenizer(TEXTS)).numpy()
    assert np.abs(embed_texts(tiny_backbone, TEXTS, 3) - reference).max() < TOL
    assert embed_texts(tiny_backbone, [], 3).shape == (0, tiny_backbone.embed_dim)
    with Store(tmp_path / "c.duckdb") as store:
        encode_texts(tiny_backbone, TEXTS, store, batch_size=2)  # sorted by length, stored batch by batch
        cached, n = encode_texts(tiny_backbone, list(reversed(TEXTS)), store, batch_size=2)
    assert n == 0
    assert np.abs(cached[::-1] - reference).max() < TOL
