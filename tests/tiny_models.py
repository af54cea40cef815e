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
