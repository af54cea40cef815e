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
