"""The whole ``hookchains demo``, this checkout against another install, in one run (issue 16).

Runs ``hookchains demo --json`` of each install in turn, alternating over ``--rounds`` (the machine may
be shared: the best round of each counts), and prints each one's seconds by stage, its sub-network
(live filters, agreement, KL) and the ratio of the totals.

    python3 -m venv /tmp/landed && /tmp/landed/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        && /tmp/landed/bin/pip install git+file://$PWD@abf69fa        # or any folder with an older checkout
    python benchmarks/demo_time.py --baseline /tmp/landed/bin/hookchains
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict


def run_demo(command: str, out: Path) -> Dict:
    """``command demo --json`` into ``out``: its JSON line."""
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run([command, "demo", "--out", str(out), "--json"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe(result: Dict) -> str:
    counts, fidelity = result["counts"], result["fidelity"]
    live = counts.get("filters_live", counts["filters_kept"])
    stages = ", ".join(f"{k} {v:.0f}" for k, v in result["seconds_by_stage"].items())
    return (f"{result['seconds']:.1f} s ({stages}); {live} live filters, top-1 agreement "
            f"{fidelity['agree']}/{fidelity['images']}, KL {fidelity['kl']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the other install's hookchains executable")
    parser.add_argument("--current", default=str(Path(sys.executable).with_name("hookchains")),
                        help="this checkout's hookchains executable [next to this python]")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    best: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.rounds):
            for name, command in (("baseline", args.baseline), ("current", args.current)):
                result = run_demo(command, Path(scratch) / name)
                print(f"{name:8} {describe(result)}", flush=True)
                if name not in best or result["seconds"] < best[name]["seconds"]:
                    best[name] = result
    ratio = best["baseline"]["seconds"] / best["current"]["seconds"]
    print(f"best of {args.rounds}: baseline {best['baseline']['seconds']:.1f} s, current "
          f"{best['current']['seconds']:.1f} s -> {ratio:.2f}x")


if __name__ == "__main__":
    main()
