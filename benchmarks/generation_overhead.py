"""1. Generation overhead: textadapt's generation stage, as `textadapt run` runs it, vs a bare ``openai`` client loop.

Three sides send the same requests (real rendered Fashion-MNIST questions, greedy, fixed max_tokens, no stop string,
the same sampling fields and seeds) with the same concurrency to the same local ``python -m llama_cpp.server``
(SmolLM2):

- **flow**: ``pipeline.generate`` inside a Prefect flow run with the flow's runner (``textadapt.flows.workers.Workers``:
  Prefect task runs in threads, retries, the global concurrency limit ``textadapt-llm``), against Prefect's temporary
  local API, as ``textadapt run`` does (``textadapt/flows/adapt.py``);
- **library**: ``pipeline.generate`` on the library's default runner (threads of this process, no Prefect);
- **bare**: a bare ``AsyncOpenAI`` loop, every request at once behind a semaphore (the anchor).

textadapt's sides write into a fresh DuckDB file each repetition, so they really call the LLM. The sides take turns
(the order rotated every repetition); the figures are the medians of the per-repetition ratios to the bare loop, in
wall time and in CPU time (this process's, plus the Prefect API server's for the flow). Also printed: the Prefect task
runs one flow run made for the plan (classes x questions x samples). Goal: flow / bare <= 1.05.

    .venv/bin/python benchmarks/generation_overhead.py [--classes 4] [--samples 2] [--max-tokens 16] [--repeats 5]
"""

from __future__ import annotations

import _common
import _generation as g

NAME = "generation_overhead"


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=4, help="Fashion-MNIST classes (x 5 generic questions)")
    p.add_argument("--samples", type=int, default=2, help="samples per question")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight, every side (textadapt's default)")
    p.add_argument("--server-threads", type=int, default=1)
    args = p.parse_args()
    repeats = args.repeats or 5
    _common.prefect_env()
    with _common.llama_server(threads=args.server_threads) as url:
        w = g.workload(url, args.classes, args.samples, args.max_tokens)
        n, n_batches = len(w.plan), len(g.batches(w.plan))
        print(
            f"{n} requests ({n_batches} (class, question) batches) per side and repetition, concurrency {args.concurrency}, "
            f"max_tokens {args.max_tokens}, {repeats} repetitions, server {url}"
        )
        api_cpu = _common.children_cpu("prefect.server.api.server:create_app")
        g.bare_concurrent(w, url, args.concurrency)  # warm-up: the server's first request loads its caches
        warm = g.flow_side(w, url, args.concurrency, api_cpu)  # warm-up: starts Prefect's temporary API
        print(f"warm-up flow run: {warm.seconds:.2f} s, {warm.task_runs} Prefect task runs for {warm.batches} batches")
        tokens: dict[str, list[int]] = {"flow": [], "library": [], "bare": []}
        task_runs: list[int] = []

        def flow():
            r = g.flow_side(w, url, args.concurrency, api_cpu)
            tokens["flow"].append(r.tokens)
            task_runs.append(r.task_runs)
            return r.seconds, r.cpu_seconds

        def library():
            seconds, tok, _ = g.textadapt_side(w, url, args.concurrency)
            tokens["library"].append(tok)
            return seconds, None

        def bare():
            seconds, tok, _ = g.bare_concurrent(w, url, args.concurrency)
            tokens["bare"].append(tok)
            return seconds, None

        r = _common.rotate({"flow": flow, "library": library, "bare": bare}, repeats, "bare")
    r["completion_tokens"] = tokens
    r["task_runs"] = task_runs
    rows = [
        [
            label,
            f"{r['median_s'][side]:.2f}",
            f"{r['cpu_median_s'][side]:.2f}",
            f"{n / r['median_s'][side]:.2f}",
            sum(tokens[side]) // repeats,
            runs,
        ]
        for side, label, runs in (
            ("flow", "textadapt run's flow (Workers: Prefect tasks)", task_runs[0]),
            ("library", "pipeline.generate, library runner", "-"),
            ("bare", "bare AsyncOpenAI loop", "-"),
        )
    ]
    print()
    print(_common.table(["side", "median s", "median CPU s", "requests/s", "completion tokens", "Prefect task runs"], rows))
    for side in ("flow", "library"):
        print(
            f"{side} / bare: wall {r['ratio_median'][side]:.3f} (min {min(r['ratios'][side]):.3f}, max {max(r['ratios'][side]):.3f}), "
            f"CPU {r['cpu_ratio_median'][side]:.3f}"
        )
    print(f"Prefect task runs per flow run: {task_runs[0]} for {n} requests in {n_batches} (class, question) batches")
    verdict = "met" if r["ratio_median"]["flow"] <= 1.05 else "MISSED"
    print(f"\nflow / bare: median {r['ratio_median']['flow']:.3f}; goal <= 1.05: {verdict}")
    _common.write_results(
        NAME,
        {
            "requests": n,
            "batches": n_batches,
            "classes": args.classes,
            "samples": args.samples,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "concurrency": args.concurrency,
            "server_threads": args.server_threads,
            "repeats": repeats,
            "template_set": "generic",
        },
        {**r, "goal": "flow / bare <= 1.05 (wall time)", "goal_met": verdict == "met"},
        [
            "textadapt's sides include cleaning each answer and writing it to DuckDB as its batch completes",
            "llama_cpp.server answers one request at a time; concurrency only keeps its queue full",
            "CPU seconds: this process's CPU time during each side (all threads), plus, for the flow, the Prefect "
            "API server's; the LLM server runs in another process and is not counted",
        ],
        args.out,
    )


if __name__ == "__main__":
    main()
