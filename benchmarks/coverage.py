"""How many timm architectures materialise exactly? (issue: materialise; compare torch-pruning's
README claim of 119/294 = 40.5 % timm models prunable).

For a seeded random sample of ``timm.list_models()`` (random weights; structure only), each model gets
a random sub-network (30 % of filters kept, gates open with probability 1/2), is materialised, and
passes when the exactness contract holds. Physical pruning counts separately: a model whose channels
could only be zeroed still passes the contract.

    python benchmarks/coverage.py --sample 60 --seed 0
"""
from __future__ import annotations

import argparse
import random
import re
import signal
import time
import warnings

import timm
import torch

from hookchains.coverage import check_model, input_for

TOO_BIG = re.compile(r"(giant|huge|large|xxl|xlarge|_g_|enormous|_1b|_7b|448|512|384)")


class _Timeout(BaseException):  # not swallowed by the library's own except Exception
    pass


def _alarm(signum, frame):
    raise _Timeout()


def check(name: str, size: int, seconds: int) -> tuple:
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        model = timm.create_model(name).eval()
        try:
            example = input_for(model, size=size)
            model(example)
        except Exception:  # some models need their own resolution (patch size, windows, asserts)
            example = input_for(model)
        _, report, _ = check_model(model, example)
        return "pass", ("pruned" if report.pruned else "zeroed: " + "; ".join(report.notes)[:120])
    except _Timeout:
        return "timeout", f"> {seconds} s"
    except Exception as exc:  # report every failure with its reason
        return "fail", f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
    finally:
        signal.alarm(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="input size for models that accept any size")
    parser.add_argument("--timeout", type=int, default=180)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    names = [n for n in timm.list_models() if not TOO_BIG.search(n)]
    sample = sorted(random.Random(args.seed).sample(names, args.sample))
    counts = {"pass": 0, "fail": 0, "timeout": 0}
    pruned = 0
    for name in sample:
        start = time.perf_counter()
        status, detail = check(name, args.size, args.timeout)
        counts[status] += 1
        pruned += detail == "pruned"
        print(f"{status:7} {name:45} {time.perf_counter() - start:6.1f}s  {detail}", flush=True)
    total = len(sample)
    print(f"exact: {counts['pass']}/{total} = {100 * counts['pass'] / total:.1f} % "
          f"(physically pruned {pruned}/{total} = {100 * pruned / total:.1f} %; "
          f"failed {counts['fail']}, timed out {counts['timeout']}); torch-pruning README: 119/294 = 40.5 %")


if __name__ == "__main__":
    main()
