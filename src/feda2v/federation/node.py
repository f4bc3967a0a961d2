"""A node's local work: train the generator key(s) it is lent, and (full mode) its classifier."""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from feda2v.seeding import torch_generator


@dataclass
class NodeResult:
    node: str
    steps: int = 0
    train_seconds: float = 0.0  # time in the generator steps (their calls + the visit's read-back)
    losses: dict = field(default_factory=dict)  # key -> metric -> mean over this node's steps
    samples_per_key: dict = field(default_factory=dict)  # key -> training samples seen per epoch
    resets: list = field(default_factory=list)


def node_name(node_id: int) -> str:
    return f"node/{node_id:03d}"


def train_generators(store, data, *, classes: list[str], seed: int, round_: int, local_epochs: int,
                     batch_size: int, reset_on_change: str,
                     on_step: Optional[Callable[[], None]] = None) -> NodeResult:
    """Train ``store`` on one node's data: ``local_epochs`` passes of seeded mini-batches.

    The store is used, never copied: in shared mode this is the very object every node trains.
    ``reset_on_change`` is the reset policy (federation.reset_on_class_change; see the store's
    RESET_POLICIES).
    """
    name = node_name(data.node_id)
    result = NodeResult(node=name)
    x, y = data.train_x, data.train_y
    if len(y) == 0:
        return result
    present = sorted(set(y.tolist()))
    by_key: dict[str, list[str]] = defaultdict(list)
    for c in present:
        by_key[store.key_for_class(classes[c])].append(classes[c])
    for key, key_classes in by_key.items():
        event = store.observe_classes(key, key_classes, node=name, round=round_, policy=reset_on_change)
        if event is not None:
            result.resets.append(event)
    counts = torch.bincount(y, minlength=len(classes)).tolist()
    for key, key_classes in by_key.items():
        result.samples_per_key[key] = sum(counts[classes.index(c)] for c in key_classes)

    noise = torch_generator(seed, "noise", round_, name)
    # The visit keeps the losses and the non-finite flag on the store's device: no step waits for
    # the device; finish() reads them back once (see store/steps.Visit).
    visit = store.visit(node=name, round=round_)
    # The features go to the store's device once per visit; the labels stay on the host, where the
    # store lays each batch out (see GeneratorStore._check_batch). Shuffles are drawn on the host.
    # (non_blocking: a copy to the device never waits for the device; finish() is the one wait)
    x = x.to(store.device, non_blocking=True)
    for epoch in range(local_epochs):
        order = torch.randperm(len(y), generator=torch_generator(seed, "shuffle", round_, name, epoch))
        order_dev = order.to(store.device, non_blocking=True)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            t0 = time.perf_counter()
            visit.step(x[order_dev[start:start + batch_size]], y[idx], gen=noise)
            result.train_seconds += time.perf_counter() - t0
            result.steps += 1
            if on_step is not None:
                on_step()
    t0 = time.perf_counter()
    result.losses = visit.finish()  # waits for the queued steps: their device time counts here
    result.train_seconds += time.perf_counter() - t0
    return result


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, epochs: int,
                     batch_size: int, gen: torch.Generator) -> float:
    """Plain supervised training (full mode) on the model's device (the data goes there once);
    returns the mean loss of the last epoch."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    last = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen).to(device)
        total, batches = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.detach().double()
            batches += 1
        last = float(total) / max(batches, 1)
    return last


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    device = next(model.parameters()).device
    return float((model(x.to(device)).argmax(dim=1) == y.to(device)).float().mean())
