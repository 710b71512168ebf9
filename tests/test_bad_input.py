"""Bad input that is not tested beside its module (docs/reliability.md's tables list
those that are): files that are not UTF-8, a writing statement through ``textadapt sql``, and LLM
output that is not valid text or is huge, from a real ``llama_cpp.server`` behind a ``FaultProxy``.
Each case says what the user sees: the message names the file, line and value; or the generation
is stored, cleaned or rejected with its reason, instead of failing the run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Fault, FaultProxy

from textadapt import TextadaptError
from textadapt.cleaning import MAX_RAW_CHARS
from textadapt.config import Settings
from textadapt.datasets import find_spec, load_spec, restrict
from textadapt.llm import Sampling, make_backend
from textadapt.pipeline import generate, plan_generations
from textadapt.prompts import list_templates
from textadapt.store import Store

GOOD_SPEC = Path(__file__).resolve().parent.parent / "data" / "datasets" / "fashion-mnist.toml"


def spec_not_utf8(tmp_path: Path) -> None:
    text = GOOD_SPEC.read_text().replace('name = "fashion-mnist"', 'name = "mine"').replace('"sandal"', '"sandale"')
    assert '"sandale"' in text.splitlines()[11]  # line 12: the first place the bad byte goes
    data = text.encode().replace(b'"sandale"', b'"sand\xe0le"')  # saved as Latin-1 by an editor
    (tmp_path / "mine.toml").write_bytes(data)
    load_spec(tmp_path / "mine.toml")


def template_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "p" / "mine").mkdir(parents=True)
    (tmp_path / "p" / "mine" / "q.j2").write_bytes(b"{# what it asks #}\nWhat does {{ class_name }} look like\xa0?\n")
    list_templates(tmp_path / "p", ["mine"])


def sql_that_writes(tmp_path: Path) -> None:
    db = tmp_path / "c.duckdb"
    with Store(db) as s:
        s.start_run("r1", "fashion-mnist", {})
    p = subprocess.run(
        [str(Path(sys.executable).parent / "textadapt"), "--db", str(db), "sql", "DELETE FROM runs WHERE true"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 2
    with Store(db, read_only=True) as s:
        assert s.sql("SELECT run_id FROM runs")[1] == [("r1",)]  # untouched
    raise TextadaptError(" ".join(p.stderr.split()))  # what the user reads, unwrapped


@pytest.mark.parametrize(
    "make, message",
    [
        pytest.param(
            spec_not_utf8,
            r"mine\.toml:12: not UTF-8 text \(byte 0xe0 at offset \d+\); save the file as UTF-8",
            id="dataset-spec-not-utf8",
        ),
        pytest.param(template_not_utf8, r"mine/q\.j2:2: not UTF-8 text \(byte 0xa0 at offset \d+\)", id="template-not-utf8"),
        pytest.param(
            sql_that_writes,
            r"error: \S+c\.duckdb: 'DELETE FROM runs WHERE true' writes to the cache, which `textadapt sql` "
            r"opens read-only; add --write if you mean it",
            id="sql-write-without-write",
        ),
    ],
)
def test_bad_file_or_statement_is_refused_naming_it(tmp_path, make, message):
    with pytest.raises(TextadaptError, match=message):
        make(tmp_path)


CLEAN_SENTENCE = "A shirt with buttons and a collar"


@pytest.mark.parametrize(
    "content, rejected, description, raw",
    [
        # bytes that are not UTF-8 inside the answer: kept as U+FFFD in raw_text, left out of the description
        pytest.param(
            b"A shirt \xff\xfe with buttons and a collar",
            None,
            CLEAN_SENTENCE,
            "A shirt \ufffd\ufffd with buttons",
            id="invalid-utf8-bytes",
        ),
        # a lone surrogate escape (no database can store it): the same
        pytest.param(
            b"A shirt \\udc9f with buttons and a collar",
            None,
            CLEAN_SENTENCE,
            "A shirt \ufffd with buttons",
            id="lone-surrogate-escape",
        ),
        # 1 MB with no sentence end: rejected as too long, raw_text capped and saying how long it was
        pytest.param(
            b"A long shirt " + b"with many buttons " * 58_000,
            "too long",
            None,
            "[... cut: 1,044,013 characters in all]",
            id="1MB-runaway-answer",
        ),
        # 1 MB that starts with a sentence: that sentence is the description, raw_text capped
        pytest.param(
            b"A shirt with buttons and a collar. " + b"And more. " * 100_000,
            None,
            CLEAN_SENTENCE,
            "[... cut: 1,000,035 characters in all]",
            id="1MB-answer-after-a-sentence",
        ),
    ],
)
def test_broken_or_huge_llm_output_is_stored_cleaned_or_rejected(llama_server, tmp_path, content, rejected, description, raw):
    settings = Settings()
    spec, _ = restrict(find_spec("fashion-mnist", settings.dataset_search_path), None, 2, None)
    templates = list_templates(settings.prompts_dir, ["generic"])[:1]
    with FaultProxy(llama_server, lambda n, body: Fault("content", content=content)) as proxy:
        backend = make_backend("openai:smollm2", Settings(llm_base_url=proxy.url, llm_n_per_request=False))
        plan = plan_generations(spec, templates, backend.identity, Sampling(max_tokens=12), samples=1)
        with Store(tmp_path / "c.duckdb") as store:
            stats = generate(plan, backend, store, spec)  # no exception: the run goes on
            rows = store.sql("SELECT raw_text, description, rejected FROM generations")[1]
    assert stats.made == 2 and len(rows) == 2
    for raw_text, desc, why in rows:
        assert why == rejected
        assert (desc.rstrip(".") if desc else desc) == description  # a "stop" answer gets its period back
        assert raw in raw_text and len(raw_text) <= MAX_RAW_CHARS + 60
