"""6. End to end: ``textadapt run fashion-mnist`` from an empty cache, split by stage.

One real run through the CLI (in-process llama.cpp SmolLM2, untrained ViT-B-32, a fresh
TEXTADAPT_HOME), scaled down by default so it takes a few minutes here: all 10 classes, 2 samples
per question (200 descriptions), 500 test images. Seconds per stage come from the run's report; the
run's total from the runs table; the command's wall time around it.

    .venv/bin/python benchmarks/end_to_end.py [--samples 2] [--max-images 500] [--full] [--device cuda]
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import _common

NAME = "end_to_end"


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    _common.add_device(p)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--max-images", type=int, default=500)
    p.add_argument("--max-classes", type=int, default=None)
    p.add_argument("--backbone", default="ViT-B-32:random")
    p.add_argument(
        "--llm-threads",
        type=int,
        default=1,
        help="TEXTADAPT_THREADS for llama.cpp (1: steady on a shared machine; 0: textadapt's default, all cores)",
    )
    p.add_argument("--llm", default="llama-cpp:smollm2")
    p.add_argument("--full", action="store_true", help="the README's run: 5 samples, all 10,000 images (about 20 minutes here)")
    args = p.parse_args()
    if args.full:
        args.samples, args.max_images = 5, None
    run_args = ["run", "fashion-mnist", "--backbone", args.backbone, "--llm", args.llm, "--samples", str(args.samples)]
    run_args += ["--max-images", str(args.max_images)] if args.max_images else []
    run_args += ["--max-classes", str(args.max_classes)] if args.max_classes else []
    print(f"textadapt {' '.join(run_args)}  (TEXTADAPT_DEVICE={args.device})", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        env = _common.cli_env(
            tmp / "home",
            TEXTADAPT_DEVICE=args.device,
            **({"TEXTADAPT_THREADS": str(args.llm_threads)} if args.llm_threads else {}),
        )
        wall, _ = _common.run_cli(run_args, env)
        run = _common.last_run(tmp / "home")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stages = run["stage_seconds"]
    total = sum(stages.values())
    rows = [[s, f"{v:.1f}", f"{100 * v / total:.0f}%"] for s, v in stages.items()]
    rows += [
        ["all stages", f"{total:.1f}", "100%"],
        ["flow (runs table)", f"{run['flow_seconds']:.1f}", ""],
        ["command wall time", f"{wall:.1f}", ""],
    ]
    print()
    print(_common.table(["stage", "seconds", "share of stages"], rows))
    print(f"\n{run['llm_calls']} LLM calls, {run['text_encoder_calls']} texts and {run['image_encoder_calls']} images encoded")
    _common.write_results(
        NAME,
        {"command": "textadapt " + " ".join(run_args), "llm_threads": args.llm_threads or "all cores", "device": args.device},
        {"wall_s": wall, **run, "stages_total_s": total},
        [
            "the generation stage includes encoding the class prompts for the confusable classes",
            "the command's wall time beyond the flow is the Python start, imports and Prefect's temporary API",
        ],
        args.out,
    )


if __name__ == "__main__":
    main()
