"""Write the benchmark dataset specs in data/datasets/ from their canonical sources.

Class names and zero-shot templates are never typed here: they come from the installed
clip_benchmark package (en_classnames.json, en_zeroshot_classification_templates.json, and the
ImageNet-R WordNet ids in its builder.py) or, for the datasets clip_benchmark names only through
torchvision at run time, from the upstream lists in data/classnames/ (see its README). What is
written here is the wording targeted prompts use, the training steps and where the images are.

    python scripts/make_dataset_specs.py            # rewrite every spec listed below
    python scripts/make_dataset_specs.py dtd sun397 # only these

The TOML files are what textadapt reads and what is committed; tests/test_dataset_specs.py checks
them against the same sources.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "data" / "datasets"
UPSTREAM = ROOT / "data" / "classnames"

sys.path.insert(0, str(ROOT))  # this checkout's textadapt, also when run without an install
from textadapt.datasets import TAP_STEPS, default_steps  # noqa: E402  (TAP's steps per dataset, and the rule for the others)

# TAP's eight datasets carry their own targeted questions (TAP wrote them per dataset, the domain as the head
# noun: "the texture of {c}", "a satellite photo of {c}"). Ours, in our own wording, are TAP's five generic
# questions (prompts/generic: describe, identify, look, internet, caption), in this order, each with the
# dataset's domain as the head noun; textadapt appends " Answer in one sentence." to each.
C, A = "{{ class_name }}", "{{ class_name | article }}"
TARGETED = {
    "dtd": [
        f"Describe what {A} texture looks like.",
        f"How can you identify {A} texture on a surface?",
        f"What does {A} surface texture look like up close?",
        f"Describe a close-up photo from the internet of {A} texture.",
        f"Write a short caption of a close-up photo of {A} texture.",
    ],
    "eurosat": [
        f"Describe what {C} looks like in a satellite photo.",
        f"How can you identify {C} from a satellite?",
        f"What does {C} look like from a satellite, seen from straight above?",
        f"Describe a satellite photo from the internet of {C}.",
        f"Write a short caption of a satellite photo of {C}.",
    ],
    "fgvc-aircraft": [
        f"Describe what the {C} aircraft looks like.",
        f"How can you identify the {C} aircraft model?",
        f"What does the {C} aircraft look like in a photo?",
        f"Describe a photo from the internet of the {C} aircraft.",
        f"Write a short caption of a photo of the {C} aircraft.",
    ],
    "food101": [
        f"Describe what the dish {C} looks like.",
        f"How can you identify the dish {C} on a plate?",
        f"What does a serving of the dish {C} look like?",
        f"Describe a food photo from the internet of the dish {C}.",
        f"Write a short caption of a food photo of the dish {C}.",
    ],
    "flowers102": [
        f"Describe what {A}, a type of flower, looks like.",
        f"How can you identify {A}, a type of flower?",
        f"What does {A}, a type of flower, look like in bloom?",
        f"Describe a photo from the internet of {A}, a type of flower.",
        f"Write a short caption of a photo of {A}, a type of flower.",
    ],
    "sun397": [
        f"Describe what the scene of {A} looks like.",
        f"How can you identify the scene of {A} in a photo?",
        f"What does the scene of {A} look like?",
        f"Describe a photo from the internet of the scene of {A}.",
        f"Write a short caption of a photo of the scene of {A}.",
    ],
    "ucf101": [
        "Describe what a person doing the action {{ class_name | lower }} looks like.",
        "How can you identify a person doing the action {{ class_name | lower }} in a video frame?",
        "What does a person doing the action {{ class_name | lower }} look like?",
        "Describe a video frame from the internet of a person doing the action {{ class_name | lower }}.",
        "Write a short caption of a video frame of a person doing the action {{ class_name | lower }}.",
    ],
    "imagenet-r": [
        f"Describe what a cartoon of {A} looks like.",
        f"How can you identify {A} in a drawing or a painting?",
        f"What does a sketch of {A} look like?",
        f"Describe a piece of art from the internet that depicts {A}.",
        f"Write a short caption of a sculpture, toy or origami of {A}.",
    ],
}


def clip_benchmark_dir() -> Path:
    import clip_benchmark

    return Path(clip_benchmark.__file__).parent / "datasets"


def cb_classnames() -> dict[str, list[str]]:
    return json.loads((clip_benchmark_dir() / "en_classnames.json").read_text())


def cb_templates() -> dict[str, list[str]]:
    return json.loads((clip_benchmark_dir() / "en_zeroshot_classification_templates.json").read_text())


def cb_builder_literal(name: str):
    """A literal assigned in clip_benchmark's builder.py (read, not imported: it is a local)."""
    tree = ast.parse((clip_benchmark_dir() / "builder.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(f"clip_benchmark's builder.py assigns no {name}")


def imagenet_r() -> tuple[list[str], list[str]]:
    """ImageNet-R's 200 classes as clip_benchmark builds them: ImageNet-1k names masked by its WordNet ids."""
    wnids, keep = cb_builder_literal("all_imagenet_wordnet_ids"), cb_builder_literal("imagenet_r_wnids")
    pairs = [(c, w) for c, w in zip(cb_classnames()["imagenet1k"], wnids) if w in keep]
    return [c for c, _ in pairs], [w for _, w in pairs]


def upstream(name: str) -> list[str]:
    return [line.rstrip("\n") for line in (UPSTREAM / f"{name}.txt").read_text().splitlines() if line.strip()]


def sun397_name(raw: str) -> str:
    """ClassName.txt line -> torchvision's class (drop "/a/") -> clip_benchmark's name ("_", "/" to spaces)."""
    return raw[3:].strip().replace("_", " ").replace("/", " ")


def ucf101_folder(raw: str) -> str:
    """classInd.txt name -> CoOp's folder name: split before capitals, join with "_" (ApplyEyeMakeup -> Apply_Eye_Makeup)."""
    return "_".join(re.findall(r"[A-Z][^A-Z]*", raw))


def class_names(name: str) -> list[str]:
    """The class list of every spec, by name: the single place the sources are mapped."""
    cb = cb_classnames()
    return {
        "eurosat": lambda: cb["eurosat"],
        "flowers102": lambda: cb["flowers"],
        "oxford-pets": lambda: cb["pets"],
        "caltech101": lambda: cb["caltech101"][1:],  # torchvision drops BACKGROUND_Google, clip_benchmark's first
        "gtsrb": lambda: cb["gtsrb"],
        "country211": lambda: cb["country211"],
        "imagenet-r": lambda: imagenet_r()[0],
        "dtd": lambda: sorted(upstream("dtd")),  # torchvision sorts the folder names
        "food101": lambda: [c.replace("_", " ") for c in sorted(upstream("food101"))],  # torchvision sorts meta's keys
        "sun397": lambda: [sun397_name(c) for c in upstream("sun397")],
        "stanford-cars": lambda: upstream("stanford_cars"),
        "fgvc-aircraft": lambda: upstream("fgvc_aircraft"),
        "cifar10": lambda: upstream("cifar10"),
        "cifar100": lambda: [c.replace("_", " ") for c in upstream("cifar100")],
        "stl10": lambda: upstream("stl10"),
        "resisc45": lambda: upstream("resisc45"),
        "ucf101": lambda: [ucf101_folder(c).replace("_", " ") for c in upstream("ucf101")],
    }[name]()


@dataclass
class Def:
    name: str
    title: str
    about: str  # header comment: the dataset and its test split
    names_from: str  # header comment: where the class names come from
    templates_key: str  # key in clip_benchmark's template file
    domain: str
    category: str
    task: str
    images: list[dict] = field(default_factory=list)
    steps_note: str = ""


def tv(cls: str, how: str, check: bool = False, **kwargs) -> dict:
    return {"kind": "torchvision", "class": cls, "kwargs": kwargs, "check_classes": check, "how": how}


DOWNLOAD = "needs network access: torchvision downloads it into $TEXTADAPT_HOME/images"

DEFS = [
    # ---- TAP's eight datasets
    Def(
        "dtd",
        "DTD (Describable Textures)",
        "47 texture classes; test split of DTD's partition 1 (1,880 images). CoOp/TAP use their own split file.",
        "torchvision's DTD classes (image folder names, sorted), as clip_benchmark takes them",
        "dtd",
        "a close-up photo of a surface texture",
        "texture",
        "Recognise which of 47 describable texture patterns a close-up photo of a surface shows.",
        [tv("DTD", DOWNLOAD, True, split="test", partition=1)],
    ),
    Def(
        "eurosat",
        "EuroSAT (RGB)",
        "10 land use and land cover classes in 64x64 Sentinel-2 satellite photos. torchvision has no split: "
        "all 27,000 images are the test set (CoOp/TAP use their own split file).",
        "clip_benchmark's en_classnames.json (CLIP's names, in torchvision's sorted folder order)",
        "eurosat",
        "a centered satellite photo",
        "land cover type",
        "Recognise the land use or land cover shown in a small centered Sentinel-2 satellite photo.",
        [tv("EuroSAT", DOWNLOAD)],
    ),
    Def(
        "fgvc-aircraft",
        "FGVC-Aircraft",
        "100 aircraft model variants; official test split (3,333 images).",
        "torchvision's FGVCAircraft classes (data/variants.txt, annotation_level variant), as clip_benchmark takes them",
        "fgvc_aircraft",
        "a photo of an aircraft",
        "aircraft model",
        "Recognise the exact aircraft model variant in a photo of an aeroplane.",
        [tv("FGVCAircraft", DOWNLOAD, True, split="test", annotation_level="variant")],
    ),
    Def(
        "food101",
        "Food-101",
        "101 food dishes; official test split (25,250 images).",
        "torchvision's Food101 classes (meta's class names, sorted: cheese_plate before cheesecake) with '_' as spaces, as clip_benchmark does",
        "food101",
        "a photo of a food dish",
        "dish",
        "Recognise which of 101 dishes a photo of food shows.",
        [tv("Food101", DOWNLOAD, True, split="test")],
    ),
    Def(
        "flowers102",
        "Oxford Flowers-102",
        "102 flower species; official test split (6,149 images).",
        "clip_benchmark's en_classnames.json (label order of imagelabels.mat)",
        "flowers",
        "a photo of a flower",
        "flower",
        "Recognise which of 102 flower species common in the United Kingdom a photo shows.",
        [tv("Flowers102", DOWNLOAD, split="test")],
    ),
    Def(
        "sun397",
        "SUN397",
        "397 scene categories. torchvision has no split: all 108,754 images are the test set "
        "(CoOp/TAP use their own split file).",
        "torchvision's SUN397 classes (ClassName.txt) with '_' and '/' as spaces, as clip_benchmark does",
        "sun397",
        "a photo of a scene",
        "scene",
        "Recognise which of 397 scene categories (places, rooms, landscapes) a photo shows.",
        [tv("SUN397", DOWNLOAD, True)],
    ),
    Def(
        "ucf101",
        "UCF101 (middle frames)",
        "101 human actions; one image per video: its middle frame, as CoOp and TAP use it (test split of "
        "CoOp's split_zhou_UCF101.json, 3,783 frames).",
        "classInd.txt's order (CoOp's labels); names split at capitals as CoOp does (ApplyEyeMakeup -> "
        "Apply Eye Makeup). clip_benchmark has no UCF101: its zero-shot fallback, the ImageNet templates",
        "imagenet1k",
        "a video frame of a person performing an action",
        "action",
        "Recognise which of 101 human actions a person performs in a frame from a YouTube video.",
        [
            {
                "kind": "folder",
                "dir": "~/data/ucf101",
                "how": "put the middle frame of each test video of CoOp's split_zhou_UCF101.json (from UCF-101-midframes) "
                "in ~/data/ucf101/test/<CoOp class folder>/, e.g. test/Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg",
            }
        ],
    ),
    Def(
        "imagenet-r",
        "ImageNet-R (renditions)",
        "200 ImageNet classes as art, cartoons, sketches, paintings, origami, toys, tattoos... (30,000 images).",
        "clip_benchmark: ImageNet-1k's names (en_classnames.json) of the 200 WordNet ids in its builder.py, "
        "in WordNet-id order. clip_benchmark has no ImageNet-R templates: its fallback, the ImageNet ones",
        "imagenet1k",
        "an artistic rendition such as a cartoon, sketch, painting, sculpture, origami, toy or tattoo",
        "object",
        "Recognise which of 200 ImageNet categories an artistic rendition (art, cartoon, sketch, toy...) depicts.",
        [
            {
                "kind": "folder",
                "dir": "~/data/imagenet-r",
                "how": "wget https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar && mkdir -p ~/data/imagenet-r && "
                "tar xf imagenet-r.tar -C ~/data/imagenet-r && mv ~/data/imagenet-r/imagenet-r ~/data/imagenet-r/test",
            }
        ],
    ),
    # ---- the usual CLIP benchmarks
    Def(
        "cifar10",
        "CIFAR-10",
        "10 classes of 32x32 photos; official test split (10,000 images).",
        "torchvision's CIFAR10 classes (batches.meta), as clip_benchmark takes them",
        "cifar10",
        "a tiny low-resolution photo",
        "object",
        "Recognise which of 10 common objects or animals a tiny 32x32 photo shows.",
        [tv("CIFAR10", DOWNLOAD, True, train=False)],
    ),
    Def(
        "cifar100",
        "CIFAR-100",
        "100 classes of 32x32 photos; official test split (10,000 images).",
        "torchvision's CIFAR100 classes (fine_label_names) with '_' as spaces (clip_benchmark keeps the '_')",
        "cifar100",
        "a tiny low-resolution photo",
        "object",
        "Recognise which of 100 objects, animals, plants, people or scenes a tiny 32x32 photo shows.",
        [tv("CIFAR100", DOWNLOAD, True, train=False)],
    ),
    Def(
        "caltech101",
        "Caltech-101",
        "101 object classes; torchvision has no split: all 8,677 images (BACKGROUND_Google left out) are the test set.",
        "clip_benchmark's en_classnames.json without its first name, 'background': torchvision's Caltech101 "
        "drops the BACKGROUND_Google folder that clip_benchmark's own loader keeps",
        "caltech101",
        "a photo of an object",
        "object",
        "Recognise which of 101 object categories a photo shows.",
        [tv("Caltech101", DOWNLOAD, target_type="category")],
    ),
    Def(
        "oxford-pets",
        "Oxford-IIIT Pet",
        "37 cat and dog breeds; official test split (3,669 images).",
        "clip_benchmark's en_classnames.json (the same as torchvision's OxfordIIITPet classes)",
        "pets",
        "a photo of a pet",
        "pet breed",
        "Recognise which of 37 cat and dog breeds a photo of a pet shows.",
        [tv("OxfordIIITPet", DOWNLOAD, True, split="test", target_types="category")],
    ),
    Def(
        "stanford-cars",
        "Stanford Cars",
        "196 car models (make, model, year); official test split (8,041 images).",
        "torchvision's StanfordCars classes (devkit cars_meta.mat), as clip_benchmark takes them",
        "cars",
        "a photo of a car",
        "car model",
        "Recognise the make, model and year of a car in a photo.",
        [
            tv(
                "StanfordCars",
                "torchvision can no longer download it (the original site is gone): put cars_test/, "
                "cars_test_annos_withlabels.mat and devkit/ in $TEXTADAPT_HOME/images/stanford_cars",
                True,
                split="test",
            )
        ],
    ),
    Def(
        "stl10",
        "STL-10",
        "10 classes of 96x96 photos; official test split (8,000 images).",
        "torchvision's STL10 classes (class_names.txt), as clip_benchmark takes them",
        "stl10",
        "a small photo",
        "object",
        "Recognise which of 10 common objects or animals a small 96x96 photo shows.",
        [tv("STL10", DOWNLOAD, True, split="test")],
    ),
    Def(
        "gtsrb",
        "GTSRB (German traffic signs)",
        "43 traffic sign classes; official test split (12,630 images).",
        "clip_benchmark's en_classnames.json (CLIP's descriptive names, in class-id order)",
        "gtsrb",
        "a zoomed-in photo of a German traffic sign",
        "traffic sign",
        "Recognise which of 43 German traffic signs a small, zoomed-in photo shows.",
        [tv("GTSRB", DOWNLOAD, split="test")],
    ),
    Def(
        "country211",
        "Country211",
        "211 countries where a Flickr photo was taken; test split (21,100 images).",
        "clip_benchmark's en_classnames.json (country names, in torchvision's sorted ISO-code folder order)",
        "country211",
        "a photo taken somewhere in the world",
        "location",
        "Recognise in which of 211 countries a photo from Flickr was taken.",
        [tv("Country211", DOWNLOAD, split="test")],
    ),
    Def(
        "resisc45",
        "NWPU-RESISC45",
        "45 aerial scene classes (31,500 images; no official split).",
        "CLIP's names (NWPU-RESISC45 folder names, '_' as spaces, sorted): see data/classnames/README.md",
        "resisc45",
        "an aerial photo",
        "aerial scene",
        "Recognise which of 45 scene classes (land use, buildings, terrain) an aerial photo shows.",
        [
            {
                "kind": "folder",
                "dir": "~/data/resisc45",
                "folders": "underscores",
                "how": "torchvision has no RESISC45: extract NWPU-RESISC45.rar and move its 45 class folders "
                "(airplane, baseball_diamond, ...) to ~/data/resisc45/test/",
            }
        ],
    ),
]


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def toml_inline(d: dict) -> str:
    return "{ " + ", ".join(f"{k} = {toml_str(v) if isinstance(v, str) else json.dumps(v)}" for k, v in d.items()) + " }"


def render(d: Def) -> str:
    classes = class_names(d.name)
    templates = [t.replace("{c}", "{}") for t in cb_templates()[d.templates_key]]
    if d.name in TAP_STEPS:
        steps, steps_note = TAP_STEPS[d.name], "TAP's steps for this dataset (methods.md)"
    else:
        steps, steps_note = default_steps(len(classes))
    out = [
        f"# {d.title}: {d.about}",
        f"# Class names, in label order: {d.names_from}.",
        f"# Zero-shot templates: clip_benchmark's en_zeroshot_classification_templates.json[{d.templates_key!r}].",
        "# Written by scripts/make_dataset_specs.py; edit that script and re-run it rather than this file.",
        f"name = {toml_str(d.name)}",
        f"title = {toml_str(d.title)}",
        "",
        "classes = [",
    ]
    folders = None
    for img in d.images:
        if img.get("folders") == "underscores":
            folders = [c.replace(" ", "_") for c in classes]
    if d.name == "ucf101":
        folders = [ucf101_folder(c) for c in upstream("ucf101")]
    if d.name == "imagenet-r":
        folders = imagenet_r()[1]
    out += [f"  {toml_str(c)}," for c in classes]
    out += [
        "]",
        "",
        "[prompting]",
        f"domain = {toml_str(d.domain)}",
        f"category = {toml_str(d.category)}",
        f"task = {toml_str(d.task)}",
    ]
    if d.name in TARGETED:
        out += (
            [
                "# This dataset's own targeted questions (TAP's per-dataset questions, in textadapt's wording): the `targeted`",
                '# template set for it, instead of prompts/targeted/. " Answer in one sentence." is appended to each.',
                "targeted = [",
            ]
            + [f"  {toml_str(q)}," for q in TARGETED[d.name]]
            + ["]"]
        )
    out += ["", "[zeroshot]", "templates = ["]
    out += [f"  {toml_str(t)}," for t in templates]
    out += ["]", "", "[train]", f"# {steps_note}.", f"steps = {steps}"]
    for img in d.images:
        out += ["", "[[images]]", f"kind = {toml_str(img['kind'])}"]
        if img["kind"] == "torchvision":
            out += [f"class = {toml_str(img['class'])}", f"kwargs = {toml_inline(img['kwargs'])}"]
            if img["check_classes"]:
                out += [
                    "# The first run compares these names with torchvision's `classes` (case, '_' and '/' aside).",
                    "check_classes = true",
                ]
        else:
            out += [f"dir = {toml_str(img['dir'])}"]
            if folders is not None:
                out += ["# Folder name of each class, in class order.", "folders = ["]
                out += [f"  {toml_str(f)}," for f in folders] + ["]"]
        out += [f"how = {toml_str(img['how'])}"]
    return "\n".join(out) + "\n"


def main(names: list[str]) -> None:
    wanted = [d for d in DEFS if not names or d.name in names]
    unknown = set(names) - {d.name for d in DEFS}
    if unknown:
        sys.exit(f"no definition for {sorted(unknown)}; known: {[d.name for d in DEFS]}")
    for d in wanted:
        path = SPECS / f"{d.name}.toml"
        path.write_text(render(d), encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
