"""Datasets as data: a TOML spec per dataset, and the labelled images it points to.

A spec (``data/datasets/NAME.toml``) holds the class names in label order, the wording that
targeted prompts put into every question, the zero-shot prompt ensemble, the training steps and a
list of image sources tried in order. Adding a dataset is adding a file; see
``data/datasets/fashion-mnist.toml`` for every field.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import re
import struct
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Iterator, Literal, Union

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from textadapt import TextadaptError, read_text_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Prompting(_Strict):
    domain: str = Field(description='Noun phrase for targeted questions: "... in {{ dataset.domain }}".')
    category: str = Field(description='What the classes are kinds of, singular: "clothing item".')
    task: str = Field(description="One sentence on what the classifier must tell apart.")
    confusable: dict[str, list[str]] = Field(
        default_factory=dict, description="Class -> the classes most easily confused with it (contrastive questions)."
    )


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
    """One sub-folder of images per class: DIR/test/<class folder>/*.png. Folder names default to the class names."""

    kind: Literal["folder"]
    dir: str
    folders: list[str] | None = Field(None, description="Folder name of each class, in class order.")
    how: str = ""


ImageSource = Annotated[Union[IdxSource, TorchvisionSource, FolderSource], Field(discriminator="kind")]


class DatasetSpec(_Strict):
    name: str
    title: str = ""
    classes: list[str]
    prompting: Prompting
    zeroshot: ZeroShot = Field(default_factory=ZeroShot)
    train: Train
    images: list[ImageSource] = Field(default_factory=list)
    path: Path | None = Field(None, exclude=True, description="The file this spec was read from.")

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
    def _confusable_are_classes(self) -> "DatasetSpec":
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


# --------------------------------------------------------------------------------------------
# Labelled images


@dataclass
class ImageSet:
    """Labelled test images in the spec's class order. ``images`` are uint8 arrays or file paths."""

    images: list
    labels: np.ndarray
    source: str
    _keys: list[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def pil(self, i: int) -> Image.Image:
        x = self.images[i]
        return Image.open(x) if isinstance(x, (str, Path)) else Image.fromarray(x)

    def keys(self) -> list[str]:
        """Content hash of every image: the image-embedding cache key (with the backbone's). Computed once."""
        if self._keys is None:
            out = []
            for x in self.images:
                data = Path(x).read_bytes() if isinstance(x, (str, Path)) else np.ascontiguousarray(x).tobytes() + str(x.shape).encode()
                out.append(hashlib.sha256(data).hexdigest())
            self._keys = out
        return list(self._keys)

    def subset(self, keep: np.ndarray) -> "ImageSet":
        idx = np.flatnonzero(keep)
        return ImageSet([self.images[i] for i in idx], self.labels[idx], self.source)


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
        raise TextadaptError(f"{spec.path}: check_classes is set, but torchvision's {class_name} has no `classes` to compare with")
    theirs = [str(c) for c in theirs]
    if len(theirs) != len(spec.classes):
        raise TextadaptError(f"{spec.path}: {len(spec.classes)} classes, but torchvision's {class_name} has {len(theirs)}")
    wrong = [(i, ours, t) for i, (ours, t) in enumerate(zip(spec.classes, theirs)) if _same_name(ours) != _same_name(t)]
    if wrong:
        shown = "; ".join(f"class {i} is {o!r} in the spec but {t!r} in torchvision" for i, o, t in wrong[:5])
        raise TextadaptError(
            f"{spec.path}: the class list does not match torchvision's {class_name}.classes ({len(wrong)} differ): {shown}"
        )


def _from_folder(src: FolderSource, classes: list[str]) -> ImageSet | None:
    base = Path(src.dir).expanduser() / "test"
    if not base.is_dir():
        return None
    folders = src.folders or classes
    if len(folders) != len(classes):
        raise TextadaptError(f"images.folders has {len(folders)} names for {len(classes)} classes")
    images, labels = [], []
    for label, folder in enumerate(folders):
        d = base / folder
        if not d.is_dir():
            raise TextadaptError(f"{d}: missing image folder for class {label} {classes[label]!r}")
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        images += files
        labels += [label] * len(files)
    return ImageSet(images, np.asarray(labels, dtype=np.int64), f"folder:{base}")


def load_test_images(spec: DatasetSpec, home: Path) -> ImageSet:
    """The test split from the first image source that is present; a clear error if none is."""
    for src in spec.images:
        if isinstance(src, IdxSource):
            found = _from_idx(src)
        elif isinstance(src, TorchvisionSource):
            found = _from_torchvision(src, spec, home)
        else:
            found = _from_folder(src, spec.classes)
        if found is not None:
            check_labels(spec, found)
            return found
    ways = "\n  ".join(
        f"- {s.kind}" + (f" (looked in {s.dir})" if hasattr(s, "dir") else "") + (f": {s.how}" if s.how else "") for s in spec.images
    ) or "- (the spec lists no [[images]] source)"
    raise TextadaptError(f"no images for dataset {spec.name!r} ({spec.path}). Ways to get them:\n  {ways}")


def check_labels(spec: DatasetSpec, images: ImageSet) -> None:
    """Refuse a class list that does not fit the labels (wrong count or order cannot be detected otherwise)."""
    if len(images) == 0:
        raise TextadaptError(f"{images.source}: no test images")
    present = np.unique(images.labels)
    if present.min() < 0 or present.max() >= len(spec.classes):
        raise TextadaptError(
            f"{spec.path}: {len(spec.classes)} classes, but the labels of {images.source} run from "
            f"{present.min()} to {present.max()}: the class list does not match the labels"
        )
    if len(present) != len(spec.classes):
        missing = sorted(set(range(len(spec.classes))) - set(present.tolist()))
        raise TextadaptError(
            f"{spec.path}: {len(spec.classes)} classes, but {images.source} has images of only {len(present)}; "
            f"no test image for classes {[spec.classes[i] for i in missing]}"
        )


def restrict(spec: DatasetSpec, images: ImageSet | None, max_classes: int | None,
             max_images: int | None) -> tuple[DatasetSpec, ImageSet | None]:
    """The first ``max_classes`` classes and the first ``max_images`` of their test images (smoke runs)."""
    if max_classes and max_classes < len(spec.classes):
        spec = spec.model_copy(update={"classes": spec.classes[:max_classes]})
        images = images.subset(images.labels < max_classes) if images is not None else None
    if images is not None and max_images and max_images < len(images):
        images = images.subset(np.arange(len(images)) < max_images)
    return spec, images


def iter_batches(images: ImageSet, batch_size: int) -> Iterator[list[Image.Image]]:
    for start in range(0, len(images), batch_size):
        yield [images.pil(i) for i in range(start, min(start + batch_size, len(images)))]
