"""The CIFAR-10 presets' pieces of the official code: Keras' per-iteration learning-rate decay,
L2 on chosen kernels only, and ImageDataGenerator's rotations, shifts and flips; and that
options added later leave earlier runs' identity (config hash) unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fosctrain.config import Config, resolve
from fosctrain.data import random_rotate_shift_flip, rotate_shift
from fosctrain.errors import UserError
from fosctrain.models import create_model
from fosctrain.train import set_lr
from fosctrain.trainer import create_optimizer, decayed_weights

ndimage = pytest.importorskip("scipy.ndimage")


def _scipy_rotate_shift(image: np.ndarray, degrees: float, shift: tuple[float, float]):
    """Independent reference: input coordinate = R (p - c) + c + shift, bilinear, nearest fill."""
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    centre = (np.array(image.shape) - 1) / 2
    offset = centre - rot @ centre + np.array(shift)
    return ndimage.affine_transform(image, rot, offset=offset, order=1, mode="nearest")


@pytest.mark.parametrize("size", [(9, 9), (7, 12)])
def test_rotate_shift_matches_scipy(size):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, *size, generator=gen, dtype=torch.float64)
    degrees = torch.tensor([0.0, 10.0, -7.5, 33.0, 90.0, -3.0], dtype=torch.float64)
    shifts = torch.tensor(
        [[0.0, 0.0], [1.0, -2.0], [0.3, 1.7], [-2.4, 0.0], [0.0, 0.5], [1.9, -1.1]],
        dtype=torch.float64,
    )
    out = rotate_shift(x, degrees, shifts)
    for n in range(6):
        for ch in range(2):
            ref = _scipy_rotate_shift(x[n, ch].numpy(), degrees[n].item(), tuple(shifts[n]))
            np.testing.assert_allclose(out[n, ch].numpy(), ref, atol=1e-9)


def test_rotate_shift_exact_cases():
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(rotate_shift(x, torch.zeros(1), torch.zeros(1, 2)), x, atol=1e-12)
    shifted = rotate_shift(x, torch.zeros(1), torch.tensor([[0.0, 2.0]]))  # reads col + 2
    assert torch.allclose(shifted[..., :6], x[..., 2:], atol=1e-12)
    assert torch.allclose(shifted[..., 6:], x[..., 7:].expand(-1, -1, -1, 2), atol=1e-12)


def test_keras_augmentation_is_deterministic_and_bounded():
    x = torch.rand(64, 3, 12, 12)
    a = random_rotate_shift_flip(x, torch.Generator().manual_seed(1))
    b = random_rotate_shift_flip(x, torch.Generator().manual_seed(1))
    c = random_rotate_shift_flip(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1  # bilinear within the pixel box
    assert torch.equal(x, x.clone())
    none = random_rotate_shift_flip(x, torch.Generator().manual_seed(3), degrees=0, shift=0)
    mirrored = [torch.allclose(o, i.flip(2), atol=1e-6) for o, i in zip(none, x, strict=True)]
    same = [torch.allclose(o, i, atol=1e-6) for o, i in zip(none, x, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert 16 < sum(mirrored) < 48  # flips with probability 1/2


def test_weight_decay_targets():
    model = create_model("cifar-cnn8", num_classes=10, in_channels=3)
    fc256 = [m for m in model.modules() if isinstance(m, nn.Linear)][0]
    assert fc256.out_features == 256
    assert decayed_weights(model, "hidden-linear") == {fc256.weight}
    kernels = decayed_weights(model, "kernels")
    expected = {m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert kernels == expected and len(kernels) == 8  # 6 convolutions, 2 linear layers
    assert decayed_weights(model, "all") == set(model.parameters())


def test_kernel_weight_decay_equals_the_keras_l2_loss_term():
    """SGD with weight decay 4e-3 on the kernels only == plain SGD on loss + 2e-3 sum w^2."""
    torch.manual_seed(0)
    ours = create_model("mnist-cnn", num_classes=10, in_channels=1)
    keras = create_model("mnist-cnn", num_classes=10, in_channels=1)
    keras.load_state_dict(ours.state_dict())
    config = Config(optimizer="sgd", lr=0.1, weight_decay=4e-3, weight_decay_on="kernels")
    opt_ours = create_optimizer(config, ours)
    opt_keras = torch.optim.SGD(keras.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        for model, opt, l2 in ((ours, opt_ours, 0.0), (keras, opt_keras, 2e-3)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            penalty = sum((w**2).sum() for w in decayed_weights(model, "kernels"))
            (loss + l2 * penalty).backward()
            opt.step()
    for a, b in zip(ours.parameters(), keras.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_per_iteration_lr_decay_with_the_epoch_drops():
    config = resolve("cifar10-wrn-paper", overrides={"data_dir": "unused"})
    param = nn.Parameter(torch.zeros(1))
    tr = SimpleNamespace(config=config, optimizer=torch.optim.SGD([param], lr=1.0))
    for epoch, iteration, expected in ((0, 0, 0.01), (0, 390, 0.01 / 1.039), (59, 23010, None)):
        set_lr(tr, epoch, iteration)
        if expected is None:  # after the drop at 0-based epoch 59: lr / 10, still decayed
            expected = 0.001 / (1 + 1e-4 * 23010)
        assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)


def test_cifar_presets_match_the_official_code():
    cnn = resolve("cifar10-cnn-paper", overrides={"data_dir": "unused"})
    wrn = resolve("cifar10-wrn-paper", overrides={"data_dir": "unused"})
    for c in (cnn, wrn):
        assert (c.optimizer, c.lr, c.momentum, c.lr_decay) == ("sgd", 0.01, 0.9, 1e-4)
        assert (c.augment, c.augment_style, c.lr_milestones) == (True, "keras", [59, 99])
    assert (cnn.weight_decay, cnn.weight_decay_on) == (0.02, "hidden-linear")
    assert (wrn.weight_decay, wrn.weight_decay_on) == (4e-3, "kernels")


def test_later_options_at_their_neutral_values_keep_earlier_hashes():
    """The default configuration of before issue 18 (final test on all digits with PGD only)
    keeps the hash every run trained before these options existed recorded."""
    before = dict(final_eval_n=0, test_attack="none", test_targets=9)
    assert Config(**before).hash() == "38ff6136387fa2cd"
    for change in (dict(lr_decay=1e-4), dict(weight_decay_on="kernels")):
        assert Config(**before, **change).hash() != Config(**before).hash()
    assert Config(**before, augment_style="keras").hash() != Config(**before).hash()
    assert Config().hash() != Config(**before).hash()  # today's default reports APGD


@pytest.mark.parametrize(
    "bad", [dict(weight_decay_on="bias"), dict(augment_style="autoaugment"), dict(lr_decay=-1.0)]
)
def test_bad_new_options_are_user_errors(bad):
    with pytest.raises(UserError):
        resolve(overrides=bad)


def _write_synthetic_cifar(root, n: int = 8) -> None:
    """CIFAR-10 binary batches of random pixels: a label byte, then 3 x 32 x 32 bytes."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = np.concatenate(
            [rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3 * 32 * 32))], axis=1
        )
        (root / name).write_bytes(records.astype(np.uint8).tobytes())


def test_cifar_preset_trains_with_keras_decay_augmentation_and_l2(tmp_path):
    """The preset end to end on synthetic files: the logged learning rate is the last
    iteration's lr / (1 + 1e-4 iteration), and only the 256-unit layer is decayed."""
    import json

    from fosctrain import train as train_mod

    _write_synthetic_cifar(tmp_path / "cifar")
    tiny = dict(epochs=2, train_n=32, val_n=8, batch_size=8, final_eval_n=8, steps=2)
    config = resolve(
        "cifar10-cnn-paper", overrides={"data_dir": str(tmp_path / "cifar"), **tiny, "threads": 1}
    )
    train_mod.train(config, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["lr"] for r in rows] == pytest.approx([0.01 / (1 + 1e-4 * i) for i in (3, 7)])
    optimizer = create_optimizer(config, create_model("cifar-cnn8", num_classes=10))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.02, 0.0]
    assert [p.shape for p in optimizer.param_groups[0]["params"]] == [(256, 196 * 4 * 4)]
