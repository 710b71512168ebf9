"""2. Against the reference approach: one request at a time (as TAP's and CuPL's scripts loop over
``openai`` calls) vs textadapt's concurrent generation, same prompts, same local llama.cpp server.

``python -m llama_cpp.server`` evaluates one request at a time (the rest wait in its queue), so on
this server concurrency can only hide the client's and HTTP's round-trip time between requests; the
real gain needs a server that batches concurrent requests (vLLM on a GPU), not measured here.

    .venv/bin/python benchmarks/reference_sequential.py [--classes 2] [--samples 2] [--max-tokens 24]
"""

from __future__ import annotations

import _common
import _generation as g

NAME = "reference_sequential"


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8, help="textadapt's requests in flight (its default)")
    p.add_argument("--server-threads", type=int, default=1)
    args = p.parse_args()
    repeats = args.repeats or 5
    with _common.llama_server(threads=args.server_threads) as url:
        w = g.workload(url, args.classes, args.samples, args.max_tokens)
        print(f"{len(w.plan)} requests per side and repetition; textadapt concurrency {args.concurrency}; {repeats} repetitions")
        g.bare_sequential(w, url)  # warm-up
        r = _common.alternate(
            lambda: g.bare_sequential(w, url)[0],
            lambda: g.textadapt_side(w, url, args.concurrency)[0],
            repeats,
            "sequential",
            "textadapt",
        )
    n = len(w.plan)
    rows = [
        ["reference: one blocking request at a time", f"{r['sequential_median_s']:.2f}", f"{n / r['sequential_median_s']:.2f}"],
        [f"textadapt, {args.concurrency} in flight", f"{r['textadapt_median_s']:.2f}", f"{n / r['textadapt_median_s']:.2f}"],
    ]
    print()
    print(_common.table(["side", "median s", "requests/s"], rows))
    print(
        f"\nspeed-up of textadapt over one-at-a-time (sequential / textadapt): median {r['ratio_median']:.3f} "
        f"(min {r['ratio_min']:.3f}, max {r['ratio_max']:.3f})"
    )
    _common.write_results(
        NAME,
        {
            "requests": n,
            "classes": args.classes,
            "samples": args.samples,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "concurrency": args.concurrency,
            "server_threads": args.server_threads,
            "repeats": repeats,
        },
        {**r, "speedup_median": r["ratio_median"]},
        [
            "llama_cpp.server serialises requests: concurrency hides only the gaps between them",
            "vLLM (continuous batching, GPU) is where concurrency pays; not measured here (no GPU)",
        ],
        args.out,
    )


if __name__ == "__main__":
    main()
