"""Import and export of {class: [sentences]} files, with the real CuPL ImageNet file from clip-benchmark."""

import importlib.util
import json
from pathlib import Path

import pytest

from textadapt import TextadaptError
from textadapt.config import Settings
from textadapt.datasets import find_spec
from textadapt.descriptions import export_descriptions, import_descriptions
from textadapt.store import Store

CUPL = Path(importlib.util.find_spec("clip_benchmark").submodule_search_locations[0]) / "datasets" / "cupl_prompts.json"


def test_cupl_imagenet_file_imports_against_the_imagenet_spec(tmp_path):
    spec = find_spec("imagenet1k", Settings().dataset_search_path)
    with Store(tmp_path / "c.duckdb") as store:
        r = import_descriptions(CUPL, spec, "cupl", store)
        n = store.sql("SELECT count(*) FROM generations WHERE template = 'import/cupl'")[1][0][0]
        again = import_descriptions(CUPL, spec, "cupl", store)  # the same file again adds nothing
        assert store.sql("SELECT count(*) FROM generations")[1][0][0] == n
    assert r.rows == n == again.rows > 100_000
    assert len(r.per_class) == 998 and r.unmatched == []
    assert r.missing == ["projectile", "dark glasses"]  # renamed in our spec: CuPL's file has one key for each pair
    assert r.per_class["goldfish"] > 10


def test_names_that_match_no_class_are_reported(tmp_path, fmnist):
    f = tmp_path / "mine.json"
    f.write_text(
        json.dumps(
            {
                "T-shirt_or_top": ["A plain top with short sleeves."],
                "SANDAL": ["Open straps on a flat sole."],
                "hat": ["A brim around a crown."],
            }
        )
    )
    with Store(tmp_path / "c.duckdb") as store:
        r = import_descriptions(f, fmnist, "mine", store)
        assert r.unmatched == ["hat"]
        assert r.per_class == {"T-shirt or top": 1, "sandal": 1}
        assert export_descriptions(store, "fashion-mnist", "import/mine") == {
            "T-shirt or top": ["A plain top with short sleeves."],
            "sandal": ["Open straps on a flat sole."],
        }


@pytest.mark.parametrize(
    "content, message",
    [("[1, 2]", "expected a JSON object"), ('{"bag": "one"}', "not a list of strings"), ("{not json", "not a JSON file")],
)
def test_bad_files_are_refused(tmp_path, fmnist, content, message):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with Store(tmp_path / "c.duckdb") as store, pytest.raises(TextadaptError, match=message):
        import_descriptions(f, fmnist, "bad", store)
