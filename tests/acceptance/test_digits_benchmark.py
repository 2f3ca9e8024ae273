"""benchmarks/digits.py: the sweep study's offline data (scikit-learn digits as PNGs) and CNN (trained here)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import resolve_data_config
from torch import nn

from benchmarks.digits import PIXEL_MEAN, PIXEL_STD, build, digit_image, train, write_images  # pytest pythonpath ["."]
from hookchains.adapters import discover
from hookchains.inputs.models import create_model, preprocessing

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_build_is_a_miniature_cnn_with_32px_timm_preprocessing(monkeypatch):
    model = build()
    assert resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)
    prep = preprocessing(model)
    white = prep(Image.new("L", (8, 8), 255))  # grey 8x8 PNG -> RGB, bilinear to 32x32, digits' mean/std
    assert white.shape == (3, 32, 32) and torch.allclose(white, torch.full_like(white, (1 - PIXEL_MEAN) / PIXEL_STD))
    filters = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    sites = discover(model, example=torch.zeros(1, 3, 32, 32))
    assert 250 <= filters <= 400 and sites.totals()["conv_filters"] == filters
    assert [g.name for g in sites.gates] == ["features.10", "features.14"]  # a VGG layer and the residual block
    monkeypatch.chdir(ROOT)  # the sweep's spec string imports the module from the working directory
    spec_model, _ = create_model("benchmarks.digits:build", num_classes=3)
    assert spec_model(torch.zeros(2, 3, 32, 32)).shape == (2, 3) and not spec_model.training


def test_write_images_writes_per_class_pngs_with_the_digits_pixels(tmp_path):
    # load_digits row 0 starts with values 0 0 5 13 9 1 0 0; pixel = round(value * 255 / 16)
    assert np.asarray(digit_image(0))[0].tolist() == [0, 0, 80, 207, 143, 16, 0, 0]
    used = write_images(tmp_path, per_class=3, seed=1)
    folders = sorted(tmp_path.iterdir())
    assert [f.name for f in folders] == [str(d) for d in range(10)] and len(used) == 30
    assert all(len(list(f.glob("*.png"))) == 3 for f in folders)
    row = min(used)
    written = next(tmp_path.glob(f"*/{row}.png"))
    with Image.open(written) as picture:
        assert picture.mode == "L" and np.array_equal(np.asarray(picture), np.asarray(digit_image(row)))
    assert write_images(tmp_path, per_class=3, seed=1) == used  # same seed: same files, rewritten in place
    with pytest.raises(ValueError, match="other PNG files"):
        write_images(tmp_path, per_class=3, seed=2)


def test_one_epoch_on_a_subset_beats_chance_and_is_deterministic():
    torch.manual_seed(0)
    model = build()
    twin = copy.deepcopy(model)
    rows, held = list(range(400)), list(range(1500, 1700))
    result = train(model, rows, held, epochs=1, seed=0, batch_size=8, log=None)
    assert result["held"] > 0.4 and result["train"] > 0.4  # chance: 0.1
    assert train(twin, rows, held, epochs=1, seed=0, batch_size=8, log=None) == result
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
