"""How much faster is a fit step than when issue 16 was filed? One run, fresh processes.

A step's speed depends on process-wide state (glibc's malloc settings, :mod:`hookchains.core.allocator`),
so each configuration runs in its own child process, the children alternating over ``--rounds``; each
child times one forward + backward in masking ``ste`` (what a fit step computes) as the best of 3
interleaved rounds of ``--repeats`` steps. Configurations:

* **as filed** -- NCHW images, every score multiplying its featuremap in a hook, glibc's default malloc;
* **landed** -- channels-last images (the fit's layout on a CPU since 0.3), hooks, default malloc;
* **folded** -- channels-last, scores folded into the norms (:mod:`hookchains.core.folding`), default malloc;
* **now** -- channels-last, folded norms, freed memory kept (:func:`hookchains.keep_freed_memory`, as the
  ``hookchains`` command does).

    python benchmarks/step_speedup.py                                   # demo's MobileNetV2, 20 x 160 px
    python benchmarks/step_speedup.py --model resnet50 --image-size 224 # random weights
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

CONFIGS = {"as filed": ("nchw", "hooks", "default"), "landed": ("channels-last", "hooks", "default"),
           "folded": ("channels-last", "folded", "default"), "now": ("channels-last", "folded", "kept")}


def child(model_name: str, image_size: int, images: int, layout: str, scoring: str, malloc: str, repeats: int) -> float:
    """Best seconds per step of one configuration, in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    import hookchains
    from hookchains.inputs.models import create_model
    if malloc == "kept":
        hookchains.keep_freed_memory()
    model = create_model(model_name)[0].eval().requires_grad_(False)
    x = torch.randn(images, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels-last" else x
    with hookchains.attach(model, example=x[:1]) as hooks, hooks.using("ste"):
        hooks.fold_norms = scoring == "folded"

        def step() -> None:
            F.log_softmax(hooks.forward(x), -1).sum().backward()
        step()
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            best = min(best, (time.perf_counter() - start) / repeats)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hookchains:mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=4, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=2, help="times each child process runs, alternating")
    parser.add_argument("--child", nargs=3, metavar=("LAYOUT", "SCORING", "MALLOC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(child(args.model, args.image_size, args.images, *args.child, args.repeats))
        return
    best = {name: float("inf") for name in CONFIGS}
    for _ in range(args.rounds):
        for name, config in CONFIGS.items():
            command = [sys.executable, __file__, "--model", args.model, "--image-size", str(args.image_size),
                       "--images", str(args.images), "--repeats", str(args.repeats), "--child", *config]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            best[name] = min(best[name], float(out.split()[-1]))
    print(f"{args.model}, {args.images} images at {args.image_size} px: seconds per step (forward + backward, "
          f"best of {args.rounds} processes x 3 rounds)")
    for name, (layout, scoring, malloc) in CONFIGS.items():
        print(f"  {name:9} {layout:13} {scoring:6} malloc {malloc:7} {best[name]:.3f} s  "
              f"{best['as filed'] / best[name]:.2f}x vs as filed, {best['landed'] / best[name]:.2f}x vs landed")


if __name__ == "__main__":
    main()
