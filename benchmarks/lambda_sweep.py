"""Size vs fidelity on real weights: the embedded MobileNetV2 on the demo task, one row per setting.

Each row fits the cat-vs-espresso task (10 augmented views of one bundled photo per class) and prints
the thresholded sub-network's size and fidelity, so the choice of defaults is visible. The first row is
the paper's recipe with the same step budget, the baseline the defaults must beat.

    python benchmarks/lambda_sweep.py --steps 150 --image-size 160
"""
from __future__ import annotations

import argparse
import time

import torch

import hookchains
from hookchains.assets import demo_photos
from hookchains.core.fit import preset_for
from hookchains.inputs.data import augmented_views
from hookchains.inputs.models import create_model, preprocessing

SETTINGS = [
    ("paper recipe", {"recipe": "paper", "lr": 0.005}),
    ("paper recipe, lr 0.02", {"recipe": "paper", "lr": 0.02}),
    ("default recipe lam 0.0025", {"lam": 0.0025}),
    ("default recipe lam 0.005 (default)", {}),
    ("default recipe lam 0.01", {"lam": 0.01}),
    ("default recipe lam 0.005, kl_target 0.3", {"kl_target": 0.3}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--classes", default="Egyptian cat,espresso")
    parser.add_argument("--only", type=int, nargs="*", help="row numbers to run")
    args = parser.parse_args()
    model, _ = create_model("hookchains:mobilenet_v2")
    photos = {k: demo_photos()[k] for k in args.classes.split(",")}
    task = augmented_views(photos, 10, preprocessing(model, args.image_size))
    print(f"{'setting':38} {'filters kept':>16} {'blocks':>6} {'agree':>6} {'KL':>6} {'Q mean':>7} {'steps':>5} {'s':>5}")
    for row, (label, options) in enumerate(SETTINGS):
        if args.only and row not in args.only:
            continue
        config = preset_for("mobilenet", **{"steps": args.steps, "lr": args.lr, "progress": False, **options})
        start = time.perf_counter()
        with hookchains.attach(model, example=task.images[:1]) as chains:
            sub = hookchains.fit(chains, task.images, config)
        c, f = sub.counts(), sub.fidelity
        print(f"{label:38} {c['filters_kept']:>6}/{c['filters_total']} {100 * c['filters_kept'] / c['filters_total']:4.1f}%"
              f" {c['gates_kept']:>3}/{c['gates_total']:<2} {f['agree']:>3}/{f['images']:<2} {f['kl']:6.3f}"
              f" {f['quotient_mean']:7.2f} {sub.config['steps_run']:>5} {time.perf_counter() - start:5.0f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
