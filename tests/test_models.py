"""Architectures in pqnet.models: parameter counts, output shapes, name lookup."""

import pytest
import torch

from pqnet import models


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_param_counts_match_the_papers():
    assert n_params(models.mlp()) == 266_610
    assert n_params(models.lenet5()) == 61_706
    assert n_params(models.resnet20()) == 272_474
    assert n_params(models.vgg16()) == 14_724_042
    assert n_params(models.digits_cnn()) == 38_282
    # patch embedding 49*64+64, class token 64, positions 17*64, 4 blocks of (2 LayerNorms,
    # qkv 64*192+192, proj 64*64+64, MLP 64*128+128 + 128*64+64), final LayerNorm, head 64*10+10
    block = 2 * 128 + 12_480 + 4_160 + 8_320 + 8_256
    assert n_params(models.vit_tiny()) == 3_200 + 64 + 1_088 + 4 * block + 128 + 650 == 139_018


@pytest.mark.parametrize(
    "name, shape",
    [
        ("mlp", (4, 1, 28, 28)),
        ("lenet5", (4, 1, 28, 28)),
        ("digits_cnn", (4, 1, 8, 8)),
        ("vgg16", (2, 3, 32, 32)),
        ("resnet20", (2, 3, 32, 32)),
        ("vit_tiny", (3, 1, 28, 28)),
    ],
)
def test_output_shape(name, shape):
    model = models.get(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name, weights", [
    ("mlp", ["fc1.weight", "fc2.weight", "fc3.weight"]),
    ("lenet5", ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]),
    ("digits_cnn", ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]),
    ("vgg16", [f"conv{i}.weight" for i in range(1, 14)] + ["fc.weight"]),
    ("resnet20", ["conv1.weight"] + [f"stage{s}_block{b}.conv{c}.weight" for s in (1, 2, 3)
                                     for b in (1, 2, 3) for c in (1, 2)]
     + [f"stage{s}_block1.shortcut.0.weight" for s in (2, 3)] + ["fc.weight"]),
])
def test_layers_are_named(name, weights):
    names = [k for k, p in models.get(name).named_parameters() if p.dim() > 1]
    assert sorted(names) == sorted(weights)


def test_digits_cnn_batchnorm_layers_are_named():
    names = {k for k, _ in models.digits_cnn(batchnorm=True).named_modules()}
    assert {"bn1", "bn2", "conv1", "fc2"} <= names


def test_registry_holds_every_factory():
    assert set(models.MODELS) == {"mlp", "lenet5", "vgg16", "resnet20", "digits_cnn",
                                   "vit_tiny"}
    assert isinstance(models.get("lenet5"), torch.nn.Sequential)


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"^model: unknown model 'nope'; expected one of mlp"):
        models.get("nope")


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_bad_num_classes(name, bad):
    with pytest.raises(ValueError, match=r"^num_classes:"):
        models.get(name, num_classes=bad)


def test_vit_tiny_checks_its_geometry():
    with pytest.raises(ValueError, match=r"^patch: 5 does not divide the image size 28"):
        models.vit_tiny(patch=5)
    with pytest.raises(ValueError, match=r"^heads: 3 does not divide dim 64"):
        models.vit_tiny(heads=3)
