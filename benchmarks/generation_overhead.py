"""1. Generation overhead: textadapt's generation stage vs a bare ``openai`` client loop.

Both send the same requests (real rendered Fashion-MNIST questions, greedy, fixed max_tokens, the
same seeds) with the same concurrency to the same local ``python -m llama_cpp.server`` (SmolLM2).
textadapt writes into a fresh DuckDB file each repetition, so it really calls the LLM. The sides
alternate; the figure is the median of the per-repetition ratios textadapt / bare. Goal: <= 1.05.

    .venv/bin/python benchmarks/generation_overhead.py [--classes 2] [--samples 2] [--max-tokens 24]
"""

from __future__ import annotations

import statistics

import _common
import _generation as g

NAME = "generation_overhead"


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=2, help="Fashion-MNIST classes (x 5 generic questions)")
    p.add_argument("--samples", type=int, default=2, help="samples per question")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight, both sides (textadapt's default)")
    p.add_argument("--server-threads", type=int, default=1)
    args = p.parse_args()
    repeats = args.repeats or 5
    with _common.llama_server(threads=args.server_threads) as url:
        w = g.workload(url, args.classes, args.samples, args.max_tokens)
        print(f"{len(w.plan)} requests per side and repetition, concurrency {args.concurrency}, max_tokens {args.max_tokens}, "
              f"{repeats} repetitions, server {url}")
        g.bare_concurrent(w, url, args.concurrency)  # warm-up: the server's first request loads its caches
        tokens = {"textadapt": [], "bare": []}

        def side(name, fn):
            def run() -> float:
                seconds, tok, n = fn()
                tokens[name].append(tok)
                return seconds
            return run

        r = _common.alternate(side("textadapt", lambda: g.textadapt_side(w, url, args.concurrency)),
                              side("bare", lambda: g.bare_concurrent(w, url, args.concurrency)),
                              repeats, "textadapt", "bare")
    r["completion_tokens"] = tokens
    # this process's CPU seconds (the server is another process): what textadapt itself costs
    r["client_cpu_median_s"] = {k: statistics.median(r[f"{k}_cpu_seconds"]) for k in ("textadapt", "bare")}
    n = len(w.plan)
    rows = [["textadapt (pipeline.generate, OpenAI backend)", f"{r['textadapt_median_s']:.2f}", f"{n / r['textadapt_median_s']:.2f}",
             sum(tokens['textadapt']) // repeats],
            ["bare AsyncOpenAI loop", f"{r['bare_median_s']:.2f}", f"{n / r['bare_median_s']:.2f}", sum(tokens['bare']) // repeats]]
    print()
    print(_common.table(["side", "median s", "requests/s", "completion tokens"], rows))
    print(f"client-side CPU seconds per repetition (median): textadapt {r['client_cpu_median_s']['textadapt']:.2f}, "
          f"bare {r['client_cpu_median_s']['bare']:.2f}")
    verdict = "met" if r["ratio_median"] <= 1.05 else "MISSED"
    print(f"\ntextadapt / bare: median {r['ratio_median']:.3f} (min {r['ratio_min']:.3f}, max {r['ratio_max']:.3f}); goal <= 1.05: {verdict}")
    _common.write_results(NAME, {"requests": n, "classes": args.classes, "samples": args.samples, "max_tokens": args.max_tokens,
                                 "temperature": 0.0, "concurrency": args.concurrency, "server_threads": args.server_threads,
                                 "repeats": repeats, "template_set": "generic"},
                          {**r, "goal": "textadapt / bare <= 1.05", "goal_met": verdict == "met"},
                          ["textadapt includes cleaning each answer and writing it to DuckDB as it arrives",
                           "llama_cpp.server answers one request at a time; concurrency only keeps its queue full",
                           "client CPU seconds: this process's CPU time during each side (the server runs in another process); "
                           "less sensitive to other jobs on the machine than wall time"], args.out)


if __name__ == "__main__":
    main()
