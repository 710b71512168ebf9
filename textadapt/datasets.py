"""Datasets as data: a TOML spec per dataset, and the labelled images it points to.

A spec (``data/datasets/NAME.toml``) holds the class names in label order, the wording that
targeted prompts put into every question (or the dataset's own targeted questions), the zero-shot
prompt ensemble, the training steps and a list of image sources tried in order. Adding a dataset is
adding a file: ``textadapt datasets new NAME --from-folder DIR`` writes one from an image folder;
see ``data/datasets/fashion-mnist.toml`` for every field.
"""

from __future__ import annotations

import gzip
import inspect
import re
import struct
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from textadapt import TextadaptError, read_text_file
from textadapt.images import IMAGE_SUFFIXES, WHITE, Colour, image_key, open_rgb, parse_colour

# A spec field whose value starts with this is still to be written by the user (`datasets new` writes them):
# `datasets check` and `run` refuse the spec until it is replaced.
PLACEHOLDER = "FILL IN"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Prompting(_Strict):
    domain: str = Field(description='Noun phrase for targeted questions: "... in {{ dataset.domain }}".')
    category: str = Field(description='What the classes are kinds of, singular: "clothing item".')
    task: str = Field(description="One sentence on what the classifier must tell apart.")
    confusable: dict[str, list[str]] = Field(
        default_factory=dict, description="Class -> the classes most easily confused with it (contrastive questions)."
    )
    targeted: list[str] = Field(
        default_factory=list,
        description="This dataset's own targeted questions, Jinja like a template ({{ class_name | article }}), the domain as "
        "the head noun (TAP). When given, they are the `targeted` template set for this dataset instead of prompts/targeted/.",
    )

    @field_validator("targeted")
    @classmethod
    def _questions_name_the_class(cls, v: list[str]) -> list[str]:
        for i, q in enumerate(v):
            if "class_name" not in q:
                raise ValueError(f"question {i} {q!r} never uses {{{{ class_name }}}}: every question is asked about one class")
        if len(set(v)) != len(v):
            raise ValueError("the same question is listed twice")
        return v


class ZeroShot(_Strict):
    templates: list[str] = Field(default_factory=list, description='Prompt ensemble, "{}" is the class name.')

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, v: list[str]) -> list[str]:
        for t in v:
            if "{}" not in t:
                raise ValueError(f"template {t!r} has no '{{}}' where the class name goes")
        return v


class Train(_Strict):
    steps: int = Field(gt=0, description="Full-batch training steps of the linear head.")


class IdxSplit(_Strict):
    images: str
    labels: str


class IdxSource(_Strict):
    """MNIST-style gzipped IDX files (the Debian dataset-* packages ship these)."""

    kind: Literal["idx"]
    dir: str
    test: IdxSplit
    train: IdxSplit | None = None
    how: str = ""


class TorchvisionSource(_Strict):
    """A torchvision dataset class: downloaded into ``root`` where it can be (needs network)."""

    kind: Literal["torchvision"]
    class_: str = Field(alias="class")
    root: str | None = Field(None, description="Folder for the files; default $TEXTADAPT_HOME/images.")
    kwargs: dict = Field(default_factory=lambda: {"train": False}, description="Arguments selecting the test split.")
    check_classes: bool = Field(
        False, description="Refuse the images unless the spec's classes equal the dataset's `classes` (case, '_' and '/' aside)."
    )
    how: str = ""


class FolderSource(_Strict):
    """An ImageFolder: one sub-folder of images per class, DIR/SPLIT/<class folder>/*.png.

    Folder names default to the class names."""

    kind: Literal["folder"]
    dir: str
    split: str = Field(
        "test",
        description='Folder of the test split inside DIR, or "" when DIR itself holds the class folders (a plain ImageFolder).',
    )
    folders: list[str] | None = Field(None, description="Folder name of each class, in class order.")
    ignore: list[str] = Field(
        default_factory=list, description="Folders beside the class folders that are not classes; any other folder is an error."
    )
    how: str = ""

    @property
    def root(self) -> Path:
        """The folder that holds the class folders."""
        base = Path(self.dir).expanduser()
        return base / self.split if self.split else base


ImageSource = Annotated[IdxSource | TorchvisionSource | FolderSource, Field(discriminator="kind")]


class DatasetSpec(_Strict):
    name: str
    title: str = ""
    classes: list[str]
    prompting: Prompting
    zeroshot: ZeroShot = Field(default_factory=ZeroShot)
    train: Train
    images: list[ImageSource] = Field(default_factory=list)
    background: str = Field("white", description='Colour transparent pixels are composited onto: a name or "#rrggbb".')
    path: Path | None = Field(None, exclude=True, description="The file this spec was read from.")

    @field_validator("background")
    @classmethod
    def _is_colour(cls, v: str) -> str:
        parse_colour(v)
        return v

    @property
    def background_rgb(self) -> Colour:
        return parse_colour(self.background)

    def placeholders(self) -> list[str]:
        """The fields still holding a "FILL IN" placeholder (as `datasets new` writes them)."""
        fields = {
            "title": self.title,
            "prompting.domain": self.prompting.domain,
            "prompting.category": self.prompting.category,
            "prompting.task": self.prompting.task,
        }
        fields |= {f"classes[{i}]": c for i, c in enumerate(self.classes)}
        fields |= {f"prompting.targeted[{i}]": q for i, q in enumerate(self.prompting.targeted)}
        return [name for name, value in fields.items() if value.strip().startswith(PLACEHOLDER)]

    @field_validator("classes")
    @classmethod
    def _classes_ok(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("a classifier needs at least 2 classes")
        seen: dict[str, int] = {}
        for i, c in enumerate(v):
            if not c.strip():
                raise ValueError(f"class {i} is empty")
            key = c.strip().lower()
            if key in seen:
                raise ValueError(f"class {i} {c!r} duplicates class {seen[key]}")
            seen[key] = i
        return [c.strip() for c in v]

    @model_validator(mode="after")
    def _confusable_are_classes(self) -> DatasetSpec:
        for c, others in self.prompting.confusable.items():
            unknown = [x for x in [c, *others] if x not in self.classes]
            if unknown:
                raise ValueError(f"prompting.confusable names {unknown}, which are not classes of this dataset")
        return self


def _line_of(text: str, loc: tuple) -> int | None:
    """Best-effort line number of a field in a TOML file, for error messages."""
    for key in reversed([k for k in loc if isinstance(k, str)]):
        for i, line in enumerate(text.splitlines(), 1):
            if re.match(rf"\s*(\[+\s*)?{re.escape(key)}\s*(=|\]|\.)", line):
                return i
    return None


def load_spec(path: Path) -> DatasetSpec:
    """Read and check one spec file; errors name the file, line and field."""
    text = read_text_file(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        where = f"{path}:{m.group(1)}:{m.group(2)}" if m else str(path)
        raise TextadaptError(f"{where}: not valid TOML: {e}") from None
    try:
        spec = DatasetSpec.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            line = _line_of(text, err["loc"])
            where = f"{path}:{line}" if line else str(path)
            problems.append(f"{where}: field '{field}': {err['msg']}")
        raise TextadaptError("invalid dataset spec\n  " + "\n  ".join(problems)) from None
    if spec.name != path.stem:
        raise TextadaptError(f"{path}: field 'name' is {spec.name!r} but the file is named {path.stem!r}; make them agree")
    spec.path = path
    return spec


def known_datasets(search_path: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in search_path:
        for f in sorted(Path(d).glob("*.toml")) if Path(d).is_dir() else []:
            found.setdefault(f.stem, f)
    return found


def find_spec(name: str, search_path: list[Path]) -> DatasetSpec:
    known = known_datasets(search_path)
    if name not in known:
        where = ", ".join(str(d) for d in search_path)
        raise TextadaptError(
            f"unknown dataset {name!r}. Known datasets: {', '.join(sorted(known)) or 'none'}. "
            f"Add one as NAME.toml in one of: {where}"
        )
    return load_spec(known[name])


def placeholder_problems(spec: DatasetSpec) -> list[str]:
    """One line per field still holding a "FILL IN" placeholder, naming the file, line and field."""
    lines = read_text_file(spec.path).splitlines() if spec.path and spec.path.is_file() else []
    out = []
    for name in spec.placeholders():
        value = _field_value(spec, name)
        line = next((i for i, text in enumerate(lines, 1) if value[:40] in text), None)
        where = f"{spec.path}:{line}" if line else str(spec.path or spec.name)
        out.append(f"{where}: field '{name}' is still a placeholder: {value!r}")
    return out


def _field_value(spec: DatasetSpec, name: str) -> str:
    obj = spec
    for part in re.findall(r"[^.\[\]]+", name):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------
# Labelled images


@dataclass
class ImageSet:
    """Labelled test images in the spec's class order. ``images`` are uint8 arrays or file paths.

    ``background``: the colour transparent images are composited onto (the spec's). ``problems``: what
    was found wrong while listing them (a class folder missing, a folder that is no class, a class
    without images); ``load_test_images`` refuses a set with problems unless asked to collect them.
    """

    images: list
    labels: np.ndarray
    source: str
    background: Colour = WHITE
    problems: list[str] = field(default_factory=list)
    _keys: list[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def pil(self, i: int) -> Image.Image:
        """Image ``i``, decoded completely, RGB on the background; a bad file raises a TextadaptError naming it."""
        return open_rgb(self.images[i], self.background)

    def keys(self) -> list[str]:
        """Content hash of every image: the image-embedding cache key (with the backbone's). Computed once."""
        if self._keys is None:
            self._keys = [image_key(x, self.background) for x in self.images]
        return list(self._keys)

    def take(self, idx) -> ImageSet:
        """The images at the given positions, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        return replace(self, images=[self.images[i] for i in idx], labels=self.labels[idx])

    def subset(self, keep: np.ndarray) -> ImageSet:
        return self.take(np.flatnonzero(keep))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise TextadaptError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _from_idx(src: IdxSource) -> ImageSet | None:
    base = Path(src.dir).expanduser()
    img, lab = base / src.test.images, base / src.test.labels
    if not (img.is_file() and lab.is_file()):
        return None
    images, labels = _read_idx(img), _read_idx(lab).astype(np.int64)
    if len(images) != len(labels):
        raise TextadaptError(f"{img}: {len(images)} images but {lab} has {len(labels)} labels")
    return ImageSet(list(images), labels, f"idx:{base}")


def _from_torchvision(src: TorchvisionSource, spec: DatasetSpec, home: Path) -> ImageSet | None:
    import torchvision

    cls = getattr(torchvision.datasets, src.class_, None)
    if cls is None:
        raise TextadaptError(f"torchvision has no dataset class {src.class_!r}")
    root = Path(src.root).expanduser() if src.root else home / "images"
    kwargs = dict(src.kwargs)
    if "download" in inspect.signature(cls).parameters:
        kwargs["download"] = True
    try:
        ds = cls(root=str(root), **kwargs)
    except Exception:  # no network, files not there, ...: the next source is tried
        return None
    if src.check_classes:
        _check_torchvision_classes(spec, ds, src.class_)
    images, labels = torchvision_images(ds)
    return ImageSet(images, labels, f"torchvision:{src.class_}")


def torchvision_images(ds) -> tuple[list, np.ndarray]:
    """Image files (or arrays) and labels of a torchvision dataset, without decoding the files.

    torchvision keeps them under different names per dataset; an unknown layout falls back to
    decoding every item (fine for small datasets only).
    """
    for files, labels in (("_image_files", "_labels"), ("_images", "_labels")):  # DTD, Food101, Flowers102, SUN397, FGVC, Pets
        if hasattr(ds, files) and hasattr(ds, labels):
            return [str(p) for p in getattr(ds, files)], np.asarray(getattr(ds, labels), dtype=np.int64)
    for attr in ("samples", "_samples"):  # ImageFolder (ImageNet, EuroSAT, Country211), GTSRB, StanfordCars
        samples = getattr(ds, attr, None)
        if samples is not None and len(samples) and isinstance(samples[0][0], (str, Path)):
            return [str(p) for p, _ in samples], np.asarray([y for _, y in samples], dtype=np.int64)
    if hasattr(ds, "data"):  # in-memory arrays: MNIST, CIFAR (N,H,W[,C]); STL10, SVHN (N,C,H,W)
        data = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
        if data.ndim == 4 and data.shape[1] in (1, 3) and data.shape[-1] not in (1, 3):
            data = data.transpose(0, 2, 3, 1)
        labels = ds.targets if hasattr(ds, "targets") else ds.labels
        return list(data), np.asarray(labels, dtype=np.int64)
    if hasattr(ds, "categories") and hasattr(ds, "index") and hasattr(ds, "y"):  # Caltech101: files by category and number
        base = Path(ds.root) / "101_ObjectCategories"
        files = [str(base / ds.categories[y] / f"image_{i:04d}.jpg") for i, y in zip(ds.index, ds.y)]
        return files, np.asarray(ds.y, dtype=np.int64)
    images, labels = [], []
    for img, y in ds:
        images.append(np.asarray(img.convert("RGB")))
        labels.append(int(y))
    return images, np.asarray(labels, dtype=np.int64)


def _same_name(a: str) -> str:
    return " ".join(re.split(r"[\s_/]+", a.lower())).strip()


def _check_torchvision_classes(spec: DatasetSpec, ds, class_name: str) -> None:
    """The spec's class i must be torchvision's class i (its labels' meaning), up to case, '_' and '/'."""
    theirs = getattr(ds, "classes", None)
    if theirs is None:
        raise TextadaptError(
            f"{spec.path}: check_classes is set, but torchvision's {class_name} has no `classes` to compare with"
        )
    theirs = [str(c) for c in theirs]
    if len(theirs) != len(spec.classes):
        raise TextadaptError(f"{spec.path}: {len(spec.classes)} classes, but torchvision's {class_name} has {len(theirs)}")
    wrong = [(i, ours, t) for i, (ours, t) in enumerate(zip(spec.classes, theirs)) if _same_name(ours) != _same_name(t)]
    if wrong:
        shown = "; ".join(f"class {i} is {o!r} in the spec but {t!r} in torchvision" for i, o, t in wrong[:5])
        raise TextadaptError(
            f"{spec.path}: the class list does not match torchvision's {class_name}.classes ({len(wrong)} differ): {shown}"
        )


def _image_files(folder: Path) -> list[Path]:
    """Image files of a folder, sorted; hidden ones (".DS_Store", macOS's "._x.png") left out."""
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def class_folders(root: Path) -> dict[str, int]:
    """The (not hidden) sub-folders of ``root`` that hold image files, with how many each holds."""
    if not root.is_dir():
        return {}
    folders = [d for d in sorted(root.iterdir()) if not d.name.startswith(".") and d.is_dir()]
    return {d.name: n for d in folders if (n := len(_image_files(d)))}


def _from_folder(src: FolderSource, spec: DatasetSpec) -> ImageSet | None:
    """An ImageFolder: one folder per class under DIR (or DIR/SPLIT). Folders that are no class are problems."""
    root = src.root
    if not root.is_dir():
        return None
    classes = spec.classes
    folders = src.folders or classes
    if len(folders) != len(classes):
        raise TextadaptError(f"{spec.path}: images.folders has {len(folders)} names for {len(classes)} classes")
    images, labels, problems = [], [], []
    for label, folder in enumerate(folders):
        d = root / folder
        if not d.is_dir():
            problems.append(f"{d}: no folder for class {label} {classes[label]!r}")
            continue
        files = _image_files(d)
        images += files
        labels += [label] * len(files)
    unlisted = sorted(set(class_folders(root)) - set(folders) - set(src.ignore))
    if unlisted:
        problems.append(
            f"{root}: {len(unlisted)} folder(s) of images are no class of {spec.path}: {', '.join(unlisted)}. "
            "Add them to `classes` (and `folders`), or list them in the source's `ignore`"
        )
    if not images and not src.split and (root / "test").is_dir():
        problems.append(f'{root} has a test/ folder: if the class folders are in it, set split = "test" in {spec.path}')
    return ImageSet(images, np.asarray(labels, dtype=np.int64), f"folder:{root}", spec.background_rgb, problems)


def _where(src) -> str:
    if isinstance(src, FolderSource):
        hint = ""
        base = Path(src.dir).expanduser()
        if src.split and base.is_dir() and class_folders(base):
            hint = f'; {base} itself holds class folders: set split = "" for a plain ImageFolder'
        return f" (looked for class folders in {src.root}{hint})"
    return f" (looked in {src.dir})" if hasattr(src, "dir") else ""


def load_test_images(spec: DatasetSpec, home: Path, strict: bool = True) -> ImageSet:
    """The test split from the first image source that is present; a clear error if none is.

    With ``strict`` (a run) any problem found while listing the images (see ``ImageSet.problems``) is
    raised, all of them in one error; without (``datasets check``), they come back in ``problems``.
    """
    for src in spec.images:
        if isinstance(src, IdxSource):
            found = _from_idx(src)
        elif isinstance(src, TorchvisionSource):
            found = _from_torchvision(src, spec, home)
        else:
            found = _from_folder(src, spec)
        if found is not None:
            found.background = spec.background_rgb
            found.problems += label_problems(spec, found)
            if strict and found.problems:
                raise TextadaptError(
                    f"the images of dataset {spec.name!r} do not fit its spec:\n  " + "\n  ".join(found.problems)
                )
            return found
    ways = (
        "\n  ".join(f"- {s.kind}{_where(s)}" + (f": {s.how}" if s.how else "") for s in spec.images)
        or "- (the spec lists no [[images]] source)"
    )
    message = f"no images for dataset {spec.name!r} ({spec.path}). Ways to get them:\n  {ways}"
    if strict:
        raise TextadaptError(message)
    return ImageSet([], np.zeros(0, np.int64), "none", spec.background_rgb, [message])


def label_problems(spec: DatasetSpec, images: ImageSet) -> list[str]:
    """What is wrong with the labels for this class list: labels out of range, classes without images."""
    if len(images) == 0:
        return [f"{images.source}: no test images"]
    present = np.unique(images.labels)
    if present.min() < 0 or present.max() >= len(spec.classes):
        return [
            f"{spec.path}: {len(spec.classes)} classes, but the labels of {images.source} run from "
            f"{present.min()} to {present.max()}: the class list does not match the labels"
        ]
    missing = sorted(set(range(len(spec.classes))) - set(present.tolist()))
    if missing:
        return [
            f"{spec.path}: {len(spec.classes)} classes, but {images.source} has images of only {len(present)}; "
            f"no test image for classes {[spec.classes[i] for i in missing]}"
        ]
    return []


def check_labels(spec: DatasetSpec, images: ImageSet) -> None:
    """Refuse a class list that does not fit the labels (wrong count or order cannot be detected otherwise)."""
    problems = label_problems(spec, images)
    if problems:
        raise TextadaptError("\n".join(problems))


SAMPLE_SEED = 0  # --max-images picks the same images in every run of a dataset, whatever --seed: runs stay comparable


def stratified(labels: np.ndarray, n: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """Positions of ``n`` items spread as evenly as possible over the classes present, chosen at random
    (seeded) within each class, in their original order. A class with fewer items than its share
    gives the rest to the others."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.zeros(len(classes), np.int64)
    left = min(n, len(labels))
    while left:  # water-filling: an equal share for every class that still has items
        open_ = np.flatnonzero(quota < counts)
        share = max(left // len(open_), 1)
        for j in open_:
            take = min(share, counts[j] - quota[j], left)
            quota[j] += take
            left -= take
            if not left:
                break
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def restrict(
    spec: DatasetSpec, images: ImageSet | None, max_classes: int | None, max_images: int | None
) -> tuple[DatasetSpec, ImageSet | None]:
    """The first ``max_classes`` classes, and ``max_images`` of their test images spread evenly over the
    classes (seeded: the same images every time), for smoke runs."""
    if max_classes and max_classes < len(spec.classes):
        spec = spec.model_copy(update={"classes": spec.classes[:max_classes]})
        images = images.subset(images.labels < max_classes) if images is not None else None
    if images is not None and max_images and max_images < len(images):
        images = images.take(stratified(images.labels, max_images))
    return spec, images


def iter_batches(images: ImageSet, batch_size: int) -> Iterator[list[Image.Image]]:
    for start in range(0, len(images), batch_size):
        yield [images.pil(i) for i in range(start, min(start + batch_size, len(images)))]


# --------------------------------------------------------------------------------------------
# A new spec from an image folder (`textadapt datasets new`)

# TAP's full-batch steps for its eight datasets, by class count (methods.md); a new dataset takes the nearest.
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
TAP_CLASSES = {
    "dtd": 47,
    "eurosat": 10,
    "fgvc-aircraft": 100,
    "food101": 101,
    "flowers102": 102,
    "sun397": 397,
    "ucf101": 101,
    "imagenet-r": 200,
}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def default_steps(n_classes: int) -> tuple[int, str]:
    """Steps for a dataset TAP did not use: those of the TAP dataset with the nearest class count; where
    several TAP datasets have about that many classes (100 to 102: FGVC-Aircraft, Food101, UCF101,
    Flowers102), the median of their steps. Returns the steps and a sentence saying so."""
    nearest = min(TAP_CLASSES.values(), key=lambda v: abs(v - n_classes))
    group = sorted(k for k, v in TAP_CLASSES.items() if abs(v - nearest) <= 2)
    steps = sorted(TAP_STEPS[k] for k in group)
    if len(group) == 1:
        return steps[0], f"Not among TAP's datasets: the steps TAP used for the {nearest}-class {group[0]} (nearest class count)"
    mid = len(steps) // 2
    median = steps[mid] if len(steps) % 2 else (steps[mid - 1] + steps[mid]) // 2
    return median, f"Not among TAP's datasets: the median of the steps TAP used for {', '.join(group)} (as many classes)"


def readable_name(folder: str) -> str:
    """A class name from a folder name: "001.Black_footed_Albatross" -> "Black footed Albatross",
    "ApplyEyeMakeup" -> "Apply Eye Makeup", "sea_turtle" -> "sea turtle"."""
    name = re.sub(r"^\d+[._\s-]+(?=\D)", "", folder).replace("_", " ")
    if " " not in name and re.search(r"[a-z][A-Z]", name):
        name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return " ".join(name.split()) or folder


@dataclass
class NewSpec:
    text: str  # the TOML
    classes: list[str]
    folders: list[str]
    images: int
    root: Path  # the folder holding the class folders
    split: str


def _toml(s: str) -> str:
    import json

    return json.dumps(s, ensure_ascii=False)


def spec_from_folder(name: str, folder: Path, split: str | None = None) -> NewSpec:
    """A spec for an ImageFolder: classes from the folder names (sorted), placeholders for the wording.

    ``split``: the folder of the test split inside ``folder`` ("" for none); None: ``test`` if
    ``folder/test`` holds class folders, else none.
    """
    if not NAME_RE.fullmatch(name):
        raise TextadaptError(f"dataset name {name!r}: use letters, digits, '.', '_' and '-' (it names the file NAME.toml)")
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise TextadaptError(f"{folder}: no such folder")
    if split is None:
        split = "test" if class_folders(folder / "test") else ""
    root = folder / split if split else folder
    found = class_folders(root)
    if not found:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise TextadaptError(
            f"{root}: no class folders holding images ({suffixes}). An ImageFolder is DIR/<class>/*.png, or "
            f"DIR/<split>/<class>/*.png with --split <split>" + ("" if split else " (DIR/test/ is found by itself)")
        )
    folders = sorted(found)
    lower = {}
    for f in folders:
        if f.lower() in lower:
            raise TextadaptError(f"{root}: folders {lower[f.lower()]!r} and {f!r} differ only in case; rename one")
        lower[f.lower()] = f
    names = [readable_name(f) for f in folders]
    clash = {n.lower() for n in names if [m.lower() for m in names].count(n.lower()) > 1}
    classes = [f if n.lower() in clash else n for f, n in zip(folders, names)]
    steps, steps_note = default_steps(len(classes))
    n_images = sum(found.values())
    text = "\n".join(
        [
            f"# {name}: written by `textadapt datasets new` from {root} ({n_images} images in {len(classes)} class folders).",
            f"# Replace every {PLACEHOLDER} value below; `textadapt datasets check {name}` then checks everything before any run.",
            f"name = {_toml(name)}",
            f"title = {_toml(name)}",
            '# Colour that transparent pixels are composited onto (a name or "#rrggbb").',
            'background = "white"',
            "",
            "# Class names in label order, read from the folder names: edit them freely (`folders` below keeps the mapping).",
            "classes = [",
            *[f"  {_toml(c)}," for c in classes],
            "]",
            "",
            "[prompting]",
            '# The kind of image, a noun phrase that reads well in "What does a <class> look like in <domain>?".',
            f"domain = {_toml(PLACEHOLDER + ': the kind of image, e.g. a close-up photo of a bird')}",
            '# What the classes are kinds of, singular: "bird species", "road sign".',
            f"category = {_toml(PLACEHOLDER + ': what the classes are kinds of, e.g. bird species')}",
            "# One sentence on what the classifier must tell apart (meta-prompting reads it).",
            f"task = {_toml(PLACEHOLDER + ': one sentence, e.g. Recognise the species of a bird in a photo.')}",
            "# Optional: this dataset's own targeted questions, which replace prompts/targeted/ for it (TAP wrote them per",
            '# dataset, the domain as the head noun). Jinja, like a template file; " Answer in one sentence." is appended.',
            '# targeted = ["What does the plumage of {{ class_name | article }} look like in a close-up photo?"]',
            "",
            "[zeroshot]",
            "# Prompt ensemble of the zero-shot baseline ({} is the class name).",
            'templates = ["a photo of a {}."]',
            "",
            "[train]",
            f"# {steps_note}.",
            f"steps = {steps}",
            "",
            "[[images]]",
            'kind = "folder"',
            f"dir = {_toml(str(folder))}",
            '# Folder of the test split inside dir ("": dir itself holds the class folders).',
            f"split = {_toml(split)}",
            "# Folder of each class, in class order.",
            "folders = [",
            *[f"  {_toml(f)}," for f in folders],
            "]",
            "# Folders of images beside the class folders that are not classes (any other one is an error).",
            "ignore = []",
            "",
        ]
    )
    return NewSpec(text, classes, folders, n_images, root, split)


def write_new_spec(name: str, folder: Path, out: Path, split: str | None = None, force: bool = False) -> tuple[Path, NewSpec]:
    """Write ``spec_from_folder`` to ``out`` (a folder, or a file named NAME.toml); refuses to overwrite unless ``force``."""
    new = spec_from_folder(name, folder, split)
    out = Path(out).expanduser()
    path = out if out.suffix == ".toml" else out / f"{name}.toml"
    if path.stem != name:
        raise TextadaptError(f"--out {out}: a spec's file must be named after the dataset: {name}.toml")
    if path.exists() and not force:
        raise TextadaptError(f"{path} exists; pass --force to overwrite it, or choose another name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(new.text, encoding="utf-8")
    except OSError as e:
        raise TextadaptError(f"{path}: cannot write the spec ({e.strerror or e})") from None
    load_spec(path)  # what was written reads back as a valid spec
    return path, new
