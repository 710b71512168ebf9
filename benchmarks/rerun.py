"""9. An unchanged re-run of `make run`: its wall time against the floors it cannot go under, in the same run.

`make run` is ``textadapt run fashion-mnist --backbone ViT-B-32:auto``. Once it has run (it fills the cache: 500 LLM
generations, 2,656 text and 10,000 image embeddings, the trained heads), running it again asks for nothing and pays
only fixed costs. This script times that re-run in the cache `make run` filled (``$TEXTADAPT_HOME``, else textadapt's
default home; it refuses if the run is not fully cached there, since a cold run takes 20 minutes here), rotating with
two anchors measured the same way:

- imports: ``python -c "import torch, prefect"``, the libraries any run needs, and nothing else;
- API server: Prefect's API server started as ``textadapt run`` starts its temporary one, until it answers.

The re-run starts the server first and imports while it starts, so the server is the floor. The cold run's figure
(flow seconds) comes from the oldest completed run with the same options in the same cache.

    .venv/bin/python benchmarks/rerun.py [--repeats 3]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import _common

NAME = "rerun"
ARGS = ["run", "fashion-mnist", "--backbone", "ViT-B-32:auto"]  # the Makefile's MAIN_ARGS
SERVER = (
    "from textadapt.cli import _prefect_env; _prefect_env()\n"
    "from textadapt.flows.temporary_api import start_temporary_api\n"
    "start_temporary_api()()"
)


def env() -> dict:
    """The user's environment (their cache and Prefect home), with the checkout's textadapt first on the path."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(_common.REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def timed(cmd: list[str]) -> tuple[float, None]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, cwd=_common.REPO)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return seconds, None


def runs(db) -> list[dict]:
    """Every completed run in the cache whose options are those of `make run`'s command, oldest first."""
    import duckdb

    from textadapt.config import RunOptions

    flags = dict(zip(ARGS[2::2], ARGS[3::2]))  # --backbone ViT-B-32:auto
    wanted = RunOptions.parse({"dataset": ARGS[1], **{k.removeprefix("--"): v for k, v in flags.items()}}).model_dump()
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute(
            "SELECT run_id, options, llm_calls, text_encoder_calls, epoch(finished_at - started_at) FROM runs "
            "WHERE status = 'completed' ORDER BY started_at"
        ).fetchall()
    finally:
        con.close()
    return [
        {"run_id": run_id, "llm_calls": llm_calls, "text_encoder_calls": text_calls, "flow_seconds": seconds}
        for run_id, options, llm_calls, text_calls, seconds in rows
        if json.loads(options) == json.loads(json.dumps(wanted))
    ]


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    args.repeats = args.repeats or 3
    from textadapt.config import Settings

    db = Settings().db_path
    textadapt = [sys.executable, "-m", "textadapt.cli", *ARGS]
    print(f"textadapt {' '.join(ARGS)} in {db}", flush=True)
    if not db.exists() or not runs(db):
        sys.exit(f"{db}: `make run` has not completed there (a cold run takes about 20 minutes here); run `make run` first")
    timed(textadapt)  # a first re-run: anything a changed checkout invalidates (e.g. the heads) is filled here
    last = runs(db)[-1]
    if last["llm_calls"] or last["text_encoder_calls"]:
        sys.exit(f"{db}: `make run` was not fully cached there (the re-run called the LLM or the encoder); run it again")
    sides = {
        "re-run": lambda: timed(textadapt),
        "imports": lambda: timed([sys.executable, "-c", "import torch, prefect"]),
        "API server": lambda: timed([sys.executable, "-c", SERVER]),
    }
    r = _common.rotate(sides, args.repeats, anchor="imports")
    reruns = runs(db)[-args.repeats :]
    assert all(x["llm_calls"] == 0 and x["text_encoder_calls"] == 0 for x in reruns), reruns
    cold = next((x for x in runs(db) if x["llm_calls"]), None)
    med = r["median_s"]
    figures = {
        **r,
        "rerun_median_s": med["re-run"],
        "rerun_over_server": med["re-run"] / med["API server"],
        "goal_s": 15.0,
        "goal_met": med["re-run"] <= 15.0,
        "rerun_flow_seconds": [x["flow_seconds"] for x in reruns],
        "cold_run_id": cold and cold["run_id"],
        "cold_flow_seconds": cold and cold["flow_seconds"],
    }
    if cold:
        figures["rerun_over_cold"] = med["re-run"] / cold["flow_seconds"]
    rows = [[n, round(med[n], 2), " ".join(f"{x:.1f}" for x in r["seconds"][n])] for n in r["sides"]]
    print(_common.table(["side", "median wall (s)", "each repetition (s)"], rows))
    print(
        f"re-run {med['re-run']:.1f} s: {r['ratio_median']['re-run']:.2f}x the imports alone, "
        f"{figures['rerun_over_server']:.2f}x the API server's start; goal 15 s met: {figures['goal_met']}"
        + (
            f"; cold run {cold['flow_seconds']:.0f} s (flow), re-run / cold {100 * figures['rerun_over_cold']:.2f}%"
            if cold
            else ""
        )
    )
    settings = {"command": "textadapt " + " ".join(ARGS), "cache": str(db), "repeats": args.repeats}
    _common.write_results(NAME, settings, figures, [], args.out)


if __name__ == "__main__":
    main()
