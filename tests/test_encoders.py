import numpy as np
import pytest
import torch
from conftest import TINY

from textadapt import TextadaptError
from textadapt.datasets import load_test_images, restrict
from textadapt.encoders import _hub_reachable, encode_images, encode_texts, load_backbone, save_checkpoint
from textadapt.store import Store


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_saved_checkpoint_loads_back_as_the_same_model(tmp_path, tiny_backbone, suffix):
    path = tmp_path / f"tiny{suffix}"
    save_checkpoint(tiny_backbone, path)
    loaded = load_backbone(f"textadapt-tiny:{path}", "cpu")
    assert loaded.id == tiny_backbone.id  # same weights -> same cache identity
    assert not loaded.untrained and loaded.weights == str(path)
    tokens = tiny_backbone.tokenizer(["a photo of a bag", "a sandal"])
    with torch.inference_mode():
        assert torch.equal(loaded.model.encode_text(tokens), tiny_backbone.model.encode_text(tokens))


def test_different_weights_have_a_different_identity(tmp_path, tiny_backbone):
    sd = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    sd["text_projection"] += 1e-3
    torch.save(sd, tmp_path / "changed.pt")
    assert load_backbone(f"textadapt-tiny:{tmp_path / 'changed.pt'}", "cpu").id != tiny_backbone.id


def test_random_weights_are_reproducible(tiny_backbone):
    assert load_backbone(TINY, "cpu").id == tiny_backbone.id
    assert tiny_backbone.untrained


def test_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(TextadaptError, match=r"model.pt: not a loadable textadapt-tiny checkpoint"):
        load_backbone(f"textadapt-tiny:{bad}", "cpu")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ViT-B-99:openai", r"unknown open_clip architecture 'ViT-B-99'"),
        ("ViT-B-32:nonsense", r"ViT-B-32 has no pretrained tag 'nonsense'; open_clip knows \[.*'openai'"),
        ("ViT-B-32", r"is not ARCH:WEIGHTS"),
        ("textadapt-tiny:/no/such/file.pt", r"checkpoint file not found: /no/such/file.pt"),
    ],
)
def test_bad_backbone_specs(spec, message):
    with pytest.raises(TextadaptError, match=message):
        load_backbone(spec, "cpu")


@pytest.mark.skipif(_hub_reachable(), reason="the Hugging Face hub is reachable: the weights would download")
def test_strict_pretrained_spec_offline_names_the_ways_out():
    with pytest.raises(TextadaptError) as e:
        load_backbone("ViT-B-32:openai", "cpu")
    for way in ("ViT-B-32:/path/to/", "ViT-B-32:auto", "ViT-B-32:random"):
        assert way in str(e.value)


def test_text_embeddings_are_cached_per_backbone(tmp_path, tiny_backbone):
    texts = ["a bag with handles.", "a sandal.", "a bag with handles."]
    with Store(tmp_path / "c.duckdb") as store:
        first, n1 = encode_texts(tiny_backbone, texts, store)
        again, n2 = encode_texts(tiny_backbone, texts, store)
        assert (n1, n2) == (2, 0)
        assert np.array_equal(first, again) and np.array_equal(first[0], first[2])
        assert np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
        tokens = tiny_backbone.tokenizer(texts[:1])
        with torch.inference_mode():
            direct = tiny_backbone.model.encode_text(tokens, normalize=True).numpy()[0]
        assert np.allclose(first[0], direct, atol=1e-6)


def test_image_embeddings_resume_from_the_cache(tmp_path, tiny_backbone, fmnist, home):
    spec, images = restrict(fmnist, load_test_images(fmnist, home), None, 40)
    with Store(tmp_path / "c.duckdb") as store:
        part, n1 = encode_images(tiny_backbone, images.take(range(25)), store, batch_size=10)  # the first 25 of the 40
        full, n2 = encode_images(tiny_backbone, images, store, batch_size=10)
    assert (n1, n2) == (25, 15)  # the second call encodes only what the first did not
    assert np.array_equal(part, full[:25])
