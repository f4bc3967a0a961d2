"""Lay a batch out per key: ``[B, ...]`` (any key order) <-> ``[K, n_max, ...]`` (padded, masked).

Samples keep their batch order inside each key's row, so per-sample noise drawn in batch order
lands on the same sample whatever the granularity.
"""
from __future__ import annotations

import torch
from torch import Tensor


class Grouping:
    def __init__(self, key_idx: Tensor, num_keys: int):
        b = key_idx.numel()
        self.batch = b
        if num_keys == 1 and b:  # unified: the layout follows from the batch size alone (no counting)
            self.active, self.k, self.n_max = [0], 1, b
            self.counts = torch.tensor([float(b)])
        else:
            counts_all = torch.bincount(key_idx, minlength=num_keys)
            active = torch.nonzero(counts_all).squeeze(1)
            self.active = active.tolist()
            self.k = len(self.active)
            counts = counts_all[active]
            self.n_max = int(counts.max()) if self.k else 0
            self.counts = counts.to(torch.float32)
        if self.k == 1:
            # One key (always the case for unified): the layout is the batch itself.
            self.flat_pos = None
            self.mask = torch.ones(1, b, device=key_idx.device)
            return
        local = torch.full((num_keys,), -1, dtype=torch.long, device=key_idx.device)
        local[active] = torch.arange(self.k, device=key_idx.device)
        kl = local[key_idx]
        order = torch.argsort(kl, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        kl_sorted = kl[order]
        pos_sorted = torch.arange(b, device=key_idx.device) - starts[kl_sorted]
        flat_pos = torch.empty_like(key_idx)
        flat_pos[order] = kl_sorted * self.n_max + pos_sorted
        self.flat_pos = flat_pos
        self.mask = torch.zeros(self.k * self.n_max, device=key_idx.device).index_fill_(0, flat_pos, 1.0)
        self.mask = self.mask.view(self.k, self.n_max)

    def to(self, device: torch.device) -> "Grouping":
        """Move the layout's index tensors (computed on the host from host labels) to ``device``;
        a copy to the device, never a wait for it."""
        if self.flat_pos is not None:
            self.flat_pos = self.flat_pos.to(device, non_blocking=True)
        self.mask = self.mask.to(device, non_blocking=True)
        self.counts = self.counts.to(device, non_blocking=True)
        return self

    def pad(self, t: Tensor) -> Tensor:
        """[B, ...] -> [K, n_max, ...] (zeros where a key has fewer samples)."""
        if self.flat_pos is None:
            return t.unsqueeze(0)
        out = t.new_zeros((self.k * self.n_max,) + tuple(t.shape[1:]))
        out = out.index_copy(0, self.flat_pos, t)
        return out.view((self.k, self.n_max) + tuple(t.shape[1:]))

    def unpad(self, t: Tensor) -> Tensor:
        """[K, n_max, ...] -> [B, ...] in the original batch order."""
        if self.flat_pos is None:
            return t.squeeze(0)
        return t.reshape((self.k * self.n_max,) + tuple(t.shape[2:]))[self.flat_pos]

    def masked_mean(self, per_sample: Tensor) -> Tensor:
        """Per-key mean over that key's real samples: [K, n_max] -> [K]."""
        # (Always multiplied, even by an all-ones mask: the product's backward hands the layers
        # a materialised gradient; an expanded one takes other matmul/reduction paths, other bits.)
        return (per_sample * self.mask).sum(1) / self.counts
