"""A node's visit reads the device once (issue 16): no host synchronisation inside a step.

The steps keep their per-key losses and the non-finite flag on the store's device (store/steps.Visit);
the fused Adam(W) kernel reads the flag and skips the update on the device. These tests hold:
- no value of a floating or boolean tensor is read on the host inside the steps, and a visit's reads
  do not grow with its steps (counted at torch's dispatcher on the CPU; tests/test_cuda.py checks
  the same with torch.cuda.set_sync_debug_mode("error") where CUDA exists);
- a visit's mean losses are exactly the old per-step Python-float means;
- a non-finite loss or gradient at step i of a visit leaves the store exactly as a twin trained on
  steps 1..i-1 (nothing of step i or later lands), and the error names keys, check, step and round.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from feda2v.errors import NonFiniteLossError
from feda2v.store import GeneratorStore, StoreSpec, kinds

CLASSES = ["a", "b", "c", "d"]
D, C, Z, H = 6, 4, 3, 8
aten = torch.ops.aten
# The dispatcher ops that read a tensor's value on the host (on CUDA each one waits for the device).
_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default, aten.equal.default,
          aten.item.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
          aten._unique.default}


class HostReads(TorchDispatchMode):
    """Counts host reads of floating or boolean tensors: the values a step computes (losses,
    finiteness). Integer reads are the host-side batch layout of host labels (store/grouping.py),
    which are host tensors on every device and cost no sync."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self._tolist = None

    def _count(self, what: str, t: torch.Tensor) -> None:
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            self.calls.append(f"{what}({t.dtype})")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS and isinstance(args[0], torch.Tensor):
            self._count(str(func), args[0])
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        # Tensor.tolist reads a CPU tensor's memory without a dispatcher call: count it here.
        self._tolist, counter = torch.Tensor.tolist, self

        def tolist(t):
            counter._count("tolist", t)
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def make_store(type_="cvae", granularity="per_class", **kw) -> GeneratorStore:
    args = dict(type=type_, granularity=granularity, classes=CLASSES, feature_dim=D, condition_dim=C,
                latent_dim=Z, hidden_dim=H, class_groups={"low": ["a", "b"], "high": ["c", "d"]},
                beta_warmup_steps=4, seed=7)
    args.update(kw)
    return GeneratorStore(StoreSpec(**args), torch.randn(len(CLASSES), C, generator=torch.Generator().manual_seed(1)))


def batch(i: int, classes=(0, 1, 2, 3), n: int = 12):
    g = torch.Generator().manual_seed(100 + i)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    y[: len(classes)] = torch.tensor(classes)
    return torch.randn(n, D, generator=g) + y.unsqueeze(1).float(), y


# Batches alternate between all keys and a subset, so both layouts (all active / some) are read.
def classes_of(i: int):
    return (0, 1, 2, 3) if i % 2 == 0 else (1, 2)


KINDS = [("cvae", {}), ("gan", {"schedule": "alternating", "d_steps": 2, "r1_gamma": 1.0}),
         ("gan", {"schedule": "simultaneous"})]


@pytest.mark.parametrize("type_, gan", KINDS)
@pytest.mark.parametrize("granularity", ["unified", "per_class"])
def test_no_host_read_inside_the_steps_and_one_per_visit(type_, gan, granularity):
    s = make_store(type_, granularity, **({"gan": gan} if gan else {}))
    noise = torch.Generator().manual_seed(0)
    per_visit = {}
    for n in (2, 6):
        v = s.visit(node="n", round=0)
        with HostReads() as inside:
            for i in range(n):
                v.step(*batch(i, classes_of(i)), gen=noise)
        with HostReads() as at_end:
            v.finish()
        per_visit[n] = (inside.calls, at_end.calls)
    assert per_visit[2][0] == [] and per_visit[6][0] == [], per_visit
    assert per_visit[2][1] == per_visit[6][1] and len(per_visit[6][1]) == 1, per_visit  # one read-back


# The published multimodal VAE (migrated runs) projects each DISTINCT condition as a batch of one, as
# published (models/published.py:_each_distinct_row): torch.unique, a data-dependent shape, reads
# the device every step. Documented in the README ("Host syncs"); every other architecture reads none.
SYNCING_ARCHS = {("cvae", "fedgfe_multimodal")}


@pytest.mark.parametrize("type_, arch", [(k.name, a) for k in kinds.KINDS.values() for a in k.archs])
def test_every_architecture_steps_without_a_host_read(type_, arch):
    s = make_store(type_, "per_class", arch=arch)
    v = s.visit(node="n", round=0)
    with HostReads() as inside:
        for i in range(3):
            v.step(*batch(i, classes_of(i)), gen=torch.Generator().manual_seed(i))
    v.finish()
    if (type_, arch) in SYNCING_ARCHS:
        assert inside.calls and set(inside.calls) == {"aten.unique_dim.default(torch.float32)"}
    else:
        assert inside.calls == []


def test_the_counter_sees_the_reads_of_a_step_that_syncs():
    """The harness is not blind: a one-step visit per batch (train_batch) reads once per step."""
    s = make_store()
    counts = []
    for n in (2, 4):
        with HostReads() as reads:
            for i in range(n):
                s.train_batch(*batch(i), gen=torch.Generator().manual_seed(i), node="n", round=0)
        counts.append(len(reads.calls))
    assert counts == [2, 4]
    with HostReads() as reads:
        bool(torch.isfinite(torch.ones(3)).all())
        torch.nonzero(torch.tensor([0.0, 1.0]))
    assert len(reads.calls) == 2


def test_a_nodes_visit_reads_the_device_once_whatever_its_length():
    from types import SimpleNamespace

    from feda2v.federation.node import train_generators

    s = make_store()
    g = torch.Generator().manual_seed(5)
    y = torch.arange(40) % 4
    data = SimpleNamespace(node_id=1, train_x=torch.randn(40, D, generator=g) + y.unsqueeze(1).float(), train_y=y)
    reads = []
    for epochs in (1, 3):
        with HostReads() as r:
            res = train_generators(s, data, classes=CLASSES, seed=0, round_=epochs, local_epochs=epochs,
                                   batch_size=8, reset_on_change="never")
        assert res.steps == 5 * epochs
        reads.append(r.calls)
    assert reads[0] == reads[1] and len(reads[0]) == 1, reads


@pytest.mark.parametrize("type_", ["cvae", "gan"])
def test_visit_means_are_the_per_step_python_float_means(type_):
    s = make_store(type_)
    twin = copy.deepcopy(s)
    v = s.visit(node="n", round=0)
    sums, steps = {}, {}
    for i in range(7):
        x, y = batch(i, classes_of(i))
        v.step(x, y, gen=torch.Generator().manual_seed(i))
        for key, metrics in twin.train_batch(x, y, gen=torch.Generator().manual_seed(i), node="n", round=0).items():
            steps[key] = steps.get(key, 0) + 1
            for m, val in metrics.items():
                sums.setdefault(key, {}).setdefault(m, 0.0)
                sums[key][m] += float(val)
    want = {k: {m: val / steps[k] for m, val in ms.items()} for k, ms in sums.items()}
    got = v.finish()
    assert got == want and list(got) == list(want)  # exactly, in the same key order
    assert all(torch.equal(a, b) for a, b in zip(s.state_dict()[0].values(), twin.state_dict()[0].values()))


def _poison(x, y, cls):
    x = x.clone()
    x[y == cls] = float("nan")
    return x


@pytest.mark.parametrize("type_, gan", KINDS)
def test_a_non_finite_step_lands_nothing_from_that_step_on(type_, gan):
    """Step 3 of 5 is non-finite for key 'class/b': the store ends the visit exactly as a twin that
    trained steps 1-2 only (later, finite steps are vetoed too), with no optimizer state on a key
    whose first update was vetoed, and the error names the key, the check, the step and the round."""
    s = make_store(type_, "per_class", **({"gan": gan} if gan else {}))
    s.train_batch(*batch(90, (0, 1)), gen=torch.Generator().manual_seed(90), node="n0", round=0)
    twin = copy.deepcopy(s)
    steps = [batch(i, (0, 1, 2)) for i in range(5)]  # class/c and class/d: never stepped before
    steps[2] = (_poison(*steps[2], 1), steps[2][1])
    for x, y in steps[:2]:
        twin.train_batch(x, y, gen=torch.Generator().manual_seed(int(y.sum())), node="n", round=4)
    v = s.visit(node="node/003", round=4)
    for x, y in steps:
        v.step(x, y, gen=torch.Generator().manual_seed(int(y.sum())))
    with pytest.raises(NonFiniteLossError) as ei:
        v.finish()
    e = ei.value
    what = "loss" if type_ == "cvae" or gan["schedule"] == "simultaneous" else "discriminator loss"
    assert (e.keys, e.key, e.node, e.round, e.step) == (["class/b"], "class/b", "node/003", 4, 3)
    assert str(e).startswith(f"non-finite {what} for generator key 'class/b' on node node/003 in round 4 "
                             "(step 3 of 5 of the visit)")
    ts, tm = s.state_dict()
    ws, wm = twin.state_dict()
    assert tm["optimizers"] == wm["optimizers"] and sorted(ts) == sorted(ws)
    assert all(torch.equal(ts[n], ws[n]) for n in ts), [n for n in ts if not torch.equal(ts[n], ws[n])]
    assert len(s.optimizer("class/d").state) == 0


def test_a_non_finite_gradient_with_finite_losses_is_vetoed_too():
    from test_store import _NanGradLayer

    s = make_store("cvae", "unified")
    s.train_batch(*batch(0), gen=torch.Generator().manual_seed(0), node="n", round=0)
    before = {n: t.clone() for n, t in s.state_dict()[0].items()}
    s.module("unified").encoder[1] = _NanGradLayer()  # forward unchanged, backward NaN
    v = s.visit(node="n", round=1)
    for i in range(3):
        v.step(*batch(i), gen=torch.Generator().manual_seed(i))
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient for generator key 'unified' .* \(step 1 of 3"):
        v.finish()
    assert all(torch.equal(before[n], t) for n, t in s.state_dict()[0].items())


def test_every_flagged_key_is_named():
    s = make_store()
    x, y = batch(0)
    x = _poison(_poison(x, y, 1), y, 3)
    with pytest.raises(NonFiniteLossError, match=r"generator keys 'class/b', 'class/d' on node n in round 2;") as ei:
        s.train_batch(x, y, gen=torch.Generator().manual_seed(0), node="n", round=2)
    assert ei.value.keys == ["class/b", "class/d"]


def test_a_visit_is_finished_once():
    s = make_store()
    v = s.visit(node="n", round=0)
    assert v.finish() == {}
    with pytest.raises(RuntimeError):
        v.step(*batch(0), gen=torch.Generator())
    with pytest.raises(RuntimeError):
        v.finish()


def _checked_visit(k_active=3):
    s = make_store("cvae", "per_class")
    v = s.visit(node="n", round=1)
    v.begin_step(list(range(k_active)))
    return v


def test_one_check_over_groups_names_only_the_first_failing_groups_keys():
    """Visit.check over (loss, gradients) gives the verdict of checking them one after the other:
    a key non-finite in an earlier group is named with that group's check; a key non-finite only
    in a later group is not named while an earlier group failed, and is when none did."""
    nan = float("nan")
    v = _checked_visit()
    v.check(("loss", torch.tensor([0.0, nan, 1.0])), ("gradient", torch.tensor([[1.0, 2.0], [0.0, 0.0], [nan, 1.0]])))
    v.end_step(torch.zeros(3, 4))
    with pytest.raises(NonFiniteLossError) as ei:
        v.finish()
    assert ei.value.keys == ["class/b"] and str(ei.value).startswith("non-finite loss for generator key 'class/b' ")

    v = _checked_visit()
    v.check(("loss", torch.tensor([0.0, 1.0, 1.0])), ("gradient", torch.tensor([[1.0, 2.0], [0.0, float("inf")], [nan, 1.0]])))
    v.end_step(torch.zeros(3, 4))
    with pytest.raises(NonFiniteLossError) as ei:
        v.finish()
    assert ei.value.keys == ["class/b", "class/c"] and str(ei.value).startswith("non-finite gradient for generator keys")


def test_a_later_failure_in_the_visit_names_nothing_new_and_the_first_step_is_reported():
    nan = float("nan")
    v = _checked_visit()
    fine = ("generator loss", torch.zeros(3)), ("gradient", torch.zeros(3, 2))
    for step in range(4):
        if step == 2:
            v.check(("discriminator loss", torch.tensor([nan, 0.0, 0.0])), ("gradient", torch.zeros(3, 2)))
        elif step == 3:
            v.check(("discriminator loss", torch.tensor([0.0, 0.0, nan])), ("gradient", torch.zeros(3, 2)))
        v.check(*fine)
        assert float(v.found_inf) == (1.0 if step >= 2 else 0.0)
        v.end_step(torch.zeros(3, 4))
    with pytest.raises(NonFiniteLossError) as ei:
        v.finish()
    assert (ei.value.keys, ei.value.step) == (["class/a"], 3)
    assert str(ei.value).startswith("non-finite discriminator loss for generator key 'class/a' on node n in round 1 "
                                    "(step 3 of 4 of the visit)")
