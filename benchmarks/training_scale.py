"""5. Training scale: each adapter at 10k / 100k / 1M descriptions x 10 / 100 / 1000 classes.

Synthetic L2-normalised embeddings (dim 512; each class a random direction plus noise), a fixed
small number of full-batch steps. Every step runs over the descriptions in chunks (adapters.fit:
gradients accumulated, at most ``CHUNK_BYTES`` of working memory per chunk); ``tap-head/one-pass``
is the same step in one pass over everything (the loop before chunking), the memory anchor. Every
configuration runs in its own subprocess, so its peak memory is that process's
(``resource.getrusage`` max RSS on the CPU; ``torch.cuda.max_memory_allocated`` on CUDA, where the
step runs under bf16 autocast). One warm-up step first; the timed run is then capped so it takes
about ``--cap-seconds`` (at least 2 steps), and configurations whose estimated memory exceeds
``--max-gib`` are skipped and listed as such. Before that, in this process, the same-weights check:
chunked and one-pass training of the TAP head (and of tap-head+ot) on ``--check-sizes`` give the
same weights, to float summation order.

    .venv/bin/python benchmarks/training_scale.py [--steps 20] [--cap-seconds 30] [--max-gib 8] [--device cuda]

To benchmark a new adapter, add one line to ADAPTERS: name -> fn(embeddings, labels, n_classes, steps, device)
returning an object with ``.seconds`` (the training loop's wall time).
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time

import _common

from textadapt.adapters import CHUNK_BYTES, TapRecipe, chunk_size, train_adapter, train_tap_head


def _prototypes(n_classes: int, dim: int = 512):
    import numpy as np

    p = np.random.default_rng(1).standard_normal((n_classes, dim), dtype=np.float32)
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def _ot():
    from textadapt.losses import OTTERSoftLabels

    return OTTERSoftLabels()


ADAPTERS = {
    "tap-head": lambda emb, labels, n_classes, steps, device: train_tap_head(
        emb, labels, n_classes, TapRecipe(steps=steps), device
    ),
    "tap-head/one-pass": lambda emb, labels, n_classes, steps, device: train_tap_head(
        emb, labels, n_classes, TapRecipe(steps=steps, chunk=-(-len(emb) // 16) * 16), device
    ),
    "zs-head": lambda emb, labels, n_classes, steps, device: train_adapter(
        "zs-head", emb, labels, n_classes, TapRecipe(steps=steps), _prototypes(n_classes), 100.0, None, device
    ),
    "tap-residual": lambda emb, labels, n_classes, steps, device: train_adapter(
        "tap-residual", emb, labels, n_classes, TapRecipe(steps=steps), _prototypes(n_classes), 100.0, None, device
    ),
    "tap-head+ot": lambda emb, labels, n_classes, steps, device: train_tap_head(
        emb, labels, n_classes, TapRecipe(steps=steps), device, loss=_ot()
    ),
}
# Not here: taskres (TaskRes's mini-batches of 256: a step's cost and memory do not grow with the
# descriptions), and the prompt learners (tap-coop, protext), whose step runs every class through the
# backbone's text tower, so their cost is set by the backbone and the class count, not by these
# synthetic embeddings.

NAME = "training_scale"
DIM = 512
SIZES = (10_000, 100_000, 1_000_000)
CLASSES = (10, 100, 1000)


def estimated_gib(n: int, classes: int, one_pass: bool = False, dim: int = DIM) -> float:
    """Peak memory of a step: the embeddings (N x D floats), and per chunk of rows the noise and noisy copy
    (2 x D floats a row) and the logits, softmax and their gradients (~4 x C floats a row), with every row
    in one chunk for the one-pass step (as measured on the smaller configurations), plus ~0.6 GiB of process."""
    rows = n if one_pass else min(n, chunk_size(n, dim, classes, 512))
    return (4 * n * dim + 4 * rows * (2 * dim + 4 * classes)) / 2**30 + 0.6


def synthetic(n: int, classes: int, dim: int, seed: int = 0, block: int = 65536):
    """Each class a random unit direction; descriptions near it (noise 0.05 per coordinate), L2-normalised.
    Filled block by block, so making the data never holds more than the data itself plus one block."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, classes, n)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, block):
        part = rng.standard_normal((min(block, n - s), dim), dtype=np.float32)
        part *= 0.05
        part += centres[labels[s : s + block]]
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        x[s : s + block] = part
    return x, labels


def same_weights_check(sizes: list[tuple[int, int]], steps: int, device: str) -> list[dict]:
    """Chunked (about 8 chunks) vs one-pass training of tap-head and tap-head+ot: the largest weight difference,
    absolute and relative to the largest weight."""
    import numpy as np

    out = []
    for n, classes in sizes:
        x, y = synthetic(n, classes, DIM)
        one_pass = -(-n // 512) * 512
        small = max(512, one_pass // 8 // 512 * 512)
        for name, loss in (("tap-head", lambda: None), ("tap-head+ot", _ot)):
            runs = [
                train_tap_head(x, y, classes, TapRecipe(steps=steps, chunk=c), device, loss=loss()) for c in (one_pass, small)
            ]
            diff = float(np.abs(runs[0].weight - runs[1].weight).max())
            scale = float(np.abs(runs[0].weight).max())
            out.append(
                {
                    "adapter": name,
                    "descriptions": n,
                    "classes": classes,
                    "steps": steps,
                    "chunk": small,
                    "max_abs_diff": diff,
                    "max_rel_diff": diff / scale,
                    "loss_diff": abs(runs[0].losses[-1] - runs[1].losses[-1]),
                }
            )
            print(
                f"same weights {name} {n:,} x {classes:,}, {steps} steps, chunks of {small:,} vs one pass: "
                f"max |dW| {diff:.2e} ({diff / scale:.1e} of max |W|)",
                flush=True,
            )
    return out


def one(adapter: str, n: int, classes: int, steps: int, cap: float, device: str) -> dict:
    """Run in a child process: build the data, warm up, time the capped run, report peak memory."""
    import contextlib

    import torch

    x, y = synthetic(n, classes, DIM)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    fn = ADAPTERS[adapter]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    with amp:
        t0 = time.perf_counter()
        first = fn(x, y, classes, 1, device)  # warm-up: allocator, kernels, first-touch of the data
        warm = time.perf_counter() - t0
        k = max(2, min(steps, math.floor(cap / max(first.seconds, 1e-9))))  # its loop time estimates one step
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        head = fn(x, y, classes, k, device)
    block = 512 if "+ot" in adapter else None
    out = {
        "adapter": adapter,
        "descriptions": n,
        "classes": classes,
        "steps": k,
        "capped": k < steps,
        "chunk": n if adapter.endswith("/one-pass") else min(n, chunk_size(n, DIM, classes, block)),
        "warmup_s": warm,
        "train_s": head.seconds,
        "s_per_step": head.seconds / k,
        "steps_per_s": k / head.seconds,
        "rss_after_data_gib": rss_data,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if device.startswith("cuda"):
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if adapter == "tap-head" and out["s_per_step"] < 5:
        out["breakdown_s"] = tap_step_breakdown(x, y, classes, device)
    return out


def tap_step_breakdown(x, y, classes: int, device: str, repeats: int = 3) -> dict:
    """Where one TAP step's time goes: the same operations as train_tap_head's loop, timed one by one."""
    import torch
    import torch.nn.functional as F

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    xt, yt = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
    head = torch.nn.Linear(x.shape[1], classes, bias=False, device=device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator(device=device).manual_seed(0)
    parts = {"noise (randn + add)": 0.0, "forward + loss": 0.0, "backward": 0.0, "optimizer": 0.0}
    for _ in range(repeats):
        t0 = time.perf_counter()
        noisy = xt + torch.randn(xt.shape, generator=gen, device=device) * 0.1
        sync()
        t1 = time.perf_counter()
        loss = F.cross_entropy(head(noisy), yt, label_smoothing=0.1)
        sync()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t3 = time.perf_counter()
        opt.step()
        loss.item()
        t4 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[k] += v / repeats
    return parts


def growth(results: list[dict], key: str, other: str) -> list[str]:
    """How s/step grows when ``key`` grows 10x at a fixed ``other``: the factor and the log-log slope."""
    lines = []
    by = {(r[key], r[other]): r["s_per_step"] for r in results}
    for o in sorted({r[other] for r in results}):
        xs = sorted(v for (v, oo) in by if oo == o)
        for a, b in zip(xs, xs[1:]):
            f = by[(b, o)] / by[(a, o)]
            lines.append(f"{key} {a:,} -> {b:,} at {other} {o:,}: s/step x{f:.2f} (slope {math.log(f) / math.log(b / a):.2f})")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        a, n, c, s, cap, dev = sys.argv[2:8]
        print(json.dumps(one(a, int(n), int(c), int(s), float(cap), dev)))
        return
    p = _common.parser(__doc__.splitlines()[0])
    _common.add_device(p)
    p.add_argument("--steps", type=int, default=20, help="steps per configuration (fewer where capped)")
    p.add_argument("--cap-seconds", type=float, default=30, help="time budget of one configuration's timed run")
    p.add_argument("--max-gib", type=float, default=8, help="skip configurations estimated to need more memory")
    p.add_argument("--config-timeout", type=float, default=300, help="stop a configuration's subprocess after this many seconds")
    p.add_argument("--adapters", default=",".join(ADAPTERS), help="comma-separated names from ADAPTERS")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--classes", default=",".join(map(str, CLASSES)))
    p.add_argument(
        "--check-sizes",
        default="10000x10,10000x100,10000x1000",
        help="NxC,...: sizes of the same-weights check (chunked vs one pass), '' for none",
    )
    p.add_argument("--check-steps", type=int, default=10)
    args = p.parse_args()
    sizes, classes = [int(x) for x in args.sizes.split(",")], [int(x) for x in args.classes.split(",")]
    checks = same_weights_check(
        [tuple(map(int, c.split("x"))) for c in args.check_sizes.split(",") if c], args.check_steps, args.device
    )
    results, skipped = [], []
    for adapter in args.adapters.split(","):
        for n in sizes:
            for c in classes:
                est = estimated_gib(n, c, adapter.endswith("/one-pass"))
                if not args.device.startswith("cuda") and est > args.max_gib:
                    skipped.append(
                        {
                            "adapter": adapter,
                            "descriptions": n,
                            "classes": c,
                            "estimated_gib": round(est, 1),
                            "why": f"estimated {est:.1f} GiB > --max-gib {args.max_gib:g}",
                        }
                    )
                    print(
                        f"{adapter} {n:>9,} x {c:>5,}: skipped, estimated {est:.1f} GiB > --max-gib {args.max_gib:g}", flush=True
                    )
                    continue
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    adapter,
                    str(n),
                    str(c),
                    str(args.steps),
                    str(args.cap_seconds),
                    args.device,
                ]
                try:
                    p_ = subprocess.run(cmd, capture_output=True, text=True, timeout=args.config_timeout)
                except subprocess.TimeoutExpired:
                    skipped.append(
                        {
                            "adapter": adapter,
                            "descriptions": n,
                            "classes": c,
                            "why": f"stopped after --config-timeout {args.config_timeout:g} s",
                        }
                    )
                    print(f"{adapter} {n:>9,} x {c:>5,}: stopped after {args.config_timeout:g} s", flush=True)
                    continue
                if p_.returncode != 0:
                    skipped.append(
                        {"adapter": adapter, "descriptions": n, "classes": c, "why": f"failed: {p_.stderr.strip()[-300:]}"}
                    )
                    print(f"{adapter} {n:>9,} x {c:>5,}: FAILED {p_.stderr.strip()[-300:]}", flush=True)
                    continue
                r = json.loads(p_.stdout.strip().splitlines()[-1])
                r["estimated_gib"] = round(est, 2)
                results.append(r)
                print(
                    f"{adapter} {n:>9,} x {c:>5,}: {r['s_per_step']:.4f} s/step, {r['steps_per_s']:.1f} steps/s over {r['steps']} steps, "
                    f"peak RSS {r['peak_rss_gib']:.2f} GiB",
                    flush=True,
                )
    rows = [
        [
            r["adapter"],
            f"{r['descriptions']:,}",
            f"{r['classes']:,}",
            f"{r['chunk']:,}",
            r["steps"],
            f"{r['s_per_step']:.4f}",
            f"{r['steps_per_s']:.3f}",
            f"{r['rss_after_data_gib']:.2f}",
            f"{r['peak_rss_gib']:.2f}",
        ]
        + ([f"{r['peak_cuda_gib']:.2f}"] if "peak_cuda_gib" in r else [])
        for r in results
    ]
    headers = [
        "adapter",
        "descriptions",
        "classes",
        "chunk",
        "steps timed",
        "s/step",
        "steps/s",
        "RSS after data GiB",
        "peak RSS GiB",
    ]
    if args.device.startswith("cuda"):
        headers.append("peak CUDA GiB")
    print()
    print(_common.table(headers, rows))
    lines = []
    for adapter in args.adapters.split(","):
        rs = [r for r in results if r["adapter"] == adapter]
        lines += [f"{adapter}: {x}" for x in growth(rs, "descriptions", "classes") + growth(rs, "classes", "descriptions")]
    print("\n" + "\n".join(lines))
    shares = []
    for r in results:
        if "breakdown_s" in r:
            b = r["breakdown_s"]
            tot = sum(b.values())
            shares.append(
                f"{r['adapter']} {r['descriptions']:,} x {r['classes']:,}: "
                + ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in b.items())
            )
    print("\nwhere a step's time goes:\n" + "\n".join(shares))
    for s in skipped:
        print(f"skipped {s['adapter']} {s['descriptions']:,} x {s['classes']:,}: {s['why']}")
    _common.write_results(
        NAME,
        {
            "dim": DIM,
            "steps": args.steps,
            "cap_seconds": args.cap_seconds,
            "max_gib": args.max_gib,
            "device": args.device,
            "mixed_precision": "bf16 autocast" if args.device.startswith("cuda") else "none (fp32)",
            "torch_threads": __import__("torch").get_num_threads(),
            "chunk_bytes": CHUNK_BYTES,
            "check_steps": args.check_steps,
        },
        {"results": results, "skipped": skipped, "growth": lines, "step_breakdown": shares, "same_weights": checks},
        [
            "full-batch steps: every step touches every description, in chunks (gradients accumulated)",
            "s/step excludes the warm-up step; peak RSS includes the synthetic data (N x 512 float32)",
        ],
        args.out,
    )


if __name__ == "__main__":
    main()
