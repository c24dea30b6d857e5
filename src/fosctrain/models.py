"""Model registry (timm-like: build by name) and the architectures used for adversarial training.

All models take inputs in [0, 1] and return logits. Per-channel normalisation, when wanted,
is a `Normalize` first layer inside the model, so attacks always work in [0, 1] pixel space.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fosctrain.device import model_device
from fosctrain.errors import UserError, check_positive

ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make `factory(num_classes=..., in_channels=..., **options)` buildable by name."""

    def add(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return add


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def create_model(
    name: str, num_classes: int = 10, in_channels: int | None = None, **kwargs
) -> nn.Module:
    """Build a registered model; `mean`/`std` kwargs prepend a `Normalize` layer.

    `in_channels=None` keeps the model's own default (1 for MNIST models, 3 otherwise).
    """
    factory = MODELS.get(name)
    if factory is None:
        raise UserError(f"unknown model {name!r}; expected one of: {', '.join(list_models())}")
    check_positive("num_classes", num_classes, integer=True)
    mean, std = kwargs.pop("mean", None), kwargs.pop("std", None)
    _check_options(name, factory, kwargs)
    if in_channels is not None:
        check_positive("in_channels", in_channels, integer=True)
        kwargs["in_channels"] = in_channels
    model = factory(num_classes=num_classes, **kwargs)
    if mean is None and std is None:
        return model
    if mean is None or std is None:
        raise UserError(f"model {name!r}: give both mean and std for normalisation, or neither")
    norm = Normalize(mean, std)
    channels = _input_channels(model)
    if norm.mean.shape[1] not in (1, channels):
        allowed = "1" if channels == 1 else f"1 or {channels}"
        raise UserError(
            f"model {name!r}: mean/std have {norm.mean.shape[1]} values, expected {allowed}"
        )
    return nn.Sequential(norm, model)


def set_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    """The model's conv weights (and so its activations) in the channels-last memory layout,
    or back in the default one. On CPU, oneDNN's channels-last convolutions make a gradient
    evaluation of the paper's MNIST CNN 1.4-1.5x faster (benchmarks/channels_last.py). In eval
    mode it is as precise as the default layout; BatchNorm's training kernel is not (~30x the
    error), which is why training keeps the default unless asked. Inputs need no change
    (a one-channel image is laid out the same either way; others are converted by the conv).
    Checkpoints are written in the default layout, so either kind of model loads either."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(memory_format=fmt)


def eval_layout(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """The model in eval mode for attacks that only read it, channels-last where asked and on
    CPU: as precise as the default layout in eval mode and 1.3-1.5x faster there (on a GPU it
    was never measured, so the layout stays). In place, as set_layout."""
    on_cpu = model_device(model).type == "cpu"
    return set_layout(model, channels_last and on_cpu).eval()


def eval_copy(model: nn.Module) -> nn.Module:
    """eval_layout on a copy (validation, the final report): the training model's own layout,
    tensors and mode stay untouched (BatchNorm's channels-last training kernel is ~30x less
    precise, see Config.channels_last)."""
    return eval_layout(copy.deepcopy(model))


def _check_options(name: str, factory: ModelFactory, options: dict) -> None:
    """Reject options the factory does not take, naming the ones it does."""
    accepted = set(inspect.signature(factory).parameters) - {"num_classes", "in_channels"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        known = ", ".join(sorted(accepted | {"mean", "std"}))
        raise UserError(f"model {name!r}: unknown option(s) {', '.join(unknown)}; known: {known}")


def _input_channels(model: nn.Module) -> int:
    """Channels the model's first convolution expects."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return first.in_channels


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean and std stored as buffers (saved with the model)."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.shape != std_t.shape:
            raise UserError(f"Normalize: mean has {mean_t.numel()} values, std {std_t.numel()}")
        if not bool(torch.isfinite(mean_t).all()) or not bool((std_t > 0).all()):
            raise UserError("Normalize: expected finite mean and std > 0")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _init_weights(model: nn.Module, head: nn.Linear) -> None:
    """He (kaiming) init for convolutions and hidden linear layers; BN to identity; the
    logits layer keeps PyTorch's default weights; every bias starts at zero."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear) and m is not head:
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _pooled_size(input_size: int, pools: int, name: str) -> int:
    """Spatial size after `pools` 2x2 max-pools; UserError if the input is too small."""
    check_positive("input_size", input_size, integer=True)
    size = input_size
    for _ in range(pools):
        size //= 2
    if size < 1:
        raise UserError(f"model {name!r}: input_size {input_size} is too small for {pools} pools")
    return size


# ---------------------------------------------------------------- the paper's plain CNNs


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    """3x3 'same' convolution (with bias, as in the official Keras code), BN, ReLU."""
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register("mnist-cnn")
def mnist_cnn(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
    """The paper's MNIST CNN: conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, fc128-ReLU, fc10."""
    side = _pooled_size(input_size, 2, "mnist-cnn")
    head = nn.Linear(128, num_classes)
    model = nn.Sequential(
        *_conv_bn_relu(in_channels, 32),
        nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 128),
        nn.ReLU(inplace=True),
        head,
    )
    _init_weights(model, head)
    return model


@register("cifar-cnn8")
def cifar_cnn8(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """The paper's 8-layer CIFAR CNN: (conv64 x2, pool), (conv128 x2, pool), (conv196 x2, pool),
    fc256-BN-ReLU, fc10."""
    side = _pooled_size(input_size, 3, "cifar-cnn8")
    head = nn.Linear(256, num_classes)
    model = nn.Sequential(
        *_conv_bn_relu(in_channels, 64),
        *_conv_bn_relu(64, 64),
        nn.MaxPool2d(2),
        *_conv_bn_relu(64, 128),
        *_conv_bn_relu(128, 128),
        nn.MaxPool2d(2),
        *_conv_bn_relu(128, 196),
        *_conv_bn_relu(196, 196),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(196 * side * side, 256),
        nn.BatchNorm1d(256),
        nn.ReLU(inplace=True),
        head,
    )
    _init_weights(model, head)
    return model


# ---------------------------------------------------------------- PreAct ResNet-18


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016), also the WRN block of the Madry / TRADES
    code: BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, with a 1x1 convolution on the
    pre-activated input when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        if self.dropout:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + skip


class _ResidualNet(nn.Module):
    """The shared stem-blocks-head shape of the ResNets: conv1, residual layers, a final
    BN-ReLU, global average pooling and a linear classifier."""

    def _finish(self, layers: list[nn.Module], cin: int, num_classes: int) -> None:
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self, self.fc)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class PreActResNet(_ResidualNet):
    """PreAct ResNet for 32x32 inputs, with the final BN-ReLU used in adversarial training."""

    def __init__(self, blocks: Sequence[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        layers, cin = [], 64
        for i, count in enumerate(blocks):
            cout, stride = 64 * 2**i, 1 if i == 0 else 2
            for j in range(count):
                layers.append(PreActBlock(cin, cout, stride if j == 0 else 1))
                cin = cout
        self._finish(layers, cin, num_classes)


@register("preact-resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """PreAct ResNet-18 (blocks 2-2-2-2, widths 64-128-256-512)."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels)


# ---------------------------------------------------------------- Wide ResNet


class WideResNet(_ResidualNet):
    """WRN-depth-widen (Zagoruyko & Komodakis 2016) for 32x32 inputs: three groups of
    (depth - 4) / 6 blocks at widths 16k, 32k, 64k."""

    def __init__(
        self, depth: int, widen: int, num_classes: int, in_channels: int, dropout: float
    ) -> None:
        super().__init__()
        per_group = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        layers, cin = [], 16
        for i, cout in enumerate(widths):
            for j in range(per_group):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(PreActBlock(cin, cout, stride, dropout))
                cin = cout
        self._finish(layers, cin, num_classes)


def wide_resnet(
    depth: int, widen: int, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0
) -> nn.Module:
    """A WRN-depth-widen; depth must be 6n + 4 (e.g. 16, 28, 34)."""
    check_positive("widen", widen, integer=True)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise UserError(f"Wide ResNet depth must be 6n + 4 with n >= 1, got {depth!r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"Wide ResNet dropout must be in [0, 1), got {dropout!r}")
    return WideResNet(depth, widen, num_classes, in_channels, dropout)


@register("wrn-16-4")
def wrn_16_4(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """Wide ResNet 16-4."""
    return wide_resnet(16, 4, num_classes, in_channels, dropout)


@register("wrn-28-10")
def wrn_28_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """Wide ResNet 28-10."""
    return wide_resnet(28, 10, num_classes, in_channels, dropout)


@register("wrn-34-10")
def wrn_34_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """Wide ResNet 34-10 (the paper's CIFAR-10 model)."""
    return wide_resnet(34, 10, num_classes, in_channels, dropout)
