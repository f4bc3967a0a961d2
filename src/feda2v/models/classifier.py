"""The node's adapter/classifier (full mode): embedding -> class logits, trained with FedAvg."""
from __future__ import annotations

import torch
from torch import nn

from feda2v.seeding import derive_seed


class Classifier(nn.Module):
    def __init__(self, feature_dim: int, num_classes: int, hidden_dim: int = 128):
        super().__init__()
        self.kwargs = {"feature_dim": feature_dim, "num_classes": num_classes, "hidden_dim": hidden_dim}
        self.net = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def init_seeded(self, *parts: object) -> "Classifier":
        """Deterministic init that does not touch the global RNG."""
        gen = torch.Generator().manual_seed(derive_seed(*parts))
        for m in self.net:
            if isinstance(m, nn.Linear):
                bound = 1.0 / m.in_features**0.5
                m.weight.uniform_(-bound, bound, generator=gen)
                m.bias.uniform_(-bound, bound, generator=gen)
        return self
