"""Fit recipes on real weights: the embedded MobileNetV2 on the demo task and two more photo pairs.

Table mode prints, per recipe and task, the thresholded sub-network's size and fidelity and the steps
the fit ran (and how it ended). ``--curve PNG`` also draws the size-fidelity curve of every recipe
and of the magnitude and random baselines on the first task, with each curve's area
(:mod:`hookchains.evaluation.curve`), and writes the figures as JSON beside the PNG.

    python benchmarks/recipes.py --image-size 224 --recipes ste-free --tasks demo,palace,missile,tripod,spotlight
    python benchmarks/recipes.py --image-size 160 --tasks demo --curve benchmarks/results/recipes_curve.png

``--digits DIR`` uses the digits CNN and images written by ``benchmarks/digits.py --out DIR`` instead
(tasks: digit pairs such as ``3-8``; 10 images per digit), a cheap stand-in on a loaded CPU:

    PYTHONPATH=. python benchmarks/recipes.py --digits /tmp/digits --tasks 3-8,1-7 --recipes mask,ste --steps 300
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path
from typing import List, Optional

import torch

import hookchains
from hookchains.assets import asset_path, demo_photos
from hookchains.core.io import read_tensors
from hookchains.core.recipes import HardConcrete, Mask, Ste
from hookchains.evaluation.curve import area, plot, size_fidelity
from hookchains.inputs.data import augmented_views, load_image_folder
from hookchains.inputs.models import create_model, preprocessing

# Tasks (class: photo): the demo's pair; two pairs of bundled photos the demo does not use, on which
# the model is unsure (rocket.png is a "drilling platform" to it, astronaut.png has no ImageNet class);
# and four pairs of scikit-image / scikit-learn sample photos the package does not ship ("skimage:NAME",
# "sklearn:NAME", read from the installed packages): three on which it is about as sure as on the
# demo's, and "honeycomb", where flower.jpg is a "honeycomb" at 0.53 (9 of its 10 views). The class names are the
# model's own top-1 on the photo, as in the paper's tasks (ImageNet images of the classes).
TASKS = {
    "demo": {"Egyptian cat": None, "espresso": None},
    "palace": {"palace": "china.png", "military uniform": "grace_hopper.png"},
    "missile": {"missile": "rocket.png", "astronaut": "astronaut.png"},
    "tripod": {"tripod": "skimage:camera.png", "moped": "skimage:motorcycle_left.png"},
    "spotlight": {"tripod": "skimage:camera.png", "spotlight": "skimage:clock_motion.png"},
    "bubble": {"bubble": "skimage:hubble_deep_field.jpg", "spotlight": "skimage:clock_motion.png"},
    "honeycomb": {"bubble": "skimage:hubble_deep_field.jpg", "honeycomb": "sklearn:flower.jpg"},
}
RECIPES = {
    "mask": lambda: Mask(),
    "mask-m4": lambda: Mask(m_max=4.0),
    "mask-free": lambda: Mask(m_max=None),
    "mask-width": lambda: Mask(cost="width"),
    "l0": lambda: HardConcrete(),
    "keep-2%": lambda: Mask(m_max=None, keep_target=0.02, warmup=150),
    "l0-free": lambda: HardConcrete(m_max=None),
    "ste": lambda: Ste(),
    "ste-free": lambda: Ste(m_max=None),
    "paper": lambda: "paper",
}


SAMPLE_FOLDERS = {"skimage": "data", "sklearn": "datasets/images"}  # where each package keeps its sample photos


def _photo(cls: str, path: Optional[str]) -> List[Path]:
    """The photo of class ``cls``: the demo's, a bundled asset, or ``PACKAGE:NAME``, a sample photo of
    scikit-image or scikit-learn."""
    if path is None:
        return list(demo_photos()[cls])
    package, _, name = path.partition(":")
    if name:
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise SystemExit(f"these tasks read {package}'s sample photos: pip install scikit-image scikit-learn") from None
        return [Path(module.__file__).parent / SAMPLE_FOLDERS[package] / name]
    return [asset_path(path)]


def task_images(name: str, model, image_size: int) -> torch.Tensor:
    """10 augmented views of one photo per class (the demo's construction)."""
    photos = {cls: _photo(cls, path) for cls, path in TASKS[name].items()}
    return augmented_views(photos, 10, preprocessing(model, image_size)).images


def confidence(model, images: torch.Tensor) -> str:
    """How sure the model is of the task: mean top-1 probability and output entropy (nats)."""
    with torch.no_grad():
        probs = model(images).softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    return f"mean top-1 probability {probs.max(-1).values.mean():.2f}, output entropy {entropy:.2f} nats"


def digits_model(directory: Path):
    """The digits CNN of ``benchmarks/digits.py`` with its trained checkpoint from ``directory``."""
    from benchmarks.digits import build
    model = build()
    model.load_state_dict(read_tensors(directory / "digits_cnn.safetensors"))
    return model.eval()


def digits_images(directory: Path, pair: str, model) -> torch.Tensor:
    """10 images of each digit of ``pair`` (e.g. ``"3-8"``) from ``directory/images``."""
    return load_image_folder(directory / "images", pair.split("-"), 10, preprocessing(model)).images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--recipes", default="mask")
    parser.add_argument("--tasks", default="demo,palace,missile")
    parser.add_argument("--curve", type=Path, help="write the size-fidelity figure of the first task here")
    parser.add_argument("--digits", type=Path, help="folder of benchmarks/digits.py --out: use the digits CNN")
    parser.add_argument("--lam", type=float, default=0.005)
    parser.add_argument("--largest", type=float, default=0.3,
                        help="curves run up to this share of the filters (the same for every recipe)")
    args = parser.parse_args()
    model = digits_model(args.digits) if args.digits else create_model("hookchains:mobilenet_v2")[0]
    label = "digits CNN" if args.digits else f"MobileNetV2, {args.image_size} px"
    curves = {}
    print(f"{'recipe':10} {'task':8} {'filters kept':>17} {'agree':>6} {'KL':>6} {'steps':>5} {'ended':>10} {'s':>5}")
    for task in args.tasks.split(","):
        images = digits_images(args.digits, task, model) if args.digits else task_images(task, model, args.image_size)
        print(f"task {task}: {confidence(model, images)}", flush=True)
        for name in args.recipes.split(","):
            start = time.perf_counter()
            with hookchains.attach(model, example=images[:1]) as chains:
                sub = hookchains.fit(chains, images, steps=args.steps, lr=args.lr, lam=args.lam,
                                     recipe=RECIPES[name](), progress=False)
                if args.curve and not curves.get(name):
                    largest = round(args.largest * sub.counts()["filters_total"])
                    curves[name] = size_fidelity(chains, images, sub, largest=largest,
                                                 baselines=() if curves else ("magnitude", "random"))
            c, f = sub.counts(), sub.fidelity
            print(f"{name:10} {task:8} {c['filters_kept']:>6}/{c['filters_total']} {100 * c['filters_kept'] / c['filters_total']:5.2f}%"
                  f" {f['agree']:>3}/{f['images']:<2} {f['kl']:6.3f} {sub.config['steps_run']:>5} {sub.config['ended']:>10}"
                  f" {time.perf_counter() - start:5.0f}", flush=True)
        if args.curve:
            _write_curves(curves, args.curve, f"{label}, task {task}")
            args.curve = None


def _write_curves(curves, path: Path, title: str) -> None:
    lines = {name: {"sizes": c["sizes"], "total": c["total"], "kl": c["kl"]["neurochains"]} for name, c in curves.items()}
    first = next(iter(curves.values()))
    lines.update({kind: {"sizes": first["sizes"], "total": first["total"], "kl": first["kl"][kind]}
                  for kind in ("magnitude", "random")})
    plot(lines, path, title)
    path.with_suffix(".json").write_text(json.dumps({"title": title, "curves": curves}, indent=1))
    for name, curve in lines.items():
        print(f"area {name:10} {area(curve['sizes'], curve['kl'], curve['total']):.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
