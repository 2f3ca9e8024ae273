"""benchmarks/coverage.py --resume: the models already in the results file are found (comments and
partial lines ignored), and each new line is appended whole."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("coverage_benchmark",
                                              Path(__file__).parents[2] / "benchmarks" / "coverage.py")
coverage = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(coverage)


def test_resume_reads_the_done_models_and_appends_whole_lines(tmp_path):
    results = tmp_path / "results.txt"
    results.write_text("# run at abc, stopped after 2 models\n"
                       "pass    convnext_femto_ols                              81.1s  removed 12222/14992 channels\n"
                       "timeout dla102x2                                       181.0s  > 180 s\n"
                       "pass    half_written")
    assert sorted(coverage.done_lines(str(results))) == ["convnext_femto_ols", "dla102x2"]
    line = f"{'fail':7} {'resnet_ls':45} {12.5:6.1f}s  RuntimeError: shape '[3]'"
    coverage.append_line(str(results), line)
    done = coverage.done_lines(str(results))
    assert done["resnet_ls"] == line  # a name ending in "s" followed by padding is still one name
    coverage.append_line(str(results), line.replace("resnet_ls", "vit_tiny"))
    assert results.read_text().endswith(f"half_written\n{line}\n{line.replace('resnet_ls', 'vit_tiny')}\n")
    assert coverage.RESULT.match(line).groups() == ("fail", "resnet_ls", "RuntimeError: shape '[3]'")
    assert coverage.done_lines(str(tmp_path / "absent.txt")) == {} and coverage.done_lines(None) == {}
