"""Where a fit step's time goes, by operator family (issue 16: profile first).

Runs a few steps of :func:`hookchains.fit` under ``torch.profiler`` and prints the self CPU time of
each operator family (convolution forward and backward, batch norm, the score multiplications of the
hooks, activations, copies, the rest) as a share of the total, then the top operators. The demo's own
breakdown by stage (fit, materialise, chains, feature visualisation, report) is the last line that
``hookchains demo`` prints.

    python benchmarks/profile_fit.py                                  # the demo's MobileNetV2 and photos
    python benchmarks/profile_fit.py --model resnet50 --image-size 224 # random weights and images
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import hookchains

FAMILIES = [  # (family, operator-name pattern), first match wins
    ("convolution", r"conv|mkldnn_convolution"),
    ("batch norm", r"batch_norm"),
    ("score multiply (hooks)", r"^aten::mul$"),
    ("activation", r"hardtanh|relu|clamp|gelu|silu|sigmoid"),
    ("copy / layout", r"copy_|contiguous|clone|to_copy"),
    ("linear / matmul", r"addmm|mm|matmul|linear"),
]


def family(name: str) -> str:
    """The operator family of a profiler event name (``"other"`` when none matches)."""
    return next((label for label, pattern in FAMILIES if re.search(pattern, name)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hookchains:mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    from hookchains.inputs.models import create_model
    model = create_model(args.model)[0].eval()
    if args.model == "hookchains:mobilenet_v2":
        from hookchains.workflow.demo import demo_task
        images = demo_task(args.image_size)[2].images[:args.images]
    else:
        images = torch.randn(args.images, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    with hookchains.attach(model, example=images[:1]) as hooks:
        hookchains.fit(hooks, images, steps=2, min_steps=2, progress=False)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            hookchains.fit(hooks, images, steps=args.steps, min_steps=args.steps, progress=False)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    shares = defaultdict(float)
    for e in events:
        shares[family(e.key)] += e.self_cpu_time_total
    print(f"{args.model}, {args.images} images at {args.image_size} px, {args.steps} steps, "
          f"{torch.get_num_threads()} threads: {total / 1e6:.2f} s of operator time")
    for label, micros in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {label:24} {100 * micros / total:5.1f} %")
    print("top operators (self CPU):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {e.key:36} {100 * e.self_cpu_time_total / total:5.1f} %  {e.count:>6} calls")


if __name__ == "__main__":
    main()
