"""A problem file for the torchrun CLI test: a small float64 MLP with cross-entropy."""

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
_g = torch.Generator().manual_seed(1)
data = (torch.randn(13, 4, generator=_g, dtype=torch.float64), torch.randint(0, 3, (13,), generator=_g))
loss_fn = nn.CrossEntropyLoss()
