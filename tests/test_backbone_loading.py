"""The real open_clip loading path, offline: QuickGELU wherever the weights were trained with it, an
identity that changes with the activation, and the weights hash kept by file identity.

``ViT-B-32:openai`` resolves, as for any user, through the Hugging Face cache: open_clip's
pretrained config for the tag names the hub repository ``timm/vit_base_patch32_clip_224.openai``
and its file ``open_clip_model.safetensors``; with ``HF_HUB_OFFLINE=1`` huggingface_hub reads
``models--timm--vit_base_patch32_clip_224.openai/refs/main`` and the snapshot folder it names. The
session fixture writes seeded random ViT-B-32 weights there (no pretrained weights can be had on
this machine), with the ``open_clip_config.json`` the real repository carries beside them.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import TINY

from textadapt import encoders
from textadapt.encoders import load_backbone, save_checkpoint
from textadapt.store import Store

CLI = str(Path(sys.executable).parent / "textadapt")
REPO_ID = "timm/vit_base_patch32_clip_224.openai"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as refs/main names one
WEIGHTS_SEED = 1234


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory):
    """A Hugging Face cache holding seeded random ViT-B-32 weights under the ``openai`` tag's repository.
    Yields (HF_HOME, the weights file)."""
    from safetensors.torch import save_file

    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert cfg["hf_hub"].rstrip("/") == REPO_ID, "open_clip moved the openai tag: update the fixture"
    hf_home = tmp_path_factory.mktemp("hf-home")
    repo = hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHTS_SEED)
        model = open_clip.create_model("ViT-B-32")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "open_clip_model.safetensors"))
    model_cfg = {**open_clip.get_model_config("ViT-B-32"), "quick_gelu": True}  # what the hub repository's config says
    (snapshot / "open_clip_config.json").write_text(
        json.dumps(
            {"model_cfg": model_cfg, "preprocess_cfg": {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")}}
        )
    )
    return hf_home, snapshot / "open_clip_model.safetensors"


@pytest.fixture
def offline_hub(hf_cache, monkeypatch):
    """HF_HOME / HF_HUB_CACHE at the fixture's cache and HF_HUB_OFFLINE=1, as a user would set them.
    huggingface_hub reads these variables when it is imported (open_clip imported it already), so its
    constants are set too."""
    from huggingface_hub import constants

    hf_home, weights = hf_cache
    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "HF_HOME", env["HF_HOME"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return env, weights


def activations(tower: torch.nn.Module) -> set[str]:
    """The class names of the activation layers in the MLPs of a transformer tower."""
    return {type(block.mlp.gelu).__name__ for block in tower.resblocks}


def test_openai_tag_loads_the_cached_weights_with_quickgelu_towers(offline_hub, monkeypatch):
    from safetensors.torch import load_file

    _, weights = offline_hub
    bb = load_backbone("ViT-B-32:openai", "cpu")
    assert bb.weights == "openai" and not bb.untrained and bb.quick_gelu
    assert activations(bb.model.visual.transformer) == {"QuickGELU"}
    assert activations(bb.model.transformer) == {"QuickGELU"}  # the text tower
    assert not any(isinstance(m, torch.nn.GELU) for m in bb.model.modules())
    saved = load_file(str(weights))
    loaded = bb.model.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert bb.id.startswith("ViT-B-32-quickgelu@")
    # Loaded again, the weights are not hashed again: the hash is kept under the file open_clip resolved.
    calls = []
    monkeypatch.setattr(encoders, "weights_id", lambda *a, **k: calls.append(1))
    assert load_backbone("ViT-B-32:openai", "cpu").id == bb.id and not calls


def test_gelu_and_quickgelu_builds_of_the_same_weights_are_different_models(offline_hub, tmp_path):
    _, weights = offline_hub
    plain = tmp_path / "plain" / "open_clip_model.safetensors"  # the same file, with no config beside it
    plain.parent.mkdir()
    plain.symlink_to(weights)
    openai = load_backbone("ViT-B-32:openai", "cpu")
    gelu = load_backbone(f"ViT-B-32:{plain}", "cpu")
    assert not gelu.quick_gelu and activations(gelu.model.transformer) == {"GELU"}
    assert all(torch.equal(a, b) for a, b in zip(openai.model.state_dict().values(), gelu.model.state_dict().values()))
    # Same tensors, different model: the text embeddings differ, and so must every cache key.
    tokens = openai.tokenizer(["a photo of a sandal."])
    with torch.inference_mode():
        assert not torch.allclose(openai.model.encode_text(tokens), gelu.model.encode_text(tokens), atol=1e-4)
    assert gelu.id != openai.id and gelu.id.startswith("ViT-B-32@")
    # The QuickGELU model reached by every other route is the same model, with the same cache.
    for spec in (
        f"ViT-B-32-quickgelu:{plain}",  # open_clip's own -quickgelu config, the documented way for a local file
        f"ViT-B-32:{weights}",  # a hub snapshot whose open_clip_config.json says quick_gelu
        "ViT-B-32-quickgelu:openai",
        "ViT-B-32:auto",
    ):
        bb = load_backbone(spec, "cpu")
        assert bb.quick_gelu and bb.id == openai.id, spec
    hub = load_backbone(f"hf-hub:{REPO_ID}", "cpu")  # open_clip reads quick_gelu from the hub's config
    assert hub.quick_gelu and activations(hub.model.visual.transformer) == {"QuickGELU"}
    assert torch.equal(hub.model.state_dict()["text_projection"], openai.model.state_dict()["text_projection"])


def test_quickgelu_suffix_on_any_architecture():
    """``-quickgelu`` after an architecture open_clip has no such config for builds it with QuickGELU."""
    gelu, quick = load_backbone(TINY, "cpu"), load_backbone("textadapt-tiny-quickgelu:random", "cpu")
    assert not gelu.quick_gelu and quick.quick_gelu and quick.arch == "textadapt-tiny-quickgelu"
    assert gelu.id.split("@")[0] == "textadapt-tiny" and quick.id.split("@")[0] == "textadapt-tiny-quickgelu"
    assert gelu.id.split("@")[1] != quick.id.split("@")[1]


def test_weights_hash_is_kept_by_file_identity(tmp_path, tiny_backbone, home, monkeypatch):
    calls = []
    real = encoders.weights_id
    monkeypatch.setattr(encoders, "weights_id", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_backbone, path)
    first = load_backbone(f"textadapt-tiny:{path}", "cpu")
    assert len(calls) == 1 and first.id == tiny_backbone.id
    assert (home / encoders.HASH_CACHE).is_file()
    again = load_backbone(f"textadapt-tiny:{path}", "cpu")
    assert len(calls) == 1 and again.id == first.id  # not hashed again
    # The same file with another activation is another model: hashed, and a different id.
    quick = load_backbone(f"textadapt-tiny-quickgelu:{path}", "cpu")
    assert len(calls) == 2 and quick.id != first.id
    # A changed file is hashed again.
    sd = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    sd["text_projection"] += 1e-3
    from safetensors.torch import save_file

    save_file(sd, str(path))
    changed = load_backbone(f"textadapt-tiny:{path}", "cpu")
    assert len(calls) == 3 and changed.id != first.id
    # So is one whose contents stayed the same but which was written again (its mtime moved).
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert load_backbone(f"textadapt-tiny:{path}", "cpu").id == changed.id and len(calls) == 4
    # A damaged cache file costs a hash, not a failure.
    for damaged in ("{not json", "[]"):
        (home / encoders.HASH_CACHE).write_text(damaged)
        assert load_backbone(f"textadapt-tiny:{path}", "cpu").id == changed.id
    assert len(calls) == 6 and list(home.glob(".backbone_hashes.*")) == []  # no temporary file left behind


def test_a_run_with_the_openai_tag_uses_the_quickgelu_model(offline_hub, home, tmp_path):
    """The user's whole path: ``textadapt run fashion-mnist --backbone ViT-B-32:openai`` with the weights in the
    Hugging Face cache and no network completes, and every embedding it stored is the QuickGELU model's."""
    env, _ = offline_hub
    described = {"T-shirt or top": ["a short-sleeved top with a round neck"], "trouser": ["two long trouser legs side by side"]}
    (tmp_path / "d.json").write_text(json.dumps(described))
    run_env = {**os.environ, **env}
    imported = subprocess.run(
        [CLI, "descriptions", "import", str(tmp_path / "d.json"), "--dataset", "fashion-mnist", "--source", "tiny"],
        capture_output=True,
        text=True,
        env=run_env,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert imported.returncode == 0, imported.stdout + imported.stderr
    args = [
        "run",
        "fashion-mnist",
        "--backbone",
        "ViT-B-32:openai",
        "--templates",
        "",
        "--sources",
        "tiny",
        "--max-classes",
        "2",
        "--max-images",
        "40",
        "--samples",
        "1",
        "--steps",
        "5",
        "--seeds",
        "1",
    ]
    p = subprocess.run([CLI, *args], capture_output=True, text=True, env=run_env, timeout=900, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    expected = load_backbone("ViT-B-32:openai", "cpu")  # QuickGELU towers (the first test shows it)
    run_id = Path(re.search(r"report: (\S+\.md)", p.stdout).group(1)).stem
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        [(backbone,)] = s.sql(f"SELECT backbone FROM runs WHERE run_id = '{run_id}'")[1]
        [(n_images,)] = s.sql(f"SELECT count(*) FROM image_embeddings WHERE backbone = '{backbone}'")[1]
    assert backbone == expected.id and backbone.startswith("ViT-B-32-quickgelu@")
    assert n_images > 0
    assert "QuickGELU mismatch" not in p.stdout + p.stderr
