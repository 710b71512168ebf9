import os
import tempfile
from pathlib import Path

import pytest

# Prefect keeps its temporary API's database under PREFECT_HOME: keep it out of the user's home.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="textadapt-prefect-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parent.parent
TINY = "textadapt-tiny:random"  # a 2-layer open_clip config shipped in textadapt/model_configs


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own TEXTADAPT_HOME (cache file, reports)."""
    h = tmp_path / "home"
    monkeypatch.setenv("TEXTADAPT_HOME", str(h))
    for var in ("TEXTADAPT_DB", "TEXTADAPT_CONFIG", "TEXTADAPT_BACKBONE", "TEXTADAPT_LLM"):
        monkeypatch.delenv(var, raising=False)
    return h


@pytest.fixture(scope="session")
def tiny_backbone():
    from textadapt.encoders import load_backbone

    return load_backbone(TINY, "cpu")


@pytest.fixture(scope="session")
def fmnist():
    from textadapt.config import Settings
    from textadapt.datasets import find_spec

    return find_spec("fashion-mnist", Settings().dataset_search_path)
