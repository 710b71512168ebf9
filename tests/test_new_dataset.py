"""A new dataset from a folder of real photos, the way a user makes one: `datasets new` + `datasets check`,
then a run; and every bad input found, named, before any LLM call.

The photos are Tux Paint's photo cut-outs (PNG with transparent backgrounds), from Debian's
`tuxpaint-stamps-default` package (GPL-2), read where Debian installs them and linked into a temporary
ImageFolder; nothing of them is copied into this repository. `scripts/setup.sh` installs the package.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from textadapt import TextadaptError
from textadapt.checks import check_dataset, preflight
from textadapt.config import Settings
from textadapt.datasets import find_spec, load_spec, load_test_images, readable_name, restrict, stratified, write_new_spec
from textadapt.images import image_key, open_rgb
from textadapt.store import Store

STAMPS = Path("/usr/share/tuxpaint/stamps")
pytestmark = pytest.mark.skipif(
    not STAMPS.is_dir(), reason="needs the photo cut-outs of Debian's tuxpaint-stamps-default (scripts/setup.sh installs it)"
)
CLI = str(Path(sys.executable).parent / "textadapt")
# class folder -> the stamps folder its PNGs come from (11 classes, 198 images, 10 to 35 per class)
FOLDERS = {
    "birds": "animals/birds",
    "bovines": "animals/mammals/bovines",
    "chess_pieces": "symbols/chess",
    "clothes": "clothes",
    "fish": "animals/fish",
    "flowers": "plants/flowers",
    "fruit": "food/fruit",
    "hand_tools": "household/tools",
    "planets": "space/planets",
    "road_signs": "town/roadsigns",
    "vegetables": "food/vegetables",
}
BLACK_PAWN = STAMPS / "symbols" / "chess" / "b_6_pawn.png"
FILLED = {
    "domain": "a cut-out photo on a plain background",
    "category": "kind of object",
    "task": "Recognise which kind of object a cut-out photo shows.",
}


def textadapt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=900, stdin=subprocess.DEVNULL
    )


@pytest.fixture
def cutouts(tmp_path) -> Path:
    """A plain ImageFolder, DIR/<class>/*.png, of real photo cut-outs (links to the installed files)."""
    root = tmp_path / "cutouts"
    for folder, stamps in FOLDERS.items():
        (root / folder).mkdir(parents=True)
        for png in sorted((STAMPS / stamps).glob("*.png")):
            (root / folder / png.name).symlink_to(png)
    return root


def fill_in(path: Path, **values) -> None:
    """Write the spec's wording in place of its FILL IN placeholders (or over it), as a user does in an editor."""
    text = path.read_text()
    for key, value in {**FILLED, **values}.items():
        text = re.sub(rf"^{key} = [^\n]*", lambda _: f"{key} = {json.dumps(value)}", text, count=1, flags=re.M)  # noqa: B023
    path.write_text(text)


def new_dataset(cutouts: Path, home: Path, filled: bool = True) -> Path:
    path, _ = write_new_spec("cutouts", cutouts, home / "datasets")
    if filled:
        fill_in(path)
    return path


def test_an_image_folder_becomes_a_dataset_with_two_commands_and_runs(cutouts, home):
    made = textadapt("datasets", "new", "cutouts", "--from-folder", str(cutouts))
    assert made.returncode == 0, made.stderr
    path = home / "datasets" / "cutouts.toml"
    assert f"wrote {path}: 11 classes, 198 images" in made.stdout
    spec = load_spec(path)
    assert spec.classes == [
        "birds",
        "bovines",
        "chess pieces",
        "clothes",
        "fish",
        "flowers",
        "fruit",
        "hand tools",
        "planets",
        "road signs",
        "vegetables",
    ]  # sorted folders, readable names
    assert spec.images[0].folders[2] == "chess_pieces" and spec.images[0].split == ""  # the mapping is kept; no split folder

    # Until the wording is written, check (and run) refuse, naming each field with its file and line.
    listed = textadapt("datasets").stdout
    row = listed[listed.index("│ cutouts") : listed.index("│ dtd")]  # the table wraps the row over lines
    assert "11 (to fill in:" in row and all(f"prompting.{f}" in row for f in ("domain", "category", "task")), listed
    refused = textadapt("datasets", "check", "cutouts")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    for field in ("domain", "category", "task"):
        assert re.search(rf"{re.escape(str(path))}:\d+: field 'prompting.{field}' is still a placeholder", refused.stderr)

    fill_in(path)
    checked = textadapt("datasets", "check", "cutouts")
    assert checked.returncode == 0, checked.stderr
    assert "11 classes, 198 images" in checked.stdout and "images per class: 10 to 35" in checked.stdout
    assert "10 templates rendered for every class (110 prompts)" in checked.stdout and "ok: no problem found" in checked.stdout

    # A run on it, training on an imported description file (no LLM), scored on 22 images: 2 per class.
    descriptions = {c: [f"A cut-out photo of {c}.", f"Some {c} on a white background."] for c in spec.classes}
    (home / "d.json").write_text(json.dumps(descriptions))
    assert textadapt("descriptions", "import", str(home / "d.json"), "--dataset", "cutouts", "--source", "mine").returncode == 0
    run = textadapt(
        "run",
        "cutouts",
        "--backbone",
        TINY,
        "--templates",
        "",
        "--sources",
        "mine",
        "--max-images",
        "22",
        "--steps",
        "5",
        "--seeds",
        "1",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = Path(re.search(r"report: (\S+\.md)", run.stdout).group(1)).read_text()
    assert "test images: 22 from `folder:" in report and "11 classes" in report
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        assert s.sql("SELECT status FROM runs")[1] == [("completed",)]


def break_everything(cutouts: Path, home: Path) -> list[str]:
    """Every bad input of the issue at once; returns what the error must say about each."""
    path = new_dataset(cutouts, home, filled=False)
    fill_in(path, domain="FILL IN: the kind of image")  # one placeholder left
    (cutouts / "birds" / "crow.png").unlink()
    (cutouts / "birds" / "crow.png").write_bytes((STAMPS / "animals/birds/crow.png").read_bytes()[:5000])  # truncated
    (cutouts / "fish" / "notes.png").write_text("not an image, whatever its name says")  # garbage
    (cutouts / "insects").mkdir()  # a class folder the spec does not list
    shutil.copy(STAMPS / "animals/insects/bee.png", cutouts / "insects")
    (home / "reports").write_text("")  # the report folder cannot be created
    return [
        rf"{re.escape(str(path))}:\d+: field 'prompting.domain' is still a placeholder",
        rf"{re.escape(str(cutouts / 'birds' / 'crow.png'))}: cannot be decoded: image file is truncated",
        rf"{re.escape(str(cutouts / 'fish' / 'notes.png'))}: not an image Pillow can read",
        rf"{re.escape(str(cutouts))}: 1 folder\(s\) of images are no class of {re.escape(str(path))}: insects",
        rf"{re.escape(str(home / 'reports'))}: the report folder is a file, not a folder",
    ]


def test_a_run_names_every_bad_input_at_once_before_any_llm_call(cutouts, home):
    expected = break_everything(cutouts, home)
    run = textadapt("run", "cutouts", "--backbone", TINY, "--samples", "1")  # the default templates: an LLM would be asked
    shown = run.stdout + run.stderr
    assert run.returncode == 2 and "Traceback" not in shown, shown
    error = run.stderr[run.stderr.index("error: ") :]
    assert "5 problem(s), found before any LLM call" in error
    for pattern in expected:
        assert re.search(pattern, error), f"{pattern!r} not in:\n{error}"
    # refused before the run starts (and before Prefect): nothing asked, nothing written, no cache file made
    assert not (home / "textadapt.duckdb").exists()


def test_check_names_every_bad_input_without_prefect_or_the_cache(cutouts, home):
    expected = break_everything(cutouts, home)
    checked = textadapt("datasets", "check", "cutouts")
    assert checked.returncode == 2 and "Traceback" not in checked.stdout + checked.stderr
    for pattern in expected[:4]:  # the report folder is the run's, not the dataset's
        assert re.search(pattern, checked.stderr), f"{pattern!r} not in:\n{checked.stderr}"
    assert "4 problem(s) in dataset 'cutouts'" in checked.stderr
    assert not (home / "textadapt.duckdb").exists()
    # the same command in a fresh interpreter never imports Prefect
    probe = (
        "import sys; from textadapt.cli import app\n"
        "try: app(['datasets', 'check', 'cutouts'])\nexcept SystemExit: pass\n"
        "print('prefect imported' if 'prefect' in sys.modules else 'no prefect')"
    )
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert p.stdout.strip().endswith("no prefect"), p.stdout + p.stderr


@pytest.mark.parametrize(
    "breaks, message",
    [
        (
            lambda d, h: (d / "planets").rename(d / "planet"),
            r"no folder for class 8 'planets'.*\n?.*1 folder\(s\) of images are no class of \S+: planet",
        ),
        (lambda d, h: [f.unlink() for f in (d / "fish").iterdir()], r"no test image for classes \['fish'\]"),
        (
            lambda d, h: fill_in(h / "datasets" / "cutouts.toml", task="FILL IN: later"),
            r"field 'prompting.task' is still a placeholder",
        ),
    ],
)
def test_layout_problems_are_listed_with_what_to_do(cutouts, home, breaks, message):
    new_dataset(cutouts, home)
    breaks(cutouts, home)
    result = check_dataset("cutouts", Settings())
    assert re.search(message, "\n".join(result.problems)), result.problems


def test_ignored_folders_and_hidden_files_are_left_out(cutouts, home):
    path = new_dataset(cutouts, home)
    (cutouts / "misc").mkdir()
    shutil.copy(BLACK_PAWN, cutouts / "misc")
    assert "misc" in "\n".join(check_dataset("cutouts", Settings()).problems)
    path.write_text(path.read_text().replace("ignore = []", 'ignore = ["misc"]'))
    # hidden files and folders are no images and no classes (macOS leaves "._NAME.png" beside every file)
    (cutouts / "birds" / "._crow.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (cutouts / ".thumbnails").mkdir()
    shutil.copy(BLACK_PAWN, cutouts / ".thumbnails")
    result = check_dataset("cutouts", Settings())
    assert result.problems == [] and len(result.images) == 198


def test_split_folders_are_found_or_the_error_says_where_to_look(tmp_path, cutouts, home):
    nested = tmp_path / "nested"
    shutil.copytree(cutouts, nested / "test", symlinks=True)
    _, new = write_new_spec("nested", nested, home / "datasets")
    assert new.split == "test" and len(new.classes) == 11  # DIR/test/<class>/ found by itself

    path = new_dataset(cutouts, home)  # a plain ImageFolder, but the spec says split = "test"
    path.write_text(path.read_text().replace('split = ""', 'split = "test"'))
    with pytest.raises(
        TextadaptError,
        match=rf"looked for class folders in {re.escape(str(cutouts / 'test'))}; "
        rf"{re.escape(str(cutouts))} itself holds class folders: set split = \"\"",
    ):
        load_test_images(find_spec("cutouts", Settings().dataset_search_path), home)


def test_datasets_new_refuses_what_it_cannot_do_cleanly(tmp_path, cutouts, home):
    new_dataset(cutouts, home, filled=False)
    with pytest.raises(TextadaptError, match=r"cutouts.toml exists; pass --force"):
        write_new_spec("cutouts", cutouts, home / "datasets")
    with pytest.raises(TextadaptError, match=r"no class folders holding images"):
        write_new_spec("empty", tmp_path / "cutouts" / "birds", home / "datasets")  # PNGs, but no class folders
    with pytest.raises(TextadaptError, match=r"dataset name 'my data'"):
        write_new_spec("my data", cutouts, home / "datasets")
    assert [readable_name(f) for f in ("001.Black_footed_Albatross", "ApplyEyeMakeup", "sea_turtle", "T-shirt", "n01443537")] == [
        "Black footed Albatross",
        "Apply Eye Makeup",
        "sea turtle",
        "T-shirt",
        "n01443537",
    ]


def test_max_images_takes_an_even_seeded_share_of_every_class(cutouts, home):
    new_dataset(cutouts, home)
    spec = find_spec("cutouts", Settings().dataset_search_path)
    images = load_test_images(spec, home)
    assert len(images) == 198 and np.bincount(images.labels).tolist()[0] == 35  # birds first: 35 files
    _, twenty = restrict(spec, images, None, 20)
    counts = np.bincount(twenty.labels, minlength=11)
    assert counts.sum() == 20 and set(counts.tolist()) == {1, 2}  # not the first 20 files (all birds)
    again = restrict(spec, load_test_images(spec, home), None, 20)[1]
    assert again.images == twenty.images  # the same images every time
    _, many = restrict(spec, images, None, 150)
    counts = np.bincount(many.labels, minlength=11)
    full = counts == np.bincount(images.labels)  # classes with fewer images than their share give them all
    assert counts.sum() == 150 and counts[8] == 10 and full[8] and np.ptp(counts[~full]) <= 1
    # seeded: another seed picks other birds, and within a class the order of the files is kept
    labels = images.labels
    assert not np.array_equal(stratified(labels, 22, seed=0), stratified(labels, 22, seed=1))
    assert np.all(np.diff(stratified(labels, 22)) > 0)


def test_transparent_cutouts_are_composited_on_the_specs_background(cutouts, home, tiny_backbone):
    assert Image.open(BLACK_PAWN).mode == "LA"  # grey with an alpha channel
    rgba = np.asarray(Image.open(BLACK_PAWN).convert("RGBA"))
    assert rgba[0, 0, 3] == 0 and rgba[0, 0, :3].tolist() == [0, 0, 0]  # invisible black corners
    white = np.asarray(open_rgb(BLACK_PAWN))
    assert white[0, 0].tolist() == [255, 255, 255]
    solid = rgba[..., 3] == 255
    assert np.array_equal(white[solid], rgba[solid][:, :3])  # the piece itself is untouched, and dark
    assert white[solid].mean() < 80

    # through a dataset: white by default, or the spec's colour; the cache key follows the background
    path = new_dataset(cutouts, home)
    spec = find_spec("cutouts", Settings().dataset_search_path)
    images = load_test_images(spec, home)
    i = [Path(p).name for p in images.images].index("b_6_pawn.png")
    assert np.asarray(images.pil(i))[0, 0].tolist() == [255, 255, 255]
    path.write_text(path.read_text().replace('background = "white"', 'background = "#808080"'))
    grey = load_test_images(find_spec("cutouts", Settings().dataset_search_path), home)
    assert np.asarray(grey.pil(i))[0, 0].tolist() == [128, 128, 128]
    assert grey.keys()[i] != images.keys()[i] and grey.keys()[i] == image_key(images.images[i], (128, 128, 128))
    jpeg = home / "opaque.jpg"
    Image.fromarray(rgba[..., :3]).save(jpeg)
    assert image_key(jpeg, (128, 128, 128)) == image_key(jpeg)  # an opaque image keeps its key

    # `textadapt predict` decodes the same way: the cut-out embeds as a white-flattened copy of it does
    from textadapt.classifier import embed_files

    alpha = rgba[..., 3:4] / 255.0
    flat = home / "flat.png"
    Image.fromarray(np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)).save(flat)  # blended here, by hand
    black = home / "black.png"
    Image.fromarray(rgba[..., :3]).save(black)  # what the old decoding saw
    emb = embed_files(tiny_backbone, [BLACK_PAWN, flat, black])
    assert np.abs(emb[0] - emb[1]).max() < 1e-3 < np.abs(emb[0] - emb[2]).max()


def test_preflight_names_an_unwritable_report_folder(cutouts, home, fmnist):
    from textadapt.prompts import templates_for

    spec, images = restrict(fmnist, load_test_images(fmnist, home, strict=False), 2, 10)
    templates = templates_for(Settings().prompts_dir, ["generic", "targeted"], spec)
    preflight(spec, images, templates, home / "reports")  # all well: returns quietly, and leaves nothing behind
    assert list((home / "reports").iterdir()) == []
    (home / "blocked").write_text("")
    with pytest.raises(TextadaptError, match=r"1 problem\(s\).*\n  - \S+blocked/reports: the report folder is not writable"):
        preflight(spec, images, templates, home / "blocked" / "reports")
