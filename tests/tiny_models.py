"""Small architectures for tests, loaded the way a user's own file is: ``--arch tests/tiny_models.py:NAME``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyCNN(nn.Module):
    """conv-ReLU-pool-conv-ReLU-linear: every layer kind the atlas handles, in 16x16 inputs."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=1, padding=0)
        self.fc = nn.Linear(5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_cnn(num_classes: int = 3) -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN(num_classes)


class SlowTinyCNN(TinyCNN):
    """TinyCNN that sleeps in every forward: gives a test time to kill a build mid-pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(0.15)
        return super().forward(x)


def slow_tiny_cnn(num_classes: int = 3) -> SlowTinyCNN:
    torch.manual_seed(0)
    return SlowTinyCNN(num_classes)


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
