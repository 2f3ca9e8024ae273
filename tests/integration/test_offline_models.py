"""Kind 9 of issue 11: torchvision detection/segmentation builders must not fetch backbone weights
unless hub weights were asked for (their ``weights_backbone`` defaults to ImageNet)."""
from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import save_file

from hookchains.inputs.models import create_model


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails loudly; the hub cache is empty."""
    def refuse(*args, **kwargs):
        raise AssertionError("hookchains tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_torchvision_dense_models_build_offline_from_a_checkpoint(name, no_network, tmp_path):
    torch.manual_seed(0)
    reference, _ = create_model(f"torchvision:{name}")
    path = tmp_path / "weights.safetensors"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(path))
    model, ref = create_model(f"torchvision:{name}", checkpoint=str(path))
    assert ref.checkpoint_sha256 and not ref.pretrained
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not (tmp_path / "torch_home").exists()  # nothing was downloaded into the hub cache
