"""Do chains use only connections that exist? An independent check on the real MobileNetV2 demo.

Fits the embedded demo task (or loads a saved sub-network), extracts chains, and checks every step
by *perturbation*, not by :mod:`hookchains.core.dataflow`'s graph walk: with every filter site's
hooked output frozen at its clean value, ``+-1000`` is added to the source filter's output; the step
``A_u -> B_v`` is a real edge when that changes an input channel ``i`` of ``B``'s conv with a nonzero
weight ``W_B[v, i]`` (grouped/depthwise: inside ``v``'s group); the last step when it changes a
classifier input ``i`` with ``W_fc[c, i] != 0``. A chain node is *zero on its own image* when its
hooked output after the ReLU/ReLU6 module that follows it (if any) is 0 at every position.

Prints the two counts (issue 12: non-edges must be 0) and the dead filters of the sub-network, each
checked to give the same output on every task image (an input-independent constant).

Usage (repository root)::

    python benchmarks/chains_dataflow.py --steps 60 --image-size 128
    python benchmarks/chains_dataflow.py --load runs/demo --diversity 0.5
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

import hookchains
from hookchains.analysis.chains import Chain, extract_chains
from hookchains.core.dataflow import find_dead_filters, thresholded
from hookchains.core.subnetwork import Subnetwork
from hookchains.workflow.demo import demo_task

Node = Tuple[str, int]
DELTAS = (1000.0, -1000.0)  # one of the two survives any ReLU/ReLU6 unless the channel is constant


def after_activation(model: nn.Module, hook_module: str, out: Tensor) -> Tensor:
    """``out`` after the ReLU/ReLU6 that follows ``hook_module`` in its parent, if one does."""
    parent_name, _, child = hook_module.rpartition(".")
    names = [n for n, _ in (model.get_submodule(parent_name) if parent_name else model).named_children()]
    after = names.index(child) + 1 if child in names else len(names)
    follower = model.get_submodule(".".join(filter(None, [parent_name, names[after]]))) if after < len(names) else None
    if isinstance(follower, nn.ReLU6):
        return out.clamp(0, 6)
    return out.clamp(min=0) if isinstance(follower, nn.ReLU) else out


def _inputs(sub: Subnetwork, model: nn.Module, image: Tensor, nodes: Set[Node]):
    """Clean hooked outputs, and every consumer's input: clean and with each node perturbed by +-1000."""
    sites, consumers = sub.sites.filters, [s.name for s in sub.sites.filters] + [sub.sites.classifier]
    clean: Dict[str, Tensor] = {}
    seen: Dict[object, Dict[str, Tensor]] = {}
    state: Dict[str, object] = {"perturb": None, "key": "clean"}

    def out_hook(name: str):
        def hook(module, args, out):
            if state["perturb"] is None:
                clean[name] = out.detach().clone()
                return None
            frozen = clean[name].clone()
            site, index, delta = state["perturb"]
            if site == name:
                frozen[:, index] += delta
            return frozen
        return hook

    def in_hook(name: str):
        def hook(module, args):
            seen.setdefault(state["key"], {})[name] = args[0].detach().clone()
        return hook

    get = model.get_submodule
    handles = [get(s.hook_module).register_forward_hook(out_hook(s.name)) for s in sites]
    handles += [get(c).register_forward_pre_hook(in_hook(c)) for c in consumers]
    try:
        model(image)
        for node in nodes:
            for delta in DELTAS:
                state["perturb"], state["key"] = (*node, delta), (node, delta)
                model(image)
    finally:
        for handle in handles:
            handle.remove()
    return clean, seen


def _changed(seen, node: Node, consumer: str) -> Set[int]:
    """Input channels of ``consumer`` that perturbing ``node`` changes."""
    result: Set[int] = set()
    for delta in DELTAS:
        difference = seen["clean"][consumer] != seen[(node, delta)][consumer]
        per_channel = difference.flatten(2).any(-1)[0] if difference.ndim > 2 else difference[0]
        result |= set(torch.nonzero(per_channel).flatten().tolist())
    return result


def _weighted(model: nn.Module, consumer: str, v: int, channels: Set[int]) -> bool:
    """Whether a nonzero weight of ``consumer`` links one of ``channels`` to output ``v``."""
    module = model.get_submodule(consumer)
    weight, groups = module.weight.detach(), getattr(module, "groups", 1)
    per_in, group = weight.shape[1], v // (weight.shape[0] // groups)
    return any(group * per_in <= i < (group + 1) * per_in and bool(weight[v, i - group * per_in].ne(0).any())
               for i in channels)


def check(sub: Subnetwork, model: nn.Module, images: Tensor, chains: Sequence[List[Chain]]) -> Tuple[int, ...]:
    """(steps, steps through a non-edge, nodes, nodes zero on their own image) of ``chains``."""
    hook_of = {s.name: s.hook_module for s in sub.sites.filters}
    steps = bad = nodes = zero = 0
    with torch.no_grad(), thresholded(sub, model):
        for n, image_chains in enumerate(chains):
            needed = {node for chain in image_chains for node in chain.key}
            clean, seen = _inputs(sub, model, images[n:n + 1], needed)
            for chain in image_chains:
                path = list(chain.key)
                for site, index in path:
                    nodes += 1
                    zero += int(bool((after_activation(model, hook_of[site], clean[site][0, index]) == 0).all()))
                for a, b in zip(path, path[1:]):
                    bad += int(not _weighted(model, b[0], b[1], _changed(seen, a, b[0])))
                classifier = sub.sites.classifier
                bad += int(not _weighted(model, classifier, chain.target, _changed(seen, path[-1], classifier)))
                steps += len(path)
    return steps, bad, nodes, zero


def constant_filters(sub: Subnetwork, model: nn.Module, images: Tensor, dead: Dict[str, List[int]]) -> int:
    """How many of the ``dead`` filters give the same hooked output on every image."""
    outputs: Dict[str, Tensor] = {}
    get = model.get_submodule
    handles = [get(sub.sites.filter(name).hook_module).register_forward_hook(
        lambda m, a, o, name=name: outputs.__setitem__(name, o.detach().clone())) for name in dead]
    try:
        with torch.no_grad(), thresholded(sub, model):
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return sum(int(bool((outputs[name][:, j] == outputs[name][:1, j]).all())) for name, idx in dead.items()
               for j in idx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", help="a saved sub-network folder of the demo task (default: fit one)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--diversity", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _, task = demo_task(image_size=args.image_size)
    if args.load:
        sub = Subnetwork.load(args.load)
    else:
        with hookchains.attach(model) as hooks:
            sub = hookchains.fit(hooks, task.images, steps=args.steps, lr=0.02, progress=False)
    print(sub.summary())
    start = time.perf_counter()
    chains = extract_chains(sub, model, task.images, k=args.k, diversity=args.diversity)
    took = time.perf_counter() - start
    steps, bad, nodes, zero = check(sub, model, task.images, chains)
    dead = find_dead_filters(sub, model)
    print(f"chains: {sum(map(len, chains))} for {len(chains)} images (k={args.k}, diversity={args.diversity}, "
          f"{took:.1f} s); {bad}/{steps} chain steps through a non-edge; {zero}/{nodes} chain nodes zero on "
          f"their own image; dead filters {sum(map(len, dead.values()))} of {sub.counts()['filters_kept']} kept, "
          f"{constant_filters(sub, model, task.images, dead)} of them constant over the {len(chains)} images")


if __name__ == "__main__":
    main()
