"""The shipped benchmark specs: canonical class names in label order, renderable prompts, loadable sources.

Class names are checked against the installed clip_benchmark package (or, where clip_benchmark
takes them from torchvision at run time, against the upstream lists in data/classnames/), and the
torchvision loading path runs for real on small fake copies of the datasets' own file layouts.
No downloads.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path

import clip_benchmark
import numpy as np
import pytest
import torchvision
from PIL import Image

from textadapt import TextadaptError
from textadapt.datasets import FolderSource, TorchvisionSource, load_spec, load_test_images, torchvision_images
from textadapt.prompts import check_templates, list_templates, render, templates_for

REPO = Path(__file__).resolve().parent.parent
SPECS = sorted((REPO / "data" / "datasets").glob("*.toml"))
UPSTREAM = REPO / "data" / "classnames"
CB = Path(clip_benchmark.__file__).parent / "datasets"
CB_NAMES = json.loads((CB / "en_classnames.json").read_text())
CB_TEMPLATES = json.loads((CB / "en_zeroshot_classification_templates.json").read_text())
TAP_STEPS = {
    "dtd": 5500,
    "eurosat": 400,
    "fgvc-aircraft": 500,
    "food101": 400,
    "flowers102": 600,
    "sun397": 2000,
    "ucf101": 1050,
    "imagenet-r": 5000,
}


def spec_named(name: str):
    return load_spec(REPO / "data" / "datasets" / f"{name}.toml")


def upstream(name: str) -> list[str]:
    return [line for line in (UPSTREAM / f"{name}.txt").read_text().splitlines() if line.strip()]


def builder_literal(name: str):
    import ast

    for node in ast.walk(ast.parse((CB / "builder.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(name)


def imagenet_r_pairs() -> list[tuple[str, str]]:
    keep = builder_literal("imagenet_r_wnids")
    return [(c, w) for c, w in zip(CB_NAMES["imagenet1k"], builder_literal("all_imagenet_wordnet_ids")) if w in keep]


# Where each spec's names come from. clip_benchmark's own list, read from the installed package...
CLIP_BENCHMARK = {
    "eurosat": "eurosat",
    "flowers102": "flowers",
    "oxford-pets": "pets",
    "gtsrb": "gtsrb",
    "country211": "country211",
}
# ...or what clip_benchmark builds at run time from torchvision's `classes` (the datasets' own files).
FROM_UPSTREAM = {
    "dtd": lambda: sorted(upstream("dtd")),  # torchvision sorts the folder names
    "food101": lambda: [c.replace("_", " ") for c in sorted(upstream("food101"))],  # sorted keys; clip_benchmark: "_" -> " "
    "sun397": lambda: [
        c[3:].replace("_", " ").replace("/", " ") for c in upstream("sun397")
    ],  # "/a/" dropped as torchvision does
    "stanford-cars": lambda: upstream("stanford_cars"),
    "fgvc-aircraft": lambda: upstream("fgvc_aircraft"),
    "cifar10": lambda: upstream("cifar10"),
    "cifar100": lambda: [c.replace("_", " ") for c in upstream("cifar100")],
    "stl10": lambda: upstream("stl10"),
    "resisc45": lambda: upstream("resisc45"),
    "ucf101": lambda: [" ".join(re.findall(r"[A-Z][^A-Z]*", c)) for c in upstream("ucf101")],
}
TEMPLATES_KEY = {
    "dtd": "dtd",
    "eurosat": "eurosat",
    "fgvc-aircraft": "fgvc_aircraft",
    "food101": "food101",
    "flowers102": "flowers",
    "sun397": "sun397",
    "ucf101": "imagenet1k",
    "imagenet-r": "imagenet1k",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "caltech101": "caltech101",
    "oxford-pets": "pets",
    "stanford-cars": "cars",
    "stl10": "stl10",
    "gtsrb": "gtsrb",
    "country211": "country211",
    "resisc45": "resisc45",
    "imagenet1k": "imagenet1k",
}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_spec_loads_with_unique_class_names(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert len({c.lower() for c in spec.classes}) == len(spec.classes)
    assert spec.train.steps > 0 and spec.images, "a spec needs training steps and at least one image source"


def test_the_shipped_benchmarks_are_there():
    have = {p.stem for p in SPECS}
    assert set(TAP_STEPS) <= have, f"TAP datasets missing: {set(TAP_STEPS) - have}"
    assert {"imagenet1k", "cifar10", "cifar100", "caltech101", "oxford-pets", "stanford-cars"} <= have


@pytest.mark.parametrize("name", sorted(TAP_STEPS))
def test_tap_datasets_train_for_taps_steps(name):
    assert spec_named(name).train.steps == TAP_STEPS[name]


@pytest.mark.parametrize("name", sorted(CLIP_BENCHMARK))
def test_class_names_are_clip_benchmarks_in_its_order(name):
    assert spec_named(name).classes == CB_NAMES[CLIP_BENCHMARK[name]]


def test_caltech101_is_clip_benchmarks_list_without_background():
    # torchvision's Caltech101 drops BACKGROUND_Google, the first of clip_benchmark's 102 names
    assert CB_NAMES["caltech101"][0] == "background"
    assert spec_named("caltech101").classes == CB_NAMES["caltech101"][1:]


def test_imagenet_r_is_clip_benchmarks_imagenet_subset_with_wordnet_folders():
    spec, pairs = spec_named("imagenet-r"), imagenet_r_pairs()
    assert len(pairs) == 200
    assert spec.classes == [c for c, _ in pairs]
    (folder,) = spec.images
    assert isinstance(folder, FolderSource) and folder.folders == [w for _, w in pairs]


def test_imagenet1k_differs_from_clip_benchmark_only_at_its_two_repeated_names():
    ours, theirs = spec_named("imagenet1k").classes, CB_NAMES["imagenet1k"]
    assert len(ours) == len(theirs) == 1000
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert len(differ) == 2
    for i in differ:  # each renamed class is one whose clip_benchmark name appeared before
        assert theirs[i] in theirs[:i]


@pytest.mark.parametrize("name", sorted(FROM_UPSTREAM))
def test_class_names_follow_the_datasets_own_lists(name):
    assert spec_named(name).classes == FROM_UPSTREAM[name]()


def test_every_spec_says_where_its_names_come_from():
    covered = set(CLIP_BENCHMARK) | set(FROM_UPSTREAM) | {"caltech101", "imagenet-r", "imagenet1k"}
    assert {p.stem for p in SPECS} - covered == {"fashion-mnist"}  # hand-written, checked against its labels


@pytest.mark.parametrize("name", sorted(TEMPLATES_KEY))
def test_zero_shot_templates_are_clip_benchmarks(name):
    spec = spec_named(name)
    assert spec.zeroshot.templates == [t.replace("{c}", "{}") for t in CB_TEMPLATES[TEMPLATES_KEY[name]]]
    for c in spec.classes:
        for t in spec.zeroshot.templates:
            text = t.replace("{}", c)  # as scoring.class_prompts fills them
            assert c in text and "{" not in text.replace(c, "") and "}" not in text.replace(c, "")


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_prompt_template_renders_for_every_class(path):
    spec = load_spec(path)
    templates = list_templates(REPO / "prompts")
    assert {t.template_set for t in templates} >= {"targeted", "contrastive", "attributes", "generic", "meta"}
    check_templates(templates, spec)  # raises on any undefined variable or empty prompt
    check_templates(templates_for(REPO / "prompts", None, spec), spec)  # with the spec's own targeted questions


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_taps_datasets_ask_their_own_targeted_questions_and_the_others_the_shipped_ones(path):
    spec = load_spec(path)
    targeted = templates_for(REPO / "prompts", ["targeted"], spec)
    assert len(targeted) == 5  # as many as the generic questions: the two sets differ only in the domain
    if spec.name not in TAP_STEPS:
        assert spec.prompting.targeted == [] and {t.path.parent.name for t in targeted} == {"targeted"}
        return
    assert [t.name for t in targeted] == [f"targeted/spec/{i}" for i in range(5)]
    # the dataset's domain is the head noun of every question (the texture of..., a satellite photo of...)
    head = {
        "dtd": "texture",
        "eurosat": "satellite",
        "fgvc-aircraft": "aircraft",
        "food101": "dish",
        "flowers102": "flower",
        "sun397": "scene",
        "ucf101": "person doing the action",
        "imagenet-r": "",
    }[spec.name]
    rendition = ("cartoon", "drawing", "sketch", "art", "sculpture")
    for i, t in enumerate(targeted):
        text = render(t, spec, spec.classes[0])
        assert text.endswith("? Answer in one sentence.") or text.endswith(". Answer in one sentence."), text
        assert (head in text) if head else (rendition[i] in text), text
        assert spec.classes[0].lower() in text.lower(), text


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_image_sources_name_real_torchvision_classes_and_arguments(path):
    spec = load_spec(path)
    for src in spec.images:
        if isinstance(src, TorchvisionSource):
            cls = getattr(torchvision.datasets, src.class_, None)
            assert inspect.isclass(cls), f"torchvision.datasets has no {src.class_}"
            inspect.signature(cls).bind(root="x", **src.kwargs)  # TypeError on an unknown argument
            if src.check_classes:  # the dataset must expose the `classes` the check compares with
                sources = [inspect.getsource(k) for k in cls.__mro__ if k.__module__.startswith("torchvision.datasets")]
                assert any("self.classes" in s for s in sources), f"torchvision's {src.class_} sets no classes"
        elif isinstance(src, FolderSource) and src.folders is not None:
            assert len(src.folders) == len(spec.classes) and len(set(src.folders)) == len(src.folders)


# ---- the torchvision path, on fake copies of the datasets' file layouts (real torchvision code)


def _jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (len(path.name) * 7 % 255, 40, 90)).save(path)


def _with_root(spec, root: Path):
    src = spec.images[0].model_copy(update={"root": str(root)})
    return spec.model_copy(update={"images": [src]})


def fake_dtd(root: Path, folders: list[str]) -> None:
    base = root / "dtd" / "dtd"
    lines = []
    for c in folders:
        for j in range(2):
            _jpg(base / "images" / c / f"{c}_{j:04d}.jpg")
            lines.append(f"{c}/{c}_{j:04d}.jpg")
    (base / "labels").mkdir(parents=True)
    (base / "labels" / "test1.txt").write_text("\n".join(lines) + "\n")


def test_dtd_loads_in_the_specs_class_order(tmp_path, home):
    spec = _with_root(spec_named("dtd"), tmp_path)
    fake_dtd(tmp_path, upstream("dtd"))
    images = load_test_images(spec, home)
    assert len(images) == 2 * 47 and images.source == "torchvision:DTD"
    for path, label in zip(images.images, images.labels):
        assert Path(path).parent.name == spec.classes[label]  # the file's class folder is the label's class
        assert Path(path).is_file()


def test_a_spec_in_the_wrong_order_is_refused_by_name(tmp_path, home):
    spec = _with_root(spec_named("dtd"), tmp_path)
    fake_dtd(tmp_path, upstream("dtd"))
    swapped = list(spec.classes)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(TextadaptError, match=r"class 0 is 'blotchy' in the spec but 'banded' in torchvision"):
        load_test_images(spec.model_copy(update={"classes": swapped}), home)


def test_food101_names_match_torchvisions_after_clip_benchmarks_renaming(tmp_path, home):
    spec = _with_root(spec_named("food101"), tmp_path)
    base = tmp_path / "food-101"
    raw = upstream("food101")
    for c in raw:
        _jpg(base / "images" / c / "1.jpg")
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "test.json").write_text(json.dumps({c: [f"{c}/1"] for c in raw}))
    images = load_test_images(spec, home)
    # torchvision's labels follow the sorted names ("cheese_plate" before "cheesecake", unlike meta/classes.txt)
    assert len(images) == 101
    for path, label in zip(images.images, images.labels):
        assert Path(path).parent.name.replace("_", " ") == spec.classes[label]


def test_sun397_labels_follow_classname_txt(tmp_path, home):
    spec = _with_root(spec_named("sun397"), tmp_path)
    base = tmp_path / "SUN397"
    raw = upstream("sun397")
    base.mkdir()
    (base / "ClassName.txt").write_text("\n".join(raw) + "\n")
    for c in reversed(raw):  # file-system order must not matter
        _jpg(base / c.lstrip("/") / "sun_a.jpg")
    images = load_test_images(spec, home)
    for path, label in zip(images.images, images.labels):
        assert "/" + str(Path(path).parent.relative_to(base)) == raw[label]


def test_caltech101_files_and_labels(tmp_path):
    base = tmp_path / "caltech101" / "101_ObjectCategories"
    for c, n in (("Faces", 2), ("BACKGROUND_Google", 1), ("accordion", 3)):
        for i in range(1, n + 1):
            _jpg(base / c / f"image_{i:04d}.jpg")
    (tmp_path / "caltech101" / "Annotations").mkdir()
    ds = torchvision.datasets.Caltech101(str(tmp_path), target_type="category")
    files, labels = torchvision_images(ds)
    assert labels.tolist() == [0, 0, 1, 1, 1]
    assert [Path(f).parent.name for f in files] == ["Faces"] * 2 + ["accordion"] * 3
    assert all(Path(f).is_file() for f in files)


def test_channel_first_arrays_become_images():
    class ChannelFirst:  # the in-memory layout of torchvision's STL10 and SVHN
        data = np.zeros((3, 3, 96, 96), dtype=np.uint8)
        labels = np.array([0, 1, 2])

    images, labels = torchvision_images(ChannelFirst())
    assert images[0].shape == (96, 96, 3) and labels.tolist() == [0, 1, 2]


def test_imagenet_r_folder_layout_loads(tmp_path, home):
    spec = spec_named("imagenet-r")
    src = spec.images[0].model_copy(update={"dir": str(tmp_path)})
    for w in src.folders:
        _jpg(tmp_path / "test" / w / "art_0.jpg")
    images = load_test_images(spec.model_copy(update={"images": [src]}), home)
    assert len(images) == 200 and [Path(p).parent.name for p in images.images] == src.folders


def test_the_committed_specs_are_what_the_script_writes():
    path = REPO / "scripts" / "make_dataset_specs.py"
    mod_spec = importlib.util.spec_from_file_location("make_dataset_specs", path)
    mod = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = mod  # dataclasses look their module up there
    mod_spec.loader.exec_module(mod)
    for d in mod.DEFS:
        assert (REPO / "data" / "datasets" / f"{d.name}.toml").read_text() == mod.render(d), (
            f"{d.name}.toml differs from what scripts/make_dataset_specs.py writes; re-run it"
        )
