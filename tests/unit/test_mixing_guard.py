"""MixingGuard swaps torch-pruning's index-mapping functions: guards open in several threads at once must
each see their own guard, and the last one to close must leave torch-pruning as it was."""
from __future__ import annotations

import threading

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping

from hookchains.core.pruning import MixingGuard


def test_guards_open_in_two_threads_each_guard_their_own_search_and_restore_torch_pruning():
    original = index_mapping.update_index_mapping, index_mapping.update_reshape_index_mapping
    net, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval(), torch.randn(1, 3, 8, 8)
    a_open, b_open, a_closed = threading.Event(), threading.Event(), threading.Event()
    budgets = {}

    def first() -> None:  # opens first, closes while the second is still open
        with MixingGuard():
            a_open.set()
            b_open.wait(60)
        a_closed.set()

    def second() -> None:
        a_open.wait(60)
        with MixingGuard() as guard:
            b_open.set()
            a_closed.wait(60)
            tp.DependencyGraph().build_dependency(net, example_inputs=x)  # runs this thread's guard
            budgets["second"] = guard.budget
        budgets["outside"] = MixingGuard().budget

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # the graph has 2 convs and a ReLU: the guard's step budget is SEARCH_STEPS x its dependencies (> 0)
    assert budgets["second"] > 0 and budgets["outside"] == 0
    assert (index_mapping.update_index_mapping, index_mapping.update_reshape_index_mapping) == original


def test_a_thread_without_a_guard_gets_torch_pruning_unchanged_while_another_holds_one():
    net, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval(), torch.randn(1, 3, 8, 8)
    with MixingGuard() as guard:
        worker = threading.Thread(target=lambda: tp.DependencyGraph().build_dependency(net, example_inputs=x))
        worker.start()
        worker.join()
        assert guard.budget == 0  # the other thread's graph did not go through this guard
        tp.DependencyGraph().build_dependency(net, example_inputs=x)
        assert guard.budget > 0
