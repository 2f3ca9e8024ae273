"""How many timm architectures materialise exactly? (issue: materialise; compare torch-pruning's
README claim of 119/294 = 40.5 % timm models prunable).

For a seeded random sample of ``timm.list_models()`` (random weights; structure only), each model gets
a random sub-network (30 % of filters kept, gates open with probability 1/2), is materialised, and
passes when the exactness contract holds. Physical pruning counts separately: a model whose channels
could only be zeroed still passes the contract.

Each model runs in a child process with a time and memory limit.

    python benchmarks/coverage.py --sample 60 --seed 0
"""
from __future__ import annotations

import argparse
import random
import re
import resource
import subprocess
import sys
import time
import warnings

import timm
import torch

from hookchains.core.testing import check_model, input_for

TOO_BIG = re.compile(r"(giant|gigantic|so400m|huge|large|xxl|xlarge|_g_|_l2|enormous|_1b|_7b|448|512|384)")


def check(name: str, size: int) -> tuple:
    """(status, detail) for one model, in this process."""
    try:
        model = timm.create_model(name).eval()
        try:
            example = input_for(model, size=size)
            model(example)
        except Exception:  # some models need their own resolution (patch size, windows, asserts)
            example = input_for(model)
        _, report, _ = check_model(model, example)
        return "pass", ("pruned" if report.pruned else "zeroed: " + "; ".join(report.notes)[:120])
    except Exception as exc:  # report every failure with its reason
        return "fail", f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"


def check_isolated(name: str, size: int, seconds: int, memory_gb: int) -> tuple:
    """Run :func:`check` in a child process with a time and memory limit (a model that exhausts
    memory must not take the whole benchmark down)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_gb << 30, memory_gb << 30))

    try:
        done = subprocess.run([sys.executable, __file__, "--one", name, "--size", str(size)], capture_output=True,
                              text=True, timeout=seconds, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return "timeout", f"> {seconds} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith(("pass\t", "fail\t"))]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:150]
        return "fail", f"child exited {done.returncode} ({tail})"
    status, detail = lines[-1].split("\t", 1)
    return status, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="input size for models that accept any size")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per model")
    parser.add_argument("--memory-gb", type=int, default=12, help="address-space limit per model")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    if args.one:
        print("\t".join(check(args.one, args.size)))
        return
    names = [n for n in timm.list_models() if not TOO_BIG.search(n)]
    sample = sorted(random.Random(args.seed).sample(names, args.sample))
    counts = {"pass": 0, "fail": 0, "timeout": 0}
    pruned = 0
    for name in sample:
        start = time.perf_counter()
        status, detail = check_isolated(name, args.size, args.timeout, args.memory_gb)
        counts[status] += 1
        pruned += detail == "pruned"
        print(f"{status:7} {name:45} {time.perf_counter() - start:6.1f}s  {detail}", flush=True)
    total = len(sample)
    print(f"exact: {counts['pass']}/{total} = {100 * counts['pass'] / total:.1f} % "
          f"(physically pruned {pruned}/{total} = {100 * pruned / total:.1f} %; "
          f"failed {counts['fail']}, timed out {counts['timeout']}); torch-pruning README: 119/294 = 40.5 %")


if __name__ == "__main__":
    main()
