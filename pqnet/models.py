"""Reference network architectures as plain ``torch.nn.Module`` factories.

These are ordinary deterministic PyTorch models (no Pyro). The Bayesian machinery in
:mod:`pqnet.bnn` converts them into probabilistic models, so every factory here builds the
classic architecture from its paper and nothing more.

========== ============================================= =============== ==========
name       architecture                                  input           parameters
========== ============================================= =============== ==========
mlp        LeNet-300-100 (LeCun et al. 1998)             1x28x28         266,610
lenet5     LeNet-5 (LeCun et al. 1998)                   1x28x28         61,706
vgg16      VGG-16 with BatchNorm (Simonyan & Zisserman)  3x32x32         14,724,042
resnet20   CIFAR ResNet-20 (He et al. 2016)              3x32x32         272,474
digits_cnn small CNN for scikit-learn digits             1x8x8           38,282
vit_tiny   small ViT (Dosovitskiy et al. 2021)           1x28x28         139,018
========== ============================================= =============== ==========

Use :func:`get` to build a model by name, e.g. ``get("lenet5", num_classes=10)``. Every
layer is named (``conv1``, ``fc1``, ...), so parameter names read ``fc1.weight``, not
``7.weight``, in posteriors, quantized networks, reports and ArviZ data.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks

__all__ = ["MODELS", "digits_cnn", "for_data", "get", "lenet5", "mlp", "resnet20", "vgg16",
           "vit_tiny"]

ARCHITECTURE_ATTR = "pqnet_architecture"


def _recorded(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Record on each built module the factory and arguments that built it, so a quantized
    network's file can name its architecture instead of pickling code."""

    @functools.wraps(factory)
    def build(*args: object, **kwargs: object) -> nn.Module:
        bound = inspect.signature(factory).bind(*args, **kwargs)
        bound.apply_defaults()
        net = factory(*args, **kwargs)
        setattr(net, ARCHITECTURE_ATTR, {"name": factory.__name__, "kwargs": bound.arguments})
        return net

    return build


def _named(*layers: tuple[str, nn.Module]) -> nn.Sequential:
    """An ``nn.Sequential`` whose layers carry names (``fc1.weight``, not ``1.weight``)."""
    return nn.Sequential(OrderedDict(layers))


@_recorded
def mlp(num_classes: int = 10, in_features: int = 784) -> nn.Module:
    """LeNet-300-100, the fully connected network of LeCun et al. (1998),
    "Gradient-based learning applied to document recognition".

    Flatten -> Linear(784, 300) -> ReLU -> Linear(300, 100) -> ReLU -> Linear(100, 10);
    266,610 parameters for MNIST.
    """
    _checks.positive_int("num_classes", num_classes)
    _checks.positive_int("in_features", in_features)
    return _named(
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(in_features, 300)),
        ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(300, 100)),
        ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(100, num_classes)),
    )


@_recorded
def lenet5(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """LeNet-5 of LeCun et al. (1998), "Gradient-based learning applied to document
    recognition", with ReLU and max pooling, for 28x28 inputs (the first convolution is
    padded by 2 to give the original 32x32 geometry). 61,706 parameters for MNIST.
    """
    _checks.positive_int("num_classes", num_classes)
    _checks.positive_int("in_channels", in_channels)
    return _named(
        ("conv1", nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 16, kernel_size=5)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(16 * 5 * 5, 120)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(120, 84)),
        ("relu4", nn.ReLU()),
        ("fc3", nn.Linear(84, num_classes)),
    )


# fmt: off
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)
# fmt: on


@_recorded
def vgg16(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """VGG-16 of Simonyan & Zisserman (2015), "Very deep convolutional networks for
    large-scale image recognition", in its common CIFAR form: 3x3 convolutions with
    BatchNorm (Ioffe & Szegedy 2015) and ReLU, five max-pools taking 32x32 down to 1x1,
    and a single Linear(512, num_classes) classifier.
    """
    _checks.positive_int("num_classes", num_classes)
    _checks.positive_int("in_channels", in_channels)
    layers: list[tuple[str, nn.Module]] = []
    channels, conv, pool = in_channels, 0, 0
    for item in _VGG16_CFG:
        if item == "M":
            pool += 1
            layers.append((f"pool{pool}", nn.MaxPool2d(2)))
        else:
            assert isinstance(item, int)
            conv += 1
            layers += [
                (f"conv{conv}", nn.Conv2d(channels, item, kernel_size=3, padding=1, bias=False)),
                (f"bn{conv}", nn.BatchNorm2d(item)),
                (f"relu{conv}", nn.ReLU()),
            ]
            channels = item
    layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(512, num_classes))]
    return _named(*layers)


class BasicBlock(nn.Module):
    """Residual block of He et al. (2016): two 3x3 conv+BN layers and an identity
    shortcut, or a 1x1 conv+BN projection (option B) when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@_recorded
def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-20 for CIFAR from He et al. (2016), "Deep residual learning for image
    recognition", Sec. 4.2: a 3x3 conv with 16 channels, three stages of three
    :class:`BasicBlock` s with 16/32/64 channels (stride 2 at the start of stages 2 and 3),
    global average pooling and Linear(64, num_classes). Shortcuts that change shape use a
    1x1 conv+BN projection (option B). About 0.27M parameters.
    """
    _checks.positive_int("num_classes", num_classes)
    _checks.positive_int("in_channels", in_channels)
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)),
        ("bn1", nn.BatchNorm2d(16)),
        ("relu", nn.ReLU()),
    ]
    in_planes = 16
    for stage, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        for block in range(3):
            layers.append((f"stage{stage}_block{block + 1}",
                           BasicBlock(in_planes, planes, stride if block == 0 else 1)))
            in_planes = planes
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
               ("fc", nn.Linear(64, num_classes))]
    model = _named(*layers)
    for m in model.modules():  # He initialisation, as in the paper
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


@_recorded
def digits_cnn(num_classes: int = 10, batchnorm: bool = False) -> nn.Module:
    """Small CNN for the 1x8x8 scikit-learn digits (Alpaydin & Kaynak 1998, UCI optical
    recognition of handwritten digits): two 3x3 convolutions (16, 32 channels), one
    max-pool to 4x4 and a 64-unit hidden layer; with ``batchnorm`` a BatchNorm after each
    convolution."""
    _checks.positive_int("num_classes", num_classes)
    _checks.flag("batchnorm", batchnorm)

    def norm(name: str, channels: int) -> list[tuple[str, nn.Module]]:
        return [(name, nn.BatchNorm2d(channels))] if batchnorm else []

    return _named(
        ("conv1", nn.Conv2d(1, 16, kernel_size=3, padding=1)),
        *norm("bn1", 16),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 32, kernel_size=3, padding=1)),
        *norm("bn2", 32),
        ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(32 * 4 * 4, 64)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(64, num_classes)),
    )


class Attention(nn.Module):
    """Multi-head self-attention from two ``Linear`` layers (``qkv`` and ``proj``), so that
    :func:`pqnet.bayesian` makes all its weights random."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: {heads} does not divide dim {dim}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer of Dosovitskiy et al. (2021), "An image is worth 16x16 words":
    non-overlapping ``patch x patch`` patches, a linear patch embedding, a class token,
    learned position embeddings, ``depth`` pre-norm blocks and a linear head on the class
    token. Every weight matrix is an ``nn.Linear``."""

    def __init__(self, num_classes: int, image_size: int, in_channels: int, patch: int,
                 dim: int, depth: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"patch: {patch} does not divide the image size {image_size}")
        self.patch = patch
        tokens = (image_size // patch) ** 2
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch
        patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, tokens, C*p*p)
        tokens = self.embed(patches)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


@_recorded
def vit_tiny(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, patch: int = 7,
             dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128) -> nn.Module:
    """A small :class:`ViT` for 28x28 images: 16 patches of 7x7, width 64, 4 blocks of 4
    heads, MLP width 128; 139,018 parameters for MNIST. Its weights are all ``Linear``, so
    it shows the quantizers beyond convolutions."""
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                        ("image_size", image_size), ("patch", patch), ("dim", dim),
                        ("depth", depth), ("heads", heads), ("mlp_dim", mlp_dim)):
        _checks.positive_int(name, value)
    return ViT(num_classes, image_size, in_channels, patch, dim, depth, heads, mlp_dim)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "lenet5": lenet5,
    "vgg16": vgg16,
    "resnet20": resnet20,
    "digits_cnn": digits_cnn,
    "vit_tiny": vit_tiny,
}


def get(name: str, **kwargs: object) -> nn.Module:
    """Build the model registered under ``name`` in :data:`MODELS` with keyword ``kwargs``."""
    try:
        factory = MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"model: unknown model {name!r}; expected one of {', '.join(MODELS)}"
        ) from None
    return factory(**kwargs)


def for_data(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build model ``name`` sized for inputs of shape ``input_shape`` (C, H, W) and
    ``num_classes`` classes: ``in_channels`` (or ``in_features`` for ``mlp``) follow the data."""
    if name == "mlp":
        return get(name, num_classes=num_classes, in_features=math.prod(input_shape))
    if name == "digits_cnn":
        return get(name, num_classes=num_classes)
    return get(name, num_classes=num_classes, in_channels=input_shape[0])
