"""Small models the CLI tests load through `--model toy_models:factory`."""

import torch
from torch import nn


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 16))


def not_a_model():
    return 42
