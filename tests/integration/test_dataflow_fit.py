"""A fit records its dead filters (issue 12, item 4): kept filters with no live input."""
from __future__ import annotations

import pytest

import hookchains
from hookchains.core.dataflow import find_dead_filters

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_fit_records_its_dead_filters(digits_net, digits_task):
    images, _ = digits_task
    with hookchains.attach(digits_net, example=images[:1]) as hooks:
        sub = hookchains.fit(hooks, images, steps=3, progress=False)
    assert sub.dead_filters == find_dead_filters(sub, digits_net)
    assert sub.counts()["dead_filters"] == sum(len(v) for v in sub.dead_filters.values())


def test_the_summary_names_dead_filters_only_when_there_are_some(digits_net, digits_task):
    images, _ = digits_task
    with hookchains.attach(digits_net, example=images[:1]) as hooks:
        sub = hookchains.fit(hooks, images, steps=3, progress=False)
    site, kept = next(iter(sub.kept_filters().items()))
    total, all_kept = sub.counts()["filters_total"], sub.counts()["filters_kept"]
    sub.dead_filters = {site: kept[:2]}
    assert sub.counts()["filters_live"] == all_kept - 2
    assert (f"and {all_kept - 2}/{total} filters ({100 * (all_kept - 2) / total:.2f} %; not counted: 2 more kept "
            "filters that are dead, constant whatever the input") in sub.summary()
    sub.dead_filters = {}
    assert "dead" not in sub.summary() and f"and {all_kept}/{total} filters" in sub.summary()
