"""How many timm architectures materialise exactly, and how many lose channels for real?
(issue 11; compare torch-pruning's README claim of 119/294 = 40.5 % timm models prunable).

For a seeded random sample of ``timm.list_models()`` (random weights; structure only), each model gets
a random sub-network (30 % of filters kept, gates open with probability 1/2), is materialised, and
passes when the exactness contract holds. "Physically pruned" counts models whose materialised
module has fewer conv/linear channels than the original (channels actually removed), not a flag.
Next to it, torch-pruning alone on the same model: its ``MagnitudePruner`` removing 30 % of the
channels (classifier kept) passes when the pruned model still runs, with the same output shape and
fewer parameters (no exactness claim: it prunes by magnitude, not zeros).

Each model runs in child processes with a time and memory limit (a time-out is a failure).

    python benchmarks/coverage.py --sample 80 --seed 2026
    python benchmarks/coverage.py --sample 80 --seed 2027 --resume benchmarks/results/coverage_seed2027_hookchains.txt

With ``--resume FILE`` the models already in FILE are skipped, each new result line is appended to FILE as it
comes (one ``write`` + ``fsync`` per line, so an interrupted run leaves whole lines), and the totals count
every line of the sample in FILE.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import resource
import subprocess
import sys
import time
import warnings

import timm
import torch
from tqdm import tqdm

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
        start = time.perf_counter()
        _, report, sub = check_model(model, example, output=class_output(model, example))
        seconds = time.perf_counter() - start
        stayed = ", ".join(f"{k} {v}" for k, v in sorted(report.stayed().items()))
        zeroed = sum(entry["zeroed"] for entry in report.sites.values())
        detail = (f"removed {report.channels_removed}/{report.channels_before} channels in {seconds:.0f} s, "
                  f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters "
                  f"(zeroed at sites {zeroed}; stayed: {stayed or 'none'})")
        return "pass", detail + ("; " + "; ".join(report.notes)[:160] if report.notes else "")
    except Exception as exc:  # report every failure with its reason
        return "fail", _reason(exc)


def class_output(model, example):
    """What a user would pass as ``--output`` for a model returning a tuple/list (0) or a dict (``logits``
    when there is such a key, else the first); None for one tensor."""
    with torch.no_grad():
        out = model(example)
    if isinstance(out, dict):
        return "logits" if "logits" in out else next(iter(out))
    return 0 if isinstance(out, (tuple, list)) else None


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"


def classifier(model) -> list:
    """[the classifier] for torch-pruning to keep, or [] for a model without one (an encoder)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return [head] if isinstance(head, torch.nn.Module) and not isinstance(head, torch.nn.Identity) else []


def check_torch_pruning(name: str, size: int) -> tuple:
    """(status, detail) of torch-pruning alone: MagnitudePruner at 30 % channels, classifier kept."""
    import torch_pruning as tp
    try:
        model = timm.create_model(name).eval()
        try:
            example = input_for(model, size=size)
            expected = model(example).shape
        except Exception:
            example = input_for(model)
            expected = model(example).shape
        params = sum(p.numel() for p in model.parameters())
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=0.3, ignored_layers=classifier(model))
        pruner.step()
        with torch.no_grad():
            shape = model(example).shape
        after = sum(p.numel() for p in model.parameters())
        if shape != expected or after >= params:
            return "fail", f"output {tuple(shape)} vs {tuple(expected)}, parameters {params} -> {after}"
        return "pass", f"parameters {params} -> {after}"
    except Exception as exc:
        return "fail", _reason(exc)


def check_isolated(name: str, size: int, seconds: int, memory_gb: int, tool: str = "hookchains",
                   threads: int = 1) -> tuple:
    """Run :func:`check` in a child process with a time and memory limit (a model that exhausts
    memory must not take the whole benchmark down)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_gb << 30, memory_gb << 30))

    try:
        done = subprocess.run([sys.executable, __file__, "--one", name, "--size", str(size), "--tool", tool,
                               "--threads", str(threads)],
                              capture_output=True,
                              text=True, timeout=seconds, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return "timeout", f"> {seconds} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith(("pass\t", "fail\t"))]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:150]
        return "fail", f"child exited {done.returncode} ({tail})"
    status, detail = lines[-1].split("\t", 1)
    return status, detail


RESULT = re.compile(r"^(pass|fail|timeout)\s+(\S+)\s+[\d.]+s  (.*)$")


def done_lines(path: str | None) -> dict:
    """{model name: result line} of the result lines already in ``path`` (none when it is None or absent)."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as handle:
        return {m.group(2): line.rstrip("\n") for line in handle if (m := RESULT.match(line))}


def append_line(path: str | None, line: str) -> None:
    """Print ``line`` and, with a results file, append it whole (one write + fsync; on a line of its own
    even after a cut-off last line)."""
    print(line, flush=True)
    if path:
        with open(path, "a+b") as handle:
            cut = handle.seek(0, os.SEEK_END) > 0 and handle.seek(-1, os.SEEK_END) >= 0 and handle.read(1) != b"\n"
            handle.write(("\n" if cut else "").encode() + line.encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="input size for models that accept any size")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per model")
    parser.add_argument("--memory-gb", type=int, default=12, help="address-space limit per model")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per model (default 1: on a shared 2-core machine 2 threads made "
                             "dla102x2 take 57 s instead of 7 s)")
    parser.add_argument("--resume", metavar="FILE",
                        help="skip the models already in FILE, append each new result line to it")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--tool", default="hookchains", choices=("hookchains", "torch-pruning"),
                        help="what to check: hookchains' materialise, or torch-pruning alone (run both for the comparison)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.one:
        print("\t".join((check if args.tool == "hookchains" else check_torch_pruning)(args.one, args.size)))
        return
    names = [n for n in timm.list_models() if not TOO_BIG.search(n)]
    sample = sorted(random.Random(args.seed).sample(names, args.sample))
    lines = done_lines(args.resume)
    for name in tqdm(sample, desc="models", disable=not sys.stderr.isatty()):
        if name in lines:
            continue
        start = time.perf_counter()
        status, detail = check_isolated(name, args.size, args.timeout, args.memory_gb, args.tool, args.threads)
        lines[name] = f"{status:7} {name:45} {time.perf_counter() - start:6.1f}s  {detail}"
        append_line(args.resume, lines[name])
    counts = {"pass": 0, "fail": 0, "timeout": 0}
    pruned = 0
    for name in sample:
        status, _, detail = RESULT.match(lines[name]).groups()
        counts[status] += 1
        pruned += status == "pass" and not detail.startswith("removed 0/")
    total = len(sample)
    if args.tool == "torch-pruning":
        print(f"torch-pruning alone (MagnitudePruner 30 %, runs with the same output shape): "
              f"{counts['pass']}/{total} = {100 * counts['pass'] / total:.1f} % (failed {counts['fail']}, "
              f"timed out {counts['timeout']}); torch-pruning README: 119/294 = 40.5 %")
        return
    print(f"exact: {counts['pass']}/{total} = {100 * counts['pass'] / total:.1f} % "
          f"(failed {counts['fail']}, timed out {counts['timeout']}); "
          f"physically pruned (channels removed): {pruned}/{total} = {100 * pruned / total:.1f} %")


if __name__ == "__main__":
    main()
