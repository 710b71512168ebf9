"""The cache on real runs, through the real CLI (in-process SmolLM2, the tiny untrained backbone, Fashion-MNIST):
`textadapt sql` and the `duckdb` shell answer while a run generates, and the views answer the questions users ask.

Three runs share one cache: a first run (watched by readers while it runs), the same run again with another adapter
(every generation from the cache), and a run after editing one template."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY

from textadapt.store import Store

CLI = str(Path(sys.executable).parent / "textadapt")
SHELL = str(Path(sys.executable).parent / "duckdb")
ARGS = [
    "run",
    "fashion-mnist",
    "--backbone",
    TINY,
    "--max-classes",
    "3",
    "--samples",
    "2",
    "--max-images",
    "300",
    "--steps",
    "30",
    "--templates",
    "targeted",
]  # 3 classes x 5 questions x 2 samples = 30 generations
GENERATIONS = 30


def run_id(p: subprocess.CompletedProcess) -> str:
    return re.search(r"report: \S+/(\S+)\.md", p.stdout).group(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The three runs; yields (cache path, env, run ids, what the readers saw during the first run, the first report)."""
    home = tmp_path_factory.mktemp("views") / "home"
    prompts = home.parent / "prompts"
    shutil.copytree(REPO / "prompts", prompts)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TEXTADAPT_DB", "TEXTADAPT_CONFIG", "TEXTADAPT_BACKBONE", "TEXTADAPT_LLM")
    }
    env.update(TEXTADAPT_HOME=str(home), TEXTADAPT_PROMPTS_DIR=str(prompts), PREFECT_LOGGING_LEVEL="INFO")
    db = home / "textadapt.duckdb"

    def textadapt(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=900, stdin=subprocess.DEVNULL)
        assert not check or p.returncode == 0, f"textadapt {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    # 1. A run, and while it runs: `textadapt sql` and one-shot `duckdb -readonly` shells, one after the other.
    first = subprocess.Popen(
        [CLI, *ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL
    )
    answers = []  # (tool, return code, count or error)
    sql = "SELECT count(*) FROM generations"
    while first.poll() is None:
        if not db.exists():
            time.sleep(0.2)
            continue
        p = textadapt("sql", "--format", "csv", sql, check=False)
        answers.append(("textadapt sql", p.returncode, int(p.stdout.split()[-1]) if p.returncode == 0 else p.stderr))
        # The shell does not wait for DuckDB's lock as textadapt's readers do; the writer takes it only to fold, at its
        # start and end: ask while it generates (between the first rows seen and the last).
        while first.poll() is None and answers[-1][1] == 0 and 0 < answers[-1][2] < GENERATIONS:
            shell = subprocess.run(
                [SHELL, "-readonly", "-csv", "-noheader", str(db), "-c", sql], capture_output=True, text=True, timeout=60
            )
            answers.append(("duckdb", shell.returncode, int(shell.stdout) if shell.returncode == 0 else shell.stderr))
            if answers[-1][2] == GENERATIONS:
                break
            time.sleep(0.1)
    out, err = first.communicate()
    assert first.returncode == 0, out + err
    first = subprocess.CompletedProcess(ARGS, 0, out, err)

    # 2. The same run with another adapter: every generation from the cache.
    again = textadapt(*ARGS, "--methods", "zs-head")
    assert "0 LLM calls" in again.stdout

    # 3. After editing one template: its 6 generations are new.
    look = prompts / "targeted" / "look.j2"
    look.write_text(look.read_text().replace("look like", "look like, seen from the front,"))
    edited = textadapt(*ARGS)
    assert "6 LLM calls, 24 cached" in edited.stdout
    yield db, textadapt, [run_id(first), run_id(again), run_id(edited)], answers, first


def query(db: Path, sql: str, params=None) -> list[tuple]:
    with Store(db, read_only=True) as s:
        return s.query(sql, params)


def test_textadapt_sql_and_the_duckdb_shell_answer_while_a_run_writes(cache):
    db, _, _, answers, _ = cache
    failed = [a for a in answers if a[1] != 0]
    assert not failed, failed
    counts = [a[2] for a in answers]
    assert counts == sorted(counts)  # it grows ...
    assert counts[-1] == GENERATIONS  # ... to the final count
    shell = [c for tool, _, c in answers if tool == "duckdb"]
    assert len(set(shell)) >= 3  # the shell saw it grow, during generation
    assert len([a for a in answers if a[0] == "textadapt sql"]) >= 3


def test_run_llm_usage_is_what_each_run_spent(cache):
    db, _, (first, again, edited), _, _ = cache
    usage = {
        r: (calls, prompt, completion)
        for r, calls, prompt, completion in query(
            db, "SELECT run_id, llm_calls, prompt_tokens, completion_tokens FROM run_llm_usage"
        )
    }
    assert usage[again] == (0, 0, 0)  # a re-run served entirely from the cache spent nothing
    assert usage[first][0] == GENERATIONS and usage[first][2] > 0 and usage[edited][0] == 6 and usage[edited][2] > 0
    assert usage[first][2] + usage[edited][2] == query(db, "SELECT sum(completion_tokens) FROM generations")[0][0]
    with Store(db, read_only=True) as s:  # the report's figure: what the generations a run used cost when made
        assert sum(u.generations for u in s.llm_usage(again).values()) == GENERATIONS and s.llm_spent(again) == {}
        assert s.llm_spent(edited)["targeted"].generations == 6
    assert query(db, "SELECT llm_calls FROM runs WHERE run_id = ?", [edited]) == [(6,)]  # the run's own count agrees


def test_current_descriptions_after_a_template_edit(cache):
    db, textadapt, (first, _, edited), _, _ = cache
    hashes = dict(
        query(db, "SELECT run_id, any_value(template_hash) FROM generations WHERE template = 'targeted/look' GROUP BY ALL")
    )
    assert hashes[first] != hashes[edited]
    current = query(db, "SELECT DISTINCT template_hash FROM current_descriptions WHERE template = 'targeted/look'")
    assert current == [(hashes[edited],)]  # only the edited version's
    # the other templates' descriptions are current as they were; every accepted item of the current rows, no other
    [(expected,)] = query(
        db,
        "SELECT count(*) FROM descriptions d JOIN generations g USING (key) WHERE g.template <> 'targeted/look' "
        "OR g.template_hash = ?",
        [hashes[edited]],
    )
    assert query(db, "SELECT count(*) FROM current_descriptions") == [(expected,)]
    exported = json.loads(textadapt("descriptions", "export", "--template", "targeted/look").stdout)
    new = {
        d
        for (d,) in query(
            db, "SELECT d.description FROM descriptions d JOIN generations g USING (key) WHERE g.run_id = ?", [edited]
        )
    }
    assert exported and {d for ds in exported.values() for d in ds} == new


def test_run_descriptions_say_what_each_run_trained_on(cache):
    db, textadapt, (first, again, edited), _, report = cache
    report = Path(re.search(r"report: (\S+\.md)", report.stdout).group(1)).read_text()
    trained = int(re.search(r"Trained on (\d+) descriptions", report).group(1))
    rows = query(
        db,
        "SELECT class_name, template_set, template, description, used, excluded FROM run_descriptions WHERE run_id = ?",
        [first],
    )
    assert sum(used for *_, used, _ in rows) == trained
    assert all(s == "targeted" and t.startswith("targeted/") for _, s, t, *_ in rows)
    assert all((excluded is None) == used for *_, used, excluded in rows)
    assert {c for c, *_ in rows} == {"T-shirt or top", "trouser", "pullover"}
    # the same descriptions for the cached re-run; the edited run's look descriptions are the new version's
    assert sorted(query(db, "SELECT key, item, used FROM run_descriptions WHERE run_id = ?", [again])) == sorted(
        query(db, "SELECT key, item, used FROM run_descriptions WHERE run_id = ?", [first])
    )
    assert query(
        db,
        "SELECT DISTINCT g.run_id FROM run_descriptions r JOIN generations g USING (key) "
        "WHERE r.run_id = ? AND r.template = 'targeted/look'",
        [edited],
    ) == [(edited,)]
    exported = json.loads(textadapt("descriptions", "export", "--run", first).stdout)
    used = {(c, d) for c, _, _, d, u, _ in rows if u}
    assert {(c, d) for c, ds in exported.items() for d in ds} == used


def test_run_results_and_latest_results(cache):
    db, _, (first, again, edited), _, _ = cache
    rows = query(db, "SELECT run_id, dataset, status, backbone_spec, untrained, llm, method FROM run_results")
    assert {r[0] for r in rows} == {first, again, edited}
    assert all(r[1:5] == ("fashion-mnist", "completed", TINY, True) and r[5].startswith("llama-cpp:") for r in rows)
    assert query(db, "SELECT count(*) FROM run_results") == query(db, "SELECT count(*) FROM results")
    latest = dict(query(db, "SELECT method, run_id FROM latest_results"))
    assert latest["tap-head:targeted"] == edited and latest["zero-shot:class-name"] == edited
    assert latest["zs-head:targeted"] == again  # only the second run trained it
    assert len(latest) == len({m for *_, m in rows})  # one row per method (one dataset, one backbone here)
