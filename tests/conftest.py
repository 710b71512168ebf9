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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """A real OpenAI-compatible server: ``python -m llama_cpp.server`` serving SmolLM2 as ``smollm2``.
    Yields its base URL (``http://127.0.0.1:PORT/v1``)."""
    import subprocess
    import sys
    import time
    import urllib.request

    from textadapt.llm import smollm2_path

    port = free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    # One thread: as fast for this 135M model, and it never spins at a thread barrier. With 2 threads on
    # 2 cores, any other busy process (a llama.cpp or torch run beside the tests) slowed answers from
    # 0.3 s to over a minute (past the client's timeout); with 1 thread they stay seconds.
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_path()), "--model_alias", "smollm2",
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_threads", "1"]
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"

    def server_output() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with code {proc.returncode}:\n{server_output()}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not answer GET {base_url}/models within 60 s:\n{server_output()}")
            time.sleep(0.2)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
