"""The real open_clip loading path, offline: QuickGELU wherever the weights were trained with it, an
identity that changes with the activation, and the resolution record that gives a backbone's identity
without importing open_clip or building the model while nothing it was built from has changed.

``ViT-B-32:openai`` resolves, as for any user, through the Hugging Face cache: open_clip's
pretrained config for the tag names the hub repository ``timm/vit_base_patch32_clip_224.openai``
and its file ``open_clip_model.safetensors``; with ``HF_HUB_OFFLINE=1`` huggingface_hub reads
``models--timm--vit_base_patch32_clip_224.openai/refs/main`` and the snapshot folder it names. The
session fixture writes seeded random ViT-B-32 weights there (no pretrained weights can be had on
this machine), with the ``open_clip_config.json`` the real repository carries beside them.
"""

import json
import logging
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import TINY

from textadapt import encoders
from textadapt.datasets import load_test_images, restrict
from textadapt.encoders import embed_images, embed_texts, load_backbone, save_checkpoint
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


def use_hf_home(monkeypatch, hf_home: Path) -> dict:
    """HF_HOME / HF_HUB_CACHE at ``hf_home`` and HF_HUB_OFFLINE=1, as a user would set them.
    huggingface_hub reads these variables when it is imported (open_clip imported it already), so its
    constants are set too."""
    from huggingface_hub import constants

    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "HF_HOME", env["HF_HOME"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return env


@pytest.fixture
def offline_hub(hf_cache, monkeypatch):
    """The fixture's Hugging Face cache, offline (``use_hf_home``)."""
    hf_home, weights = hf_cache
    return use_hf_home(monkeypatch, hf_home), weights


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
    # Loaded again, it is neither built nor hashed: its record names the file open_clip resolved, unchanged.
    calls = []
    monkeypatch.setattr(encoders, "weights_id", lambda *a, **k: calls.append(1))
    again = load_backbone("ViT-B-32:openai", "cpu")
    assert again == bb and again.built is None and not calls
    # Built when first used, from the same cached file, with QuickGELU towers.
    assert activations(again.model.transformer) == {"QuickGELU"}
    assert all(torch.equal(again.model.state_dict()[k], saved[k]) for k in saved)


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


# A fresh process: what it imports, and the backbone it gets (the test reads the JSON it prints).
PROBE = """
import json, sys
from textadapt.encoders import load_backbone
bb = load_backbone(sys.argv[1], "cpu")
fields = ("id", "embed_dim", "quick_gelu", "untrained", "weights", "logit_scale")
print(json.dumps({**{f: getattr(bb, f) for f in fields}, "imported": sorted({"open_clip", "torchvision"} & set(sys.modules))}))
"""


def probe(spec: str) -> dict:
    p = subprocess.run([sys.executable, "-c", PROBE, spec], capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


def as_probed(bb) -> dict:
    fields = ("id", "embed_dim", "quick_gelu", "untrained", "weights", "logit_scale")
    return {**{f: getattr(bb, f) for f in fields}, "imported": []}


@pytest.mark.parametrize("kind", ["random", "checkpoint", "openai"])
def test_a_backbone_loaded_again_in_a_new_process_does_not_import_open_clip(kind, tmp_path, tiny_backbone, request):
    if kind == "random":
        spec = TINY
    elif kind == "checkpoint":
        save_checkpoint(tiny_backbone, tmp_path / "tiny.safetensors")
        spec = f"textadapt-tiny:{tmp_path / 'tiny.safetensors'}"
    else:
        request.getfixturevalue("offline_hub")
        spec = "ViT-B-32:openai"
    first = load_backbone(spec, "cpu")  # resolved and built here: the record is written
    assert first.built is not None
    assert probe(spec) == as_probed(first)


def test_a_recorded_backbone_is_built_on_first_use_and_encodes_as_the_eager_build(tmp_path, tiny_backbone, fmnist, home):
    texts = ["a photo of a sandal.", "a bag", "", "two long trouser legs side by side, seen from the front"]
    _, images = restrict(fmnist, load_test_images(fmnist, home), None, 8)
    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_backbone, path)
    for spec in (TINY, f"textadapt-tiny:{path}"):
        eager = load_backbone(spec, "cpu")
        lazy = load_backbone(spec, "cpu")
        assert lazy == eager and lazy.built is None
        np.testing.assert_array_equal(embed_texts(lazy, texts), embed_texts(eager, texts))
        np.testing.assert_array_equal(embed_images(lazy, images), embed_images(eager, images))
        assert lazy.built is not None
        # Built inside the encoder's inference_mode, its weights are still ones autograd can use (prompt learning).
        assert not any(p.is_inference() for p in lazy.model.parameters())
        # Pickled (as for another process), a backbone travels without its model and builds it where it is used.
        shipped = pickle.loads(pickle.dumps(eager))
        assert shipped == eager and shipped.built is None
        np.testing.assert_array_equal(embed_texts(shipped, texts), embed_texts(eager, texts))


def test_a_changed_checkpoint_or_config_beside_it_is_resolved_again(tmp_path, tiny_backbone, home, monkeypatch):
    from safetensors.torch import save_file

    calls = []
    real = encoders.weights_id
    monkeypatch.setattr(encoders, "weights_id", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_backbone, path)
    spec = f"textadapt-tiny:{path}"
    first = load_backbone(spec, "cpu")
    assert len(calls) == 1 and first.id == tiny_backbone.id and (home / encoders.RECORDS).is_file()
    again = load_backbone(spec, "cpu")
    assert len(calls) == 1 and again.built is None and again.id == first.id  # neither built nor hashed
    # The same file with another activation is another spec and another model.
    quick = load_backbone(f"textadapt-tiny-quickgelu:{path}", "cpu")
    assert len(calls) == 2 and quick.quick_gelu and quick.id != first.id
    # A changed file is resolved again.
    sd = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    sd["text_projection"] += 1e-3
    save_file(sd, str(path))
    changed = load_backbone(spec, "cpu")
    assert len(calls) == 3 and changed.built is not None and changed.id != first.id
    # So is one whose contents stayed the same but which was written again (its mtime moved).
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert load_backbone(spec, "cpu").id == changed.id and len(calls) == 4
    assert load_backbone(spec, "cpu").built is None and len(calls) == 4
    # An open_clip_config.json that appears beside it and says quick_gelu makes it another model.
    (path.parent / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    beside = load_backbone(spec, "cpu")
    assert len(calls) == 5 and beside.quick_gelu and beside.id.startswith("textadapt-tiny-quickgelu@")
    # A damaged records file costs a build, not a failure.
    for damaged in ("{not json", "[]", json.dumps({k: {"key": 1} for k in json.loads((home / encoders.RECORDS).read_text())})):
        (home / encoders.RECORDS).write_text(damaged)
        assert load_backbone(spec, "cpu").id == beside.id
    assert len(calls) == 8 and list(home.glob(".backbones.*")) == []  # no temporary file left behind


@pytest.mark.parametrize("package", ["open_clip", "torch"])
def test_another_open_clip_or_torch_version_resolves_again(package, monkeypatch, tiny_backbone):
    assert load_backbone(TINY, "cpu").built is not None  # this test's home has no record yet
    assert load_backbone(TINY, "cpu").built is None
    if package == "torch":
        monkeypatch.setattr(torch, "__version__", "0.0.1+other")
    else:
        real = encoders._version
        monkeypatch.setattr(encoders, "_version", lambda name: "0.0.1+other" if name == "open_clip_torch" else real(name))
    other = load_backbone(TINY, "cpu")
    assert other.built is not None and other.id == tiny_backbone.id  # built: the seeded init may differ there
    assert load_backbone(TINY, "cpu").built is None  # and recorded under that version


def test_auto_without_weights_is_recorded_untrained_until_they_are_in_the_hub_cache(hf_cache, tmp_path, monkeypatch, caplog):
    if encoders._hub_reachable():
        pytest.skip("the Hugging Face hub is reachable: auto would download the weights")
    use_hf_home(monkeypatch, tmp_path / "empty-hf-home")
    with caplog.at_level(logging.WARNING, logger="textadapt.encoders"):
        first = load_backbone("ViT-B-32:auto", "cpu")
        said = [r.getMessage() for r in caplog.records if "UNTRAINED" in r.getMessage()]
        caplog.clear()
        again = load_backbone("ViT-B-32:auto", "cpu")
        said_again = [r.getMessage() for r in caplog.records if "UNTRAINED" in r.getMessage()]
    assert first.untrained and first.weights == "random" and first.built is not None
    assert again == first and again.built is None
    # The user is told on every load, with the reason found when it was resolved.
    assert len(said) == 1 and said_again == said
    assert said[0].startswith("no pretrained weights for ViT-B-32 (") and said[0].endswith("using UNTRAINED weights")

    def resolve_anew(*args):
        raise RuntimeError("resolved anew")

    # With a route to the hub, auto would download the weights: the record is not used.
    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="resolved anew"):
        m.setattr(encoders, "_hub_reachable", lambda timeout=3.0: True)
        m.setattr(encoders, "_resolve", resolve_anew)
        load_backbone("ViT-B-32:auto", "cpu")
    # Once the weights are in the Hugging Face cache, auto loads them: the untrained record is not used.
    use_hf_home(monkeypatch, hf_cache[0])
    pretrained = load_backbone("ViT-B-32:auto", "cpu")
    assert not pretrained.untrained and pretrained.weights == "openai" and pretrained.quick_gelu
    assert pretrained.id == load_backbone("ViT-B-32:openai", "cpu").id != first.id
    assert load_backbone("ViT-B-32:auto", "cpu").built is None  # and that is recorded in turn


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
    # Run again, nothing changed: every embedding is cached, so open_clip is never imported (-X importtime lists
    # every module the process imports), and the run's backbone is the same.
    again = subprocess.run(
        [CLI, *args], capture_output=True, text=True, env={**run_env, "PYTHONPROFILEIMPORTTIME": "1"}, timeout=900,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr[-5000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")}
    assert "textadapt.encoders" in imported and "torch" in imported  # the listing is complete
    assert not {m for m in imported if m.split(".")[0] in ("open_clip", "torchvision", "timm")}
    assert "0 texts encoded" in again.stdout and "report: " in again.stdout
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        assert s.sql("SELECT DISTINCT backbone FROM runs")[1] == [(expected.id,)]
