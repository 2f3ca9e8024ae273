"""One result base (:mod:`hookchains.core.result`) for filter and token results: save/load with one format
version, the summary's shared parts, one exactness check. The files under ``tests/data/format_v1`` were
written by hookchains before the base existed (commit aa88d5e), so loading them checks old files still load."""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch

from hookchains.core.io import read_tensors
from hookchains.core.materialize import materialize
from hookchains.core.result import FORMAT_VERSION, TOLERANCE, MaterializeError, Result, check_exact
from hookchains.core.sites import TokenSite
from hookchains.core.subnetwork import Subnetwork
from hookchains.tokens.materialize import TokenDroppedViT
from hookchains.tokens.result import TOKEN_FORMAT_VERSION, TokenSubnetwork

OLD = Path(__file__).parent.parent / "data" / "format_v1"
KINDS = [(Subnetwork, "subnetwork"), (TokenSubnetwork, "tokens")]
ADDED_COUNTS = ("filters_live",)  # counts added since format 1 (same version: a reader may ignore them)


@pytest.mark.parametrize("kind,folder", KINDS)
def test_a_file_of_the_previous_release_loads_says_the_same_and_saves_the_same(kind, folder, tmp_path):
    result = kind.load(OLD / folder)
    meta_file, tensor_file = kind.files
    old_meta = json.loads((OLD / folder / meta_file).read_text())
    assert isinstance(result, Result) and result.summary() == old_meta["summary"]
    result.save(tmp_path)
    saved = json.loads((tmp_path / meta_file).read_text())
    added = {k: saved["counts"].pop(k) for k in ADDED_COUNTS if k in saved["counts"] and k not in old_meta["counts"]}
    assert saved == old_meta and all(v == saved["counts"]["filters_kept"] for v in added.values())
    old, new = read_tensors(OLD / folder / tensor_file), read_tensors(tmp_path / tensor_file)
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


@pytest.mark.parametrize("kind,folder", KINDS)
def test_another_format_version_is_refused_in_one_line_naming_both(kind, folder, tmp_path):
    shutil.copytree(OLD / folder, tmp_path / "run")
    meta = tmp_path / "run" / kind.files[0]
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": 2}))
    with pytest.raises(ValueError, match=f"has format version 2, this hookchains reads version {FORMAT_VERSION}") as err:
        kind.load(tmp_path / "run")
    assert "\n" not in str(err.value) and FORMAT_VERSION == TOKEN_FORMAT_VERSION == 1


def test_token_summary_and_html_use_the_shared_parts():
    sites = [TokenSite(f"blocks.{i}", f"B{i + 1}", 5) for i in range(2)]
    tsub = TokenSubnetwork(torch.ones(1, 2, 5), sites, fidelity={"kl": 0.25, "agree": 1, "images": 1, "quotient_mean": 0.5},
                           config={"ended": "step_limit", "kept_change_per_10_steps": -2.0, "kl_tol": 0.1})
    assert tsub.summary() == ("keeps 10/10 token slots per image (100.0 %, mean of 1); last block keeps 4.0 patch tokens "
                              "per image; top-1 agreement 1/1; KL 0.250; Q mean 0.50; stopped at the step limit, "
                              "kept token slots still falling 2.0 % per 10 steps, KL 0.250 above kl_tol 0.1")
    assert tsub._repr_html_() == f"<p><strong>TokenSubnetwork</strong>: {tsub.summary()}</p>"


@pytest.mark.parametrize("agree,said", [(18, True), (19, False)])
def test_a_step_limit_summary_says_when_agreement_is_below_min_agreement(agree, said):
    sites = [TokenSite("blocks.0", "B1", 5)]
    fidelity = {"kl": 0.05, "agree": agree, "images": 20, "positions": 20, "quotient_mean": 1.0}
    tsub = TokenSubnetwork(torch.ones(20, 1, 5), sites, fidelity=fidelity,
                           config={"ended": "step_limit", "kept_change_per_10_steps": 0.0, "kl_tol": 0.1,
                                   "min_agreement": 0.95})
    assert tsub.summary().endswith(", top-1 agreement 90 % below min_agreement 95 %") == said
    assert "above kl_tol" not in tsub.summary()


def test_one_exactness_check_with_its_tolerance_in_one_place():
    reference = torch.tensor([[4.0, -2.0]])  # limit: TOLERANCE x 4
    assert check_exact(reference + 4 * TOLERANCE * 0.99, reference) == pytest.approx(4 * TOLERANCE * 0.99, rel=1e-3)
    with pytest.raises(MaterializeError, match=r"token-dropping module differs from the masked network by 0\.0005 "
                                               r"\(> 0\.0001 x max\|logit\| = 0\.0004\)"):
        check_exact(reference + 5 * TOLERANCE, reference, what="token-dropping module", against="the masked network")
    defaults = [inspect.signature(f).parameters["tolerance"].default for f in (materialize, TokenDroppedViT.check)]
    assert defaults == [TOLERANCE, TOLERANCE]
