"""Small architectures for tests, loaded the way a user's own file is: ``--arch tests/tiny_models.py:NAME``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyCNN(nn.Module):
    """conv-ReLU-pool-conv-ReLU-linear: every layer kind the atlas handles, in 16x16 inputs."""

    def __init__(self, num_classes: int = 3, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 5, 3, stride=1, padding=0)
        self.fc = nn.Linear(5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_cnn(num_classes: int = 3) -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN(num_classes)


def wide_tiny_cnn(num_classes: int = 3) -> TinyCNN:
    """TinyCNN with 6 channels in conv1 instead of 4: a checkpoint that does not fit tiny_cnn."""
    torch.manual_seed(0)
    return TinyCNN(num_classes, width=6)


class SlowTinyCNN(TinyCNN):
    """TinyCNN that sleeps in every forward: gives a test time to kill a build mid-pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(0.15)
        return super().forward(x)


def slow_tiny_cnn(num_classes: int = 3) -> SlowTinyCNN:
    torch.manual_seed(0)
    return SlowTinyCNN(num_classes)


class SmoothCNN(nn.Module):
    """SiLU, GELU and Hardswish (the activations of EfficientNet, ConvNeXt, MobileNetV3) on 16x16
    inputs; ``unruled=True`` puts a softplus (no attribution rule) before conv3."""

    def __init__(self, num_classes: int = 3, unruled: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.SiLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.act3 = nn.Hardswish()
        self.fc = nn.Linear(8, num_classes)
        self.unruled = unruled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.pool(F.gelu(self.conv2(x)))
        x = F.softplus(x) if self.unruled else x
        x = self.act3(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def smooth_cnn(num_classes: int = 3) -> SmoothCNN:
    torch.manual_seed(0)
    return SmoothCNN(num_classes)


def smooth_cnn_softplus(num_classes: int = 3) -> SmoothCNN:
    torch.manual_seed(0)
    return SmoothCNN(num_classes, unruled=True)


def _double_backward(ctx, g: torch.Tensor) -> torch.Tensor:
    return 2 * g


# A custom autograd.Function whose class name is markup: its name reaches the pages and must be escaped.
MarkupFunction = type("<b>Evil</b>", (torch.autograd.Function,), {
    "forward": staticmethod(lambda ctx, x: 2 * x), "backward": staticmethod(_double_backward)})


class MarkupCNN(TinyCNN):
    """TinyCNN with a custom autograd.Function (no attribution rule) between its convolutions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(MarkupFunction.apply(F.relu(self.conv1(x))))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def markup_cnn(num_classes: int = 3) -> MarkupCNN:
    torch.manual_seed(0)
    return MarkupCNN(num_classes)


class SoftplusBlock(nn.Module):
    """A residual block (conv, activation, conv, add) whose activation is a softplus (no attribution
    rule) when ``soft``, a SiLU otherwise."""

    def __init__(self, channels: int, soft: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.shortcut = nn.Identity()
        self.soft = soft

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = F.softplus(h) if self.soft else F.silu(h)
        return F.silu(self.conv2(h) + self.shortcut(x))


class SoftplusResNet(nn.Module):
    """A stem and one residual stage of two blocks on 16x16 inputs; the second block has a softplus."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(SoftplusBlock(4, soft=False), SoftplusBlock(4, soft=True))
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(F.relu(self.conv1(x))).mean(dim=(2, 3)))


def softplus_resnet(num_classes: int = 3) -> SoftplusResNet:
    torch.manual_seed(0)
    return SoftplusResNet(num_classes)


class TinyBlock(nn.Module):
    """A torchvision-style basic block (two 3×3 convolutions, a shortcut that is the identity or a
    1×1 projection in ``downsample``), a few channels wide."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.downsample = nn.Conv2d(cin, cout, 1, stride=stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(F.relu(self.conv1(x))) + short)


class TinyResNet(nn.Module):
    """Stem, two stages of one block each (the second with a projection shortcut), a classifier:
    residual stages, inner convolutions and a stage boundary in 16×16 inputs."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(TinyBlock(4, 4))
        self.layer2 = nn.Sequential(TinyBlock(4, 6, stride=2))
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_resnet(num_classes: int = 3) -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet(num_classes)


class TwoBlockResNet(nn.Module):
    """Stem and one residual stage of two blocks of one width: a stage page follows a channel across
    two blocks, so "the stage's last block" is not its only one."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(TinyBlock(4, 4), TinyBlock(4, 4))
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(F.relu(self.conv1(x))).mean(dim=(2, 3)))


def two_block_resnet(num_classes: int = 3) -> TwoBlockResNet:
    torch.manual_seed(0)
    return TwoBlockResNet(num_classes)
class TinyGreyCNN(TinyCNN):
    """TinyCNN for grey images: its first convolution reads 1 channel (MNIST-style, medical, documents)."""

    def __init__(self, num_classes: int = 3):
        super().__init__(num_classes)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)


def tiny_grey_cnn(num_classes: int = 3) -> TinyGreyCNN:
    torch.manual_seed(0)
    return TinyGreyCNN(num_classes)


class TinyRGBACNN(TinyCNN):
    """TinyCNN whose first convolution reads 4 channels (RGBA), which sitegen refuses."""

    def __init__(self, num_classes: int = 3):
        super().__init__(num_classes)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)


def tiny_rgba_cnn(num_classes: int = 3) -> TinyRGBACNN:
    torch.manual_seed(0)
    return TinyRGBACNN(num_classes)


class PoolFreeCNN(nn.Module):
    """conv-ReLU-conv-ReLU-conv with no pooling: deconvnet's backward never reads the forward here,
    so its pictures are provably the same for every image."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = self.conv3(x).relu()
        return self.fc(x.mean(dim=(2, 3)))


def pool_free_cnn(num_classes: int = 3) -> PoolFreeCNN:
    torch.manual_seed(0)
    model = PoolFreeCNN(num_classes)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as after training
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model


class LinearCNN(nn.Module):
    """Convolutions, BatchNorm, average pooling and a linear layer, no nonlinearity at all: every
    method's picture is the same for every image."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.pool(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def linear_cnn(num_classes: int = 3) -> LinearCNN:
    torch.manual_seed(0)
    return LinearCNN(num_classes)


def randomise_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every BatchNorm2d's statistics and affine parameters away from the identity, as in a trained
    model (fresh ones are the identity map, which would hide a wrong BatchNorm computation); the
    model in eval mode with its parameters frozen."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
