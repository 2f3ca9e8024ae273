"""How fast is an extraction? Seconds per step and per extraction, FLOP/s, and the gain over a
straightforward implementation, all measured in this one process.

Compared, on the same model, images and number of steps:

* **baseline** -- what a first implementation of section 3.2 does: the same score hooks and loss,
  Adam on the scores, but the model's weights left trainable (autograd also computes every weight
  gradient) and tasks run one after another;
* **hooks** -- :func:`hookchains.core.fit.fit` as landed before norm folding (``fold_norms=False``):
  weights frozen, teacher logits computed once, every score multiplying its featuremap in a hook;
* **hookchains** -- the same fit with the scores folded into the norms' affine parameters
  (:mod:`hookchains.core.folding`, the default); ``--compare`` also runs both full extractions and
  prints how far their results are apart (kept filters, KL);
* **batched** -- :func:`hookchains.core.fit.fit_tasks` with ``--tasks T`` tasks in one forward pass
  (on a GPU this is what keeps the device full); ``--tasks 1,4,16`` measures each count.

FLOP/s are counted with ``torch.utils.flop_counter`` for one step (forward + backward) and set
against this machine's matrix-multiply peak, measured here with a large fp32 matmul. Timing
figures are ratios against the baseline measured in the same run, so they are comparable across
machines. Random weights: speed does not depend on them.

Usage (repository root)::

    python benchmarks/bench_extract.py --model resnet18 --images 20 --image-size 160 --steps 20
    python benchmarks/bench_extract.py --model resnet50 --steps 300 --device cuda   # paper: ~55 s (RTX 6000)
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import hookchains
from hookchains.adapters import default_input_shape, discover
from hookchains.core.fit import FitConfig, fit_tasks
from hookchains.inputs.models import create_model
from hookchains.workflow.extract import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work: Callable[[], object]) -> float:
    _sync(device)
    start = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - start


def per_step(device: torch.device, run: Callable[[int], object], steps: int, rounds: int = 2) -> float:
    """Seconds per step without the fixed costs of a run (hook set-up, teacher, final evaluation):
    ``(T(2 n) - T(n)) / n``, the best of ``rounds`` (the machine may be shared). When the machine's
    noise swamps the difference (it is not positive), ``T(2 n) / 2 n`` instead: an upper bound."""
    def one() -> float:
        short, long = _timed(device, lambda: run(steps)), _timed(device, lambda: run(2 * steps))
        return (long - short) / steps if long > short else long / (2 * steps)
    return min(one() for _ in range(rounds))


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an fp32 ``size x size`` matrix product on ``device`` (best of ``repeats``)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    best = min(_timed(device, lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best


def baseline_steps(model: torch.nn.Module, images: torch.Tensor, steps: int, sites, lr: float = 0.005) -> None:
    """A straightforward fit: hooks + KL + L1, Adam on the scores, weights left trainable."""
    with hookchains.attach(model, sites=sites) as chains:
        with torch.no_grad(), chains.using("off"):
            teacher = F.log_softmax(model(images), -1)
        optimiser = torch.optim.Adam(list(chains.parameters()), lr=lr)
        with chains.using("soft"):
            for _ in range(steps):
                optimiser.zero_grad()
                logq = F.log_softmax(model(images), -1)
                loss = F.kl_div(logq, teacher, log_target=True, reduction="batchmean")
                loss = loss + 0.005 * sum(s.abs().sum() for s in chains.scores.values())
                loss.backward()
                optimiser.step()


def step_flops(model: torch.nn.Module, images: torch.Tensor, sites) -> int:
    """FLOPs of one fit step (forward + backward through the frozen, hooked model)."""
    with hookchains.attach(model, sites=sites) as chains:
        model.requires_grad_(False)
        counter = FlopCounterMode(display=False)
        with counter, chains.using("ste"):
            F.log_softmax(model(images), -1).sum().backward()
        model.requires_grad_(True)
    return counter.get_total_flops()


def _task_images(model: torch.nn.Module, args: argparse.Namespace, device) -> Tuple[torch.Tensor, ...]:
    """The demo's real photos (embedded MobileNetV2) or seeded random batches shaped for ``model``."""
    if args.model == "hookchains:mobilenet_v2":
        from hookchains.workflow.demo import demo_task
        images = demo_task(args.image_size)[2].images.to(device)
        return tuple(images[:args.images] for _ in range(max(args.task_counts)))
    generator, channels = torch.Generator().manual_seed(0), default_input_shape(model)[1]
    return tuple(torch.randn(args.images, channels, args.image_size, args.image_size, generator=generator).to(device)
                 for _ in range(max(args.task_counts)))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hookchains:mobilenet_v2",
                        help="model spec; the default uses the demo's real weights and photos, others random images")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--steps", type=int, default=300, help="steps of an extraction (paper: 300)")
    parser.add_argument("--timed-steps", type=int, default=5,
                        help="n: each method runs n and 2n steps (twice) to time a step")
    parser.add_argument("--tasks", default="2",
                        help="tasks in the batched run; a comma list (e.g. 1,4,16) measures each")
    parser.add_argument("--paper-seconds", type=float,
                        help="the paper's seconds per extraction for this model (RTX 6000: ResNet-50 55, VGG-19 90)")
    parser.add_argument("--lr", type=float, default=0.02, help="learning rate of the full extraction")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compare", action="store_true",
                        help="also run the full extraction with fold_norms=False and compare the results")
    parser.add_argument("--project", action="store_true",
                        help="report an extraction as s/step x --steps instead of running one (big models on CPU)")
    args = parser.parse_args()
    args.task_counts = [int(t) for t in args.tasks.split(",")]
    return args


def main() -> None:
    args = _arguments()
    hookchains.keep_freed_memory()  # as the hookchains command runs (hookchains.core.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model)[0].to(device).eval()
    tasks = _task_images(model, args, device)
    peak = matmul_peak(device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device {device}{threads}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"model {args.model}, {args.images} images at {args.image_size} px")
    sites = discover(model, example=tasks[0][:1])

    def ours(steps: int, fold: bool = True, **options):
        with hookchains.attach(model, sites=sites) as chains:
            chains.fold_norms = fold
            return hookchains.fit(chains, tasks[0], **{"steps": steps, "min_steps": steps, "progress": False, **options})

    def batched(count: int) -> Callable[[int], None]:
        def run(steps: int) -> None:
            with hookchains.attach(model, sites=sites, tasks=count) as chains:
                fit_tasks(chains, tasks[:count], steps=steps, min_steps=steps, progress=False)
        return run

    n = args.timed_steps
    ours(2)  # warm-up (allocator, kernels)
    base = per_step(device, lambda k: baseline_steps(model, tasks[0], k, sites), n)
    hooked = per_step(device, lambda k: ours(k, fold=False), n)
    step = per_step(device, ours, n)
    flops = step_flops(model, tasks[0], sites)
    print(f"per step: baseline (weights trainable) {base:.3f} s, hooks (weights frozen, fold_norms=False) "
          f"{hooked:.3f} s, hookchains (norms folded) {step:.3f} s -> {hooked / step:.2f}x over hooks, "
          f"{base / step:.2f}x over the baseline")
    for count in args.task_counts:
        per_task = per_step(device, batched(count), n) / count
        print(f"batched {count} tasks: {per_task:.3f} s per task per step -> {step / per_task:.2f}x throughput "
              f"per task vs one at a time ({base / per_task:.2f}x vs the baseline)")
    print(f"achieved {flops / step / 1e9:.1f} GFLOP/s ({flops / 1e9:.2f} GFLOP per step) = "
          f"{100 * flops / step / peak:.1f} % of the matmul peak")
    if args.project:
        print(f"per extraction, projected at {args.steps} steps: hookchains {step * args.steps:.1f} s, "
              f"baseline {base * args.steps:.1f} s -> {base / step:.2f}x{_versus_paper(args, step * args.steps)}")
        return
    begin = time.perf_counter()
    sub = ours(args.steps, lr=args.lr, min_steps=FitConfig.min_steps)
    full = time.perf_counter() - begin
    if args.compare:
        compare_results(sub, ours(args.steps, fold=False, lr=args.lr, min_steps=FitConfig.min_steps), full)
    print(f"per extraction: hookchains {full:.1f} s ({sub.config['steps_run']} steps, its stop rule; "
          f"{sub.summary()}); baseline {base * args.steps:.1f} s ({args.steps} steps: the paper's stop rule "
          f"|d loss| < 0.05 does not fire, docs/design.md) -> {base * args.steps / full:.2f}x"
          f"{_versus_paper(args, full)}")


def compare_results(folded, hooked, seconds: float) -> None:
    """Print how far the folded fit's result is from the hooks' (kept filters, steps, KL, agreement)."""
    def kept(sub):
        return {(site, i) for site, indices in sub.kept_filters().items() for i in indices}
    a, b = kept(folded), kept(hooked)
    overlap = len(a & b) / max(len(a | b), 1)
    print(f"results, folded vs hooks: kept filters {len(a)} vs {len(b)}, {len(a & b)} in both ({100 * overlap:.1f} % "
          f"Jaccard; {100 * len(a & b) / max(len(a), len(b), 1):.1f} % of the larger set), steps {folded.config['steps_run']} vs {hooked.config['steps_run']}, "
          f"KL {folded.fidelity['kl']:.4f} vs {hooked.fidelity['kl']:.4f} "
          f"(|diff| {abs(folded.fidelity['kl'] - hooked.fidelity['kl']):.4f}), top-1 agreement "
          f"{folded.fidelity['agree']}/{folded.fidelity['images']} vs {hooked.fidelity['agree']}/"
          f"{hooked.fidelity['images']}; folded fit {seconds:.1f} s")


def _versus_paper(args: argparse.Namespace, seconds: float) -> str:
    """``"; paper 55 s -> 2.10x faster"`` when ``--paper-seconds`` is given, else ``""``."""
    if not args.paper_seconds:
        return ""
    return f"; paper {args.paper_seconds:.0f} s (RTX 6000) -> {args.paper_seconds / seconds:.2f}x faster than the paper"


if __name__ == "__main__":
    main()
