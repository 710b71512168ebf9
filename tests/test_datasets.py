import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from textadapt import TextadaptError
from textadapt.config import Settings
from textadapt.datasets import find_spec, load_spec, load_test_images

GOOD = Path(__file__).resolve().parent.parent / "data" / "datasets" / "fashion-mnist.toml"


def write_spec(tmp_path: Path, text: str, name: str = "mine") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


def test_fashion_mnist_spec_matches_the_real_labels(fmnist, home):
    images = load_test_images(fmnist, home)
    assert len(images) == 10_000
    assert len(fmnist.classes) == 10
    assert np.array_equal(np.bincount(images.labels), np.full(10, 1000))
    assert fmnist.classes[9] == "ankle boot"  # label 9 is the ankle boot in Fashion-MNIST


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(TextadaptError, match=r"unknown dataset 'nope'.*fashion-mnist"):
        find_spec("nope", Settings().dataset_search_path)


def test_a_new_dataset_is_a_file_not_code(tmp_path, monkeypatch):
    d = tmp_path / "specs"
    d.mkdir()
    write_spec(d, GOOD.read_text().replace('name = "fashion-mnist"', 'name = "mine"'))
    monkeypatch.setenv("TEXTADAPT_DATASETS_DIRS", f'["{d}"]')
    assert find_spec("mine", Settings().dataset_search_path).path == d / "mine.toml"


@pytest.mark.parametrize(
    "change, message",
    [
        (('"trouser",', '"shirt",'), r"field 'classes'.*'shirt' duplicates class 1"),
        (('"trouser",', '" ",'), r"field 'classes'.*class 1 is empty"),
        (("steps = 400", "steps = -1"), r"mine.toml:\d+: field 'train.steps'"),
        (("[prompting]", "[prompting]\ncolour = 1"), r"mine.toml:\d+: field 'prompting.colour'.*Extra inputs"),
        (('"a photo of a {}.",', '"a photo.",'), r"no '\{\}' where the class name goes"),
        (('"sandal" = ["sneaker"', '"sandal" = ["clog"'), r"prompting.confusable names \['clog'\]"),
    ],
)
def test_bad_spec_errors_name_file_line_and_field(tmp_path, change, message):
    text = GOOD.read_text().replace('name = "fashion-mnist"', 'name = "mine"')
    assert change[0] in text
    path = write_spec(tmp_path, text.replace(change[0], change[1], 1))
    with pytest.raises(TextadaptError, match=message):
        load_spec(path)


def test_toml_syntax_error_names_the_line(tmp_path):
    path = write_spec(tmp_path, 'name = "mine"\n\nclasses = = ["a", "b"]\n')
    with pytest.raises(TextadaptError, match=r"mine.toml:3:\d+: not valid TOML"):
        load_spec(path)


def test_class_count_that_does_not_match_the_labels_is_refused(tmp_path, home):
    text = GOOD.read_text().replace('name = "fashion-mnist"', 'name = "mine"').replace('  "ankle boot",\n', "")
    text = re.sub(r"\[prompting\.confusable\].*?(?=\n\[zeroshot\])", "", text, flags=re.S)
    spec = load_spec(write_spec(tmp_path, text))
    assert len(spec.classes) == 9
    with pytest.raises(TextadaptError, match=r"9 classes, but the labels .* run from 0 to 9"):
        load_test_images(spec, home)


def test_missing_images_say_how_to_get_them(tmp_path, home):
    text = GOOD.read_text().replace('name = "fashion-mnist"', 'name = "mine"')
    text = text.replace("/usr/share/datasets/fashion-mnist", str(tmp_path / "nowhere"))
    text = text.split('[[images]]\nkind = "torchvision"')[0]  # no network source either
    spec = load_spec(write_spec(tmp_path, text))
    with pytest.raises(
        TextadaptError, match=r"(?s)no images for dataset 'mine'.*looked in .*nowhere.*apt-get install dataset-fashion-mnist"
    ):
        load_test_images(spec, home)


def test_folder_source_labels_follow_the_spec_not_the_folder_order(tmp_path, home):
    root = tmp_path / "imgs" / "test"
    for folder, n in [("zebra", 2), ("apple", 3)]:
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), i * 40, np.uint8)).save(root / folder / f"{i}.png")
    spec_text = (
        'name = "mine"\nclasses = ["zebra", "apple"]\n[prompting]\ndomain = "a photo"\ncategory = "thing"\ntask = "t"\n'
        f'[train]\nsteps = 5\n[[images]]\nkind = "folder"\ndir = "{tmp_path / "imgs"}"\n'
    )
    images = load_test_images(load_spec(write_spec(tmp_path, spec_text)), home)
    assert images.labels.tolist() == [0, 0, 1, 1, 1]  # zebra is class 0 although "apple" sorts first
