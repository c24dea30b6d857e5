"""Tests for fosctrain.models: the registry, the paper's architectures and Normalize."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fosctrain.errors import UserError
from fosctrain.models import (
    MODELS,
    Normalize,
    create_model,
    eval_copy,
    list_models,
    register,
    set_layout,
    wide_resnet,
)

SMALL = ["mnist-cnn", "cifar-cnn8", "preact-resnet18", "wrn-16-4"]
INPUT = {"mnist-cnn": (1, 28, 28)}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv(cin: int, cout: int) -> int:
    """A 3x3 convolution with bias plus its BatchNorm (weight and bias)."""
    return cin * cout * 9 + cout + 2 * cout


def test_registry_lists_every_model() -> None:
    expected = {"mnist-cnn", "cifar-cnn8", "preact-resnet18", "wrn-16-4", "wrn-28-10", "wrn-34-10"}
    assert expected <= set(list_models())
    assert list_models() == sorted(MODELS)


@pytest.mark.parametrize("name", SMALL)
def test_small_models_map_inputs_to_logits(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.rand(2, *INPUT.get(name, (3, 32, 32)))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_models_train_mode_backward() -> None:
    model = create_model("wrn-16-4", num_classes=7).train()
    logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(("name", "millions"), [("wrn-34-10", 46.16), ("wrn-28-10", 36.48)])
def test_big_wide_resnets(name: str, millions: float) -> None:
    model = create_model(name).eval()
    assert abs(_params(model) / 1e6 - millions) < 0.05
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_known_parameter_counts() -> None:
    assert abs(_params(create_model("preact-resnet18")) / 1e6 - 11.17) < 0.01
    assert abs(_params(create_model("wrn-16-4")) / 1e6 - 2.75) < 0.01


def test_mnist_cnn_matches_paper() -> None:
    model = create_model("mnist-cnn")
    kinds = [type(m) for m in model]
    assert kinds == [
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
        nn.Flatten, nn.Linear, nn.ReLU, nn.Linear,
    ]  # fmt: skip
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (3, 3), (1, 1)),
        (32, 64, (3, 3), (1, 1)),
    ]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in linears] == [(64 * 7 * 7, 128), (128, 10)]
    by_hand = _conv(1, 32) + _conv(32, 64) + (3136 * 128 + 128) + (128 * 10 + 10)
    assert by_hand == 421_834
    assert _params(model) == by_hand


def test_cifar_cnn8_matches_paper() -> None:
    model = create_model("cifar-cnn8")
    widths = [m.out_channels for m in model if isinstance(m, nn.Conv2d)]
    assert widths == [64, 64, 128, 128, 196, 196]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 3
    convs = (
        _conv(3, 64) + _conv(64, 64) + _conv(64, 128) + _conv(128, 128)
        + _conv(128, 196) + _conv(196, 196)
    )  # fmt: skip
    fcs = (196 * 4 * 4 * 256 + 256) + 2 * 256 + (256 * 10 + 10)
    assert _params(model) == convs + fcs


def test_input_size_and_channels_options() -> None:
    model = create_model("mnist-cnn", in_channels=3, input_size=32).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UserError, match="input_size"):
        create_model("mnist-cnn", input_size=3)


def test_normalize_applied_when_mean_std_given() -> None:
    torch.manual_seed(0)
    plain = create_model("cifar-cnn8").eval()
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    normed = create_model("cifar-cnn8", mean=mean, std=std).eval()
    assert isinstance(normed[0], Normalize)
    normed[1].load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        assert torch.allclose(normed(x), plain(expected), atol=1e-5)
    assert {"0.mean", "0.std"} <= set(normed.state_dict())


def test_normalize_rejects_bad_statistics() -> None:
    with pytest.raises(UserError, match="std"):
        create_model("cifar-cnn8", mean=(0.5, 0.5, 0.5), std=(0.5, 0.0, 0.5))
    with pytest.raises(UserError, match="2 values, expected 1$"):
        create_model("mnist-cnn", mean=(0.1, 0.2), std=(0.3, 0.3))
    with pytest.raises(UserError, match="both"):
        create_model("mnist-cnn", mean=0.1307)
    assert isinstance(create_model("mnist-cnn", mean=0.1307, std=0.3081)[0], Normalize)


def test_unknown_name_and_options() -> None:
    with pytest.raises(UserError, match="mnist-cnn"):
        create_model("resnet-9000")
    with pytest.raises(UserError, match="bogus"):
        create_model("mnist-cnn", bogus=1)
    with pytest.raises(UserError, match="num_classes"):
        create_model("mnist-cnn", num_classes=0)


def test_wide_resnet_factory() -> None:
    model = wide_resnet(10, 1, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(UserError, match="6n"):
        wide_resnet(20, 2)


def test_register_adds_a_model() -> None:
    @register("test-tiny-linear")
    def tiny(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 4, num_classes))

    try:
        assert "test-tiny-linear" in list_models()
        model = create_model("test-tiny-linear", num_classes=4)
        assert model(torch.rand(2, 1, 2, 2)).shape == (2, 4)
        with pytest.raises(ValueError):
            register("test-tiny-linear")(tiny)
    finally:
        MODELS.pop("test-tiny-linear")


@pytest.mark.parametrize("name", ["mnist-cnn", "cifar-cnn8"])
def test_channels_last_changes_only_the_layout(name):
    """Logits, loss and input gradient (what an attack step uses) agree with the default
    layout's to float rounding, and the state dict saved from it is the same weights."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.rand(8, *INPUT.get(name, (3, 32, 32)))
    y = torch.arange(8) % 10

    def loss_and_grad(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        logits = m(xi)
        loss = nn.functional.cross_entropy(logits, y)
        return logits, loss, torch.autograd.grad(loss, xi)[0]

    before = loss_and_grad(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    fast = set_layout(model, True)
    conv = [m for m in fast.modules() if isinstance(m, nn.Conv2d)][-1]  # more than 1 input
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    for a, b in zip(before, loss_and_grad(fast), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(weights[k], v) for k, v in fast.state_dict().items())
    set_layout(fast, False)  # in place, as nn.Module.to is
    assert conv.weight.is_contiguous()


def test_eval_copy_attacks_in_channels_last_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = create_model("mnist-cnn").train()
    copy = eval_copy(model)
    convs = [[m for m in net.modules() if isinstance(m, nn.Conv2d)][-1] for net in (model, copy)]
    assert model.training and not copy.training
    assert convs[0].weight.is_contiguous() and not convs[1].weight.is_contiguous()
    assert convs[0].weight is not convs[1].weight
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(copy(x), model.eval()(x), rtol=1e-4, atol=1e-6)
