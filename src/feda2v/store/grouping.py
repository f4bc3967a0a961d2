"""Lay a batch out per key: ``[B, ...]`` (any key order) <-> ``[K, n_max, ...]`` (padded, masked).

Samples keep their batch order inside each key's row, so per-sample noise drawn in batch order
lands on the same sample whatever the granularity.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class Grouping:
    def __init__(self, key_idx: Tensor, num_keys: int):
        b = key_idx.numel()
        self.batch = b
        if num_keys == 1 and b:  # unified: the layout follows from the batch size alone (no counting)
            self.active, self.k, self.n_max = [0], 1, b
            self.counts = torch.tensor([float(b)])
            self.flat_pos = None
            self.mask = torch.ones(1, b, device=key_idx.device)
            return
        # The layout is integer bookkeeping of host labels: numpy does it at ~1 us an operation,
        # where ~25 tiny torch operations cost ~4 us each (a per_class step's whole layout ~100 us).
        ki = key_idx.cpu().numpy()
        counts_all = np.bincount(ki, minlength=num_keys)
        active = np.flatnonzero(counts_all)
        self.active = active.tolist()
        self.k = len(self.active)
        counts = counts_all[active]
        self.n_max = int(counts.max()) if self.k else 0
        self.counts = torch.from_numpy(counts.astype(np.float32))
        if self.k == 1:
            # One key: the layout is the batch itself.
            self.flat_pos = None
            self.mask = torch.ones(1, b)
            return
        local = np.full(num_keys, -1, dtype=np.int64)
        local[active] = np.arange(self.k)
        kl = local[ki]
        order = np.argsort(kl, kind="stable")
        starts = np.cumsum(counts) - counts
        kl_sorted = kl[order]
        flat_pos = np.empty(b, dtype=np.int64)
        flat_pos[order] = kl_sorted * self.n_max + (np.arange(b) - starts[kl_sorted])
        mask = np.zeros(self.k * self.n_max, dtype=np.float32)
        mask[flat_pos] = 1.0
        self.flat_pos = torch.from_numpy(flat_pos)
        self.mask = torch.from_numpy(mask).view(self.k, self.n_max)

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
        out.index_copy_(0, self.flat_pos, t)  # in place: the out-of-place form copies the zeros first
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
