"""GeneratorStore: per key, the generator (+ discriminator for GAN), one optimizer per role.

Every (key, role) owns a real module and a real optimizer from the one factory; nobody else keeps
them across steps. ``train_batch`` trains all keys present in a batch in one grouped computation:
the samples are laid out per key ([K, n_max, ...], masked), the active keys' parameters are read
as stacked [K, ...] tensors (each key's Parameters are rows of one per-name "bank", so no copy
when every key is active), the forward runs as batched matmuls, gradients are taken w.r.t. the
stacked tensors, and one fused Adam(W) call (its argument lists built once per active key set)
updates every active key's own Parameters with that key's own optimizer state. Unified is the same path with K = 1.
"""
from __future__ import annotations

import gc
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from feda2v.errors import CheckpointError, ConfigError, DataError
from feda2v.models import build_model, clone_structure, init_parameters
from feda2v.models.functional import StackedParams
from feda2v.profiling.ranges import step_range
from feda2v.seeding import derive_seed
from feda2v.store.grouping import Grouping
from feda2v.store import kinds
from feda2v.store.optim import FusedUpdate, make_optimizer, reset_param_groups, step_tensor
from feda2v.store.spec import StoreSpec
from feda2v.store.steps import DISCRIMINATOR, GENERATOR, Visit

# What ``observe_classes`` does when a key meets a class set (federation.reset_on_class_change):
#   new_classes: reset when the key meets a class it was never trained on (the published rule;
#                the union of trained classes is state); changed: reset when the set differs from
#                the key's previous visit; never.
RESET_POLICIES = ("new_classes", "changed", "never")
_OPTIM_FIELDS = ("exp_avg", "exp_avg_sq", "step")
_UPDATE_CACHE = 32  # fused updates kept per store (distinct (role, active key set) pairs)
_META_FIELDS = ("spec", "keys", "roles", "arch", "optimizers", "trained_classes", "events", "reset_counts")


@dataclass(frozen=True)
class ResetEvent:
    key: str
    node: str
    round: int

    def to_json(self) -> dict:
        return {"key": self.key, "node": self.node, "round": self.round}


def _seeded(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


@contextmanager
def _gc_paused():
    """Building K keys creates ~15 container objects per module and Python's cyclic collector
    re-scans the growing heap every few hundred of them (most of a 500-key build's time): none of
    them is garbage yet, so collection waits until the store is built."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _names(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(f"'{n}'" for n in names[:limit]) + more


def _check_names_and_shapes(what: str, shapes: Mapping[str, tuple], tensors: Mapping[str, Tensor]) -> None:
    """Strict loading: exactly the expected tensor names, each with its expected shape."""
    missing, extra = set(shapes) - set(tensors), set(tensors) - set(shapes)
    if missing:
        raise CheckpointError(f"{what} is missing tensor {_names(missing)}")
    if extra:
        raise CheckpointError(f"{what} has unexpected tensor {_names(extra)}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(f"{what} tensor '{name}' has shape {list(tensors[name].shape)}, "
                                  f"expected {list(shape)}")


def _spec_json(meta: Mapping[str, Any]) -> dict:
    """The meta's spec in the current JSON form (older metas: no arch, class_groups as an object
    whose order the recorded key list restores)."""
    try:
        return StoreSpec.from_json(meta["spec"], key_order=meta.get("keys")).to_json()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"store state: unreadable spec: {e}") from None


def _trained_from_meta(tc: Mapping[str, Any], keys: Sequence[str]) -> tuple[dict, dict]:
    """(last visit, ever trained) per key; an older meta holds only the last visit's list, which is
    then the best known union too."""
    last, ever = {}, {}
    for k in keys:
        v = tc[k]
        if v is None:
            last[k], ever[k] = None, []
        elif isinstance(v, Mapping):
            if set(v) != {"last", "ever"}:
                raise CheckpointError(f"store state trained_classes of '{k}' must hold 'last' and 'ever'")
            last[k], ever[k] = [str(c) for c in v["last"]], sorted(str(c) for c in v["ever"])
        else:
            last[k] = [str(c) for c in v]
            ever[k] = sorted(last[k])
    return last, ever


class GeneratorStore:
    def __init__(self, spec: StoreSpec, conditions: Tensor, *, device: str | torch.device | None = None):
        self.spec = spec
        conditions = torch.as_tensor(conditions)
        want = (len(spec.classes), spec.condition_dim)
        if conditions.dim() != 2 or tuple(conditions.shape) != want:
            raise DataError(f"conditions must be float32 {list(want)} (one row per class), got {list(conditions.shape)}")
        self._conditions = conditions.detach().to(torch.float32).clone()
        self._key_of_class = self._resolve_keys(spec)
        self.keys: list[str] = self._ordered_keys(spec)
        index = {k: i for i, k in enumerate(self.keys)}
        # On the host, always: a batch's layout (which keys, how many samples each) decides tensor
        # shapes, so it is computed from host labels and only its index tensors go to the device.
        self._class_key_idx = torch.tensor([index[self._key_of_class[c]] for c in spec.classes], dtype=torch.long)
        self._kind = kinds.kind(spec.type)
        self._kind.arch(spec.arch)  # an unknown variant is refused before anything is built
        self.roles: tuple[str, ...] = self._kind.roles
        self._modules: dict[tuple[str, str], nn.Module] = {}
        self._optims: dict[tuple[str, str], torch.optim.Optimizer] = {}
        # (name, Parameter) per (key, role): the Parameter objects never change (resets are in place).
        self._params: dict[tuple[str, str], list[tuple[str, nn.Parameter]]] = {}
        # Per role and parameter name, one [K_all, ...] tensor whose rows ARE the keys' parameters
        # (each Parameter's data is a view of its row), so a step over all keys reads the stacked
        # weights without copying them; the optimizers still update each key's own Parameter.
        self._banks: dict[str, dict[str, Tensor]] = {}
        self._bank_first: dict[str, list[nn.Parameter]] = {}
        # (role, active rows) -> the fused update of those keys, reused while it stays valid; a
        # node's batches meet the same few key sets again and again, so a few entries serve a run.
        self._updates: OrderedDict[tuple[str, tuple[int, ...]], FusedUpdate] = OrderedDict()
        # role -> name -> [K_all, ...]; (role, k) -> name -> its first k rows
        self._grad_buffers: dict[str | tuple[str, int], dict[str, Tensor]] = {}
        # role -> [K_all, n params] float32: every key's per-parameter AdamW step counts, which the
        # optimizers' state holds as views (see FusedUpdate)
        self._step_banks: dict[str, Tensor] = {}
        # role -> (its bank, {name: a requires-grad view of the bank}): _stacked's leaves over all keys
        self._leaves: dict[str, tuple[dict, dict[str, Tensor]]] = {}
        # batch size -> the unified layout of a batch of that size (see _layout)
        self._unified_layouts: dict[int, Grouping] = {}
        # device -> a float32 1.0 (the unit scale of Visit.check's fused finiteness check)
        self._units: dict[torch.device, Tensor] = {}
        self._role_arch = {role: self._arch(role) for role in self.roles}
        with _gc_paused():
            for role in self.roles:
                self._build_role(role)
        # name -> [K_all, ...]: the moving average of the generator bank (spec.ema_decay > 0), the
        # weights sample() reads; state beside the parameters, stepped by _update_ema
        self._ema: dict[str, Tensor] = {}
        if self.spec.ema_decay > 0:
            self._ema = {n: b.detach().clone() for n, b in self._banks[GENERATOR].items()}
        self._trained_classes: dict[str, list[str] | None] = {k: None for k in self.keys}  # last visit
        self._ever_trained: dict[str, list[str]] = {k: [] for k in self.keys}  # union of all visits
        self._events: list[ResetEvent] = []
        self._reset_counts: dict[str, int] = {k: 0 for k in self.keys}
        self._device = torch.device("cpu")
        if device is not None:  # built (and seeded) on the CPU, then moved: same values anywhere
            self.to(device)

    # -- keys ----------------------------------------------------------------------------------
    @staticmethod
    def _resolve_keys(spec: StoreSpec) -> dict[str, str]:
        if spec.granularity == "unified":
            return {c: "unified" for c in spec.classes}
        if spec.granularity == "per_class":
            return {c: f"class/{c}" for c in spec.classes}
        if spec.granularity != "per_group":
            raise ConfigError(f"generator.granularity: {spec.granularity!r} is not one of unified, per_class, per_group")
        known = set(spec.classes)
        out: dict[str, str] = {}
        for group, members in spec.class_groups:
            for c in members:
                if c not in known:
                    raise ConfigError(f"generator.class_groups: group '{group}' lists unknown class '{c}'")
                if c in out:
                    raise ConfigError(f"generator.class_groups: class '{c}' is in two groups "
                                      f"('{out[c][len('group/'):]}' and '{group}')")
                out[c] = f"group/{group}"
        for c in spec.classes:
            if c not in out:
                if spec.default_group is None:
                    raise ConfigError(f"class '{c}' is in no generator.class_groups group; "
                                      "add it to a group or set generator.default_group")
                out[c] = f"group/{spec.default_group}"
        return out

    def _ordered_keys(self, spec: StoreSpec) -> list[str]:
        if spec.granularity == "unified":
            return ["unified"]
        if spec.granularity == "per_class":
            return [f"class/{c}" for c in spec.classes]
        keys = [f"group/{g}" for g, _ in spec.class_groups]
        dflt = f"group/{spec.default_group}" if spec.default_group is not None else None
        if dflt is not None and dflt not in keys and dflt in self._key_of_class.values():
            keys.append(dflt)
        return keys

    def key_for_class(self, name: str) -> str:
        try:
            return self._key_of_class[name]
        except KeyError:
            raise ConfigError(f"unknown class '{name}'; known: {', '.join(self.spec.classes)}") from None

    def classes_of_key(self, key: str) -> list[str]:
        self._check_key(key)
        return [c for c in self.spec.classes if self._key_of_class[c] == key]

    def _check_key(self, key: str) -> None:
        if key not in self._trained_classes:
            raise ConfigError(f"unknown generator key '{key}'; known: {', '.join(self.keys)}")

    def _arch(self, role: str) -> tuple[str, dict[str, Any]]:
        return kinds.architecture(self.spec, role)

    @torch.no_grad()
    def _build_role(self, role: str) -> None:
        """Every key's module of ``role``, its parameters rows of the role's banks from the start.

        The banks are allocated once and each key's parameters are initialised in place, in them
        (the same seeded ``init_parameters`` the architecture's constructor runs, so the same
        values); each key's module is a structural clone of one parameter-less (meta) template, so
        building K keys allocates the state once instead of K modules' worth and a stacked copy.
        """
        cls, kwargs = self._role_arch[role]
        template = build_model(cls, kwargs, gen=_seeded(self.spec.seed, "template", role)).to("meta")
        if any(True for _ in template.buffers()):  # (none of ours has buffers) build each key whole
            for key in self.keys:
                module = build_model(cls, kwargs, gen=_seeded(self.spec.seed, "init", key, role))
                self._adopt(key, role, module)
            self._rebank(role)
            return
        shapes = [(name, p.shape, p.dtype) for name, p in template.named_parameters()]
        bank = {name: torch.empty((len(self.keys),) + tuple(shape), dtype=dtype) for name, shape, dtype in shapes}
        for row, key in enumerate(self.keys):
            module = clone_structure(template)
            for name, _, _ in shapes:
                owner, _, leaf = name.rpartition(".")
                module.get_submodule(owner)._parameters[leaf] = nn.Parameter(bank[name][row])
            init_parameters(module, _seeded(self.spec.seed, "init", key, role))
            self._adopt(key, role, module)
        self._banks[role] = bank
        self._bank_first[role] = [self._params[k, role][0][1] for k in self.keys]

    def _adopt(self, key: str, role: str, module: nn.Module) -> None:
        self._modules[key, role] = module
        self._params[key, role] = list(module.named_parameters())
        self._optims[key, role] = make_optimizer(module.parameters(), self.spec.optimizer)

    # -- accessors -----------------------------------------------------------------------------
    @property
    def conditions(self) -> Tensor:
        return self._conditions

    @property
    def device(self) -> torch.device:
        return self._device

    def module(self, key: str, role: str = GENERATOR) -> nn.Module:
        self._check_key(key)
        try:
            return self._modules[key, role]
        except KeyError:
            raise ConfigError(f"unknown role '{role}'; this store has {', '.join(self.roles)}") from None

    def optimizer(self, key: str, role: str = GENERATOR) -> torch.optim.Optimizer:
        self.module(key, role)
        return self._optims[key, role]

    def step_count(self, key: str, role: str = GENERATOR) -> int:
        t = step_tensor(self.optimizer(key, role))
        return 0 if t is None else int(t.item())

    @property
    def events(self) -> list[ResetEvent]:
        return list(self._events)

    @property
    def reset_counts(self) -> dict[str, int]:
        return dict(self._reset_counts)

    def trained_classes(self, key: str) -> list[str] | None:
        """The classes of ``key``'s last visit (None before its first)."""
        self._check_key(key)
        tc = self._trained_classes[key]
        return None if tc is None else list(tc)

    def ever_trained_classes(self, key: str) -> list[str]:
        """Every class ``key`` has been trained on, over all visits (a reset does not forget them)."""
        self._check_key(key)
        return list(self._ever_trained[key])

    # -- training ------------------------------------------------------------------------------
    @torch.no_grad()
    def _rebank(self, role: str) -> None:
        per_key = [self._params[k, role] for k in self.keys]
        bank = {}
        for i, (name, _) in enumerate(per_key[0]):
            bank[name] = torch.stack([pk[i][1].detach() for pk in per_key])
            for row, pk in enumerate(per_key):
                pk[i][1].data = bank[name][row]
        self._banks[role] = bank
        self._leaves.pop(role, None)
        self._bank_first[role] = [pk[0][1] for pk in per_key]  # what _bank checks, per key row

    def _bank(self, role: str, rows: Sequence[int]) -> dict[str, Tensor]:
        """The role's bank, re-built if a read key's Parameters were re-pointed (e.g. module.to()).

        Only the rows being read are checked, one pointer per key (``module.to()`` re-points all of
        a module's Parameters at once): a step's cost follows its active keys, not the store's size.
        """
        bank = self._banks[role]
        first = self._bank_first[role]
        b = next(iter(bank.values()))
        base, stride = b.data_ptr(), b.stride(0) * b.element_size()
        for r in rows:
            p = first[r]
            if p.data_ptr() != base + r * stride or p.device != b.device:
                self._rebank(role)
                return self._banks[role]
        return bank

    def _select_rows(self, stacked: dict[str, Tensor], rows: Sequence[int]) -> dict[str, Tensor]:
        """{name: [k, ...]} of ``stacked``'s tensors at ``rows`` (indices into ``self.keys``,
        ascending): the tensors themselves when every key is read (no copy), else fresh copies."""
        if len(rows) == len(self.keys):
            return dict(stacked)
        idx = torch.tensor(rows).to(self._device, non_blocking=True)
        return {n: t.index_select(0, idx) for n, t in stacked.items()}

    def _stacked(self, rows: Sequence[int], role: str, grad: bool = True) -> StackedParams:
        """{param name: [K, ...]} of the keys at ``rows`` (indices into ``self.keys``, ascending, as
        ``Grouping.active``), as autograd leaves (with ``grad=False``, tensors that need none).

        Gradients are taken w.r.t. these tensors (one per name) and handed to ``_apply_update``;
        with every key active this is the bank itself (no copy). The weights' gradients are
        written into the role's gradient buffers (allocated at the first step, reused by every
        later one: a per_class step's weight gradients are as large as its parameters, and a fresh
        tensor per step costs its page faults and freeing each time).
        """
        bank = self._bank(role, rows)
        if not grad:  # the banks themselves, or copies of their rows: they need no gradient
            return StackedParams(self._select_rows(bank, rows))
        if len(rows) == len(self.keys):
            # the same leaves at every step (gradients are taken with autograd.grad, never stored
            # on them): views of the bank, made once per bank instead of once per name and step
            leaves = self._leaves.get(role)
            if leaves is None or leaves[0] is not bank:
                leaves = self._leaves[role] = (bank, {n: b.detach().requires_grad_(True) for n, b in bank.items()})
            out = dict(leaves[1])
        else:
            out = self._select_rows(bank, rows)
            for t in out.values():
                t.requires_grad_(True)
        # the same view objects at every step over k keys: the update keeps their per-key rows
        bufs = self._grad_buffers.get((role, len(rows)))
        if bufs is None:
            full = self._grad_buffers.get(role)
            if full is None:
                full = self._grad_buffers[role] = {n: torch.empty_like(b) for n, b in bank.items()}
            bufs = self._grad_buffers[role, len(rows)] = {n: b[:len(rows)] for n, b in full.items()}
        return StackedParams(out, grad_buffers=bufs)

    def _cached_update(self, role: str, rows: Sequence[int]) -> FusedUpdate | None:
        """The fused update of the keys at ``rows`` if one is cached and still valid (it is not
        built here: building makes the keys' optimizer state, which only an update may do)."""
        update = self._updates.get((role, tuple(rows)))
        return update if update is not None and update.valid() else None

    def _apply_update(self, role: str, rows: Sequence[int], grads: Sequence[Tensor],
                      found_inf: Tensor | None = None, update: FusedUpdate | None = None,
                      lr_scale: float = 1.0) -> None:
        """Step the optimizers of the keys at ``rows`` (ascending, as ``Grouping.active``) with
        ``grads``: per parameter name, in the role's parameter order, the stacked gradient [K, ...];
        ``update``: those keys' update as ``_cached_update`` found it earlier in the same step
        (valid then, and nothing in a step between can invalidate it); ``lr_scale``: the lr
        schedule's factor for the visit's round (store/optim.lr_scale)."""
        cache_key = (role, tuple(rows))
        if update is None:
            update = self._cached_update(role, rows)
        if update is None:
            keys = [self.keys[r] for r in rows]
            bank = self._step_banks.get(role)
            if bank is None:
                bank = self._step_banks[role] = torch.zeros(
                    len(self.keys), len(self._params[self.keys[0], role]), dtype=torch.float32, device=self._device)
            update = FusedUpdate([self._optims[k, role] for k in keys],
                                 [[p for _, p in self._params[k, role]] for k in keys], step_bank=bank, rows=rows)
            self._updates[cache_key] = update
            if len(self._updates) > _UPDATE_CACHE:
                self._updates.popitem(last=False)
        else:
            self._updates.move_to_end(cache_key)
        update(grads, found_inf, kept=self._grad_buffers.get((role, len(rows)), {}).values(), lr_scale=lr_scale)
        if self._ema and role == GENERATOR:
            self._update_ema(update, rows, found_inf)

    @torch.no_grad()
    def _update_ema(self, update: FusedUpdate, rows: Sequence[int], found_inf: Tensor | None) -> None:
        """Move the moving averages of the keys at ``rows`` toward their just-updated parameters, by
        1 - min(d, (1 + t) / (10 + t)) at each key's new step count t: a young key's average follows
        its parameters closely instead of staying near its initialisation (a per_class key may take
        a few hundred steps in a whole run); a skipped (non-finite) step moves nothing. Device
        tensors only: no host sync."""
        bank = self._banks[GENERATOR]  # this step's _stacked checked it, and its rows were just updated
        idx = update.rows_index()  # the update's own index of these rows (None: every row)
        t = update.first_steps()
        w = 1 - torch.clamp((1 + t) / (10 + t), max=self.spec.ema_decay)
        if found_inf is not None:
            w = w * (1 - found_inf)
        for name, avg in self._ema.items():
            b = bank[name]
            wv = w.view(-1, *[1] * (b.dim() - 1))
            if idx is None:
                avg.lerp_(b, wv)
            else:
                avg.index_copy_(0, idx, avg.index_select(0, idx).lerp_(b.index_select(0, idx), wv))

    def _layout(self, y: Tensor) -> Grouping:
        """The batch's layout on the store's device. Unified: one per batch size, made once (it
        depends on nothing else, and no step writes into a layout)."""
        if len(self.keys) != 1:
            return Grouping(self._class_key_idx[y], len(self.keys)).to(self._device)
        grp = self._unified_layouts.get(y.numel())
        if grp is None:
            if len(self._unified_layouts) >= _UPDATE_CACHE:
                self._unified_layouts.clear()
            grp = self._unified_layouts[y.numel()] = Grouping(self._class_key_idx[y], 1).to(self._device)
        return grp

    def _check_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(x on the store's device, y as host long indices). Labels belong on the host (the node
        keeps them there): checking their range and laying the batch out then needs no device sync;
        labels given on a device are copied back (one sync)."""
        if x.dim() != 2 or x.shape[1] != self.spec.feature_dim:
            raise DataError(f"generator batch x must be [n, {self.spec.feature_dim}], got {list(x.shape)}")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"generator batch y must be [{x.shape[0]}] class indices, got {list(y.shape)}")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise DataError(f"generator batch y must hold integer class indices, got {y.dtype}")
        y = y.to("cpu", torch.long)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(self.spec.classes)):
            raise DataError(f"class index out of range [0, {len(self.spec.classes)}) in generator batch")
        return x.to(self._device, torch.float32), y

    def _noise(self, n: int, gen: torch.Generator) -> Tensor:
        # Drawn on the generator's device in batch order, so noise follows samples, not layout.
        # (non_blocking: a copy to the device must not wait for the device)
        return torch.randn(n, self.spec.latent_dim, generator=gen, device=gen.device).to(self._device,
                                                                                          non_blocking=True)

    def _unit(self, device: torch.device) -> Tensor:
        unit = self._units.get(device)
        if unit is None:
            unit = self._units[device] = torch.ones((), dtype=torch.float32, device=device)
        return unit

    def visit(self, *, node: str, round: int) -> Visit:
        """A node's visit: ``v.step(x, y, gen=...)`` per batch (no host sync inside), then
        ``v.finish()``: the per-key mean losses, read back once (NonFiniteLossError if any loss or
        gradient of the visit was not finite; no update lands from that step on)."""
        return Visit(self, node, round)

    def train_batch(self, x: Tensor, y: Tensor, *, gen: torch.Generator, node: str, round: int
                    ) -> dict[str, dict[str, float]]:
        """One optimizer step for every key with samples in (x, y), all keys in one computation,
        and its per-key losses: a one-step visit (one host read-back per call)."""
        v = self.visit(node=node, round=round)
        v.step(x, y, gen=gen)
        return v.finish()

    def _train_step(self, visit: Visit, x: Tensor, y: Tensor, gen: torch.Generator) -> None:
        with step_range("generator_step"):
            x, y = self._check_batch(x, y)
            if y.numel() == 0:
                return
            grp = self._layout(y)
            keys = [self.keys[i] for i in grp.active]
            noise = self._noise(y.numel(), gen)
            cond = self._conditions[y.to(self._device, non_blocking=True)]
            xs, cs, zs = grp.pad(x), grp.pad(cond), grp.pad(noise)
            visit.begin_step(grp.active)
            visit.end_step(self._kind.step(self, grp, keys, xs, cs, zs, visit, gen=gen))

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, class_idx: Tensor, *, gen: torch.Generator) -> Tensor:
        """Features for each requested class, from that class's key and condition: [n, feature_dim]."""
        class_idx = torch.as_tensor(class_idx)
        if class_idx.dim() != 1:
            raise DataError(f"class_idx must be a 1-D tensor of class indices, got shape {list(class_idx.shape)}")
        y = class_idx.to("cpu", torch.long)
        if y.numel() == 0:
            return torch.empty(0, self.spec.feature_dim, device=self._device)
        if int(y.min()) < 0 or int(y.max()) >= len(self.spec.classes):
            raise DataError(f"class index out of range [0, {len(self.spec.classes)}) in sample()")
        grp = self._layout(y)
        keys = [self.keys[i] for i in grp.active]
        zs, cs = grp.pad(self._noise(y.numel(), gen)), grp.pad(self._conditions[y.to(self._device)])
        if self._ema:  # the moving average is what a trained generator samples with
            params = StackedParams(self._select_rows(self._ema, grp.active))
        else:
            params = self._stacked(grp.active, GENERATOR, grad=False)
        template = self._modules[keys[0], GENERATOR]
        if getattr(template, "output_variance", False):  # a VAE's likelihood: its noise drawn after z's
            noise = torch.randn(y.numel(), self.spec.feature_dim, generator=gen, device=gen.device)
            out = template.sample_stacked(params, zs, cs, grp.pad(noise.to(self._device)))
        elif getattr(template, "conditional_prior", False):  # prior noise moved to p(z | c)
            out = template.sample_stacked(params, zs, cs, None)
        else:
            out = template.decode_stacked(params, zs, cs)
        return grp.unpad(out)

    # -- class observation and reset -----------------------------------------------------------
    def observe_classes(self, key: str, classes: Iterable[str], *, node: str, round: int,
                        policy: str) -> ResetEvent | None:
        """Record the classes ``key`` is about to be trained on; reset it if ``policy`` says so
        (see RESET_POLICIES). The first visit of a key never resets (it is freshly initialised)."""
        if policy not in RESET_POLICIES:
            raise ConfigError(f"federation.reset_on_class_change: {policy!r} is not one of {', '.join(RESET_POLICIES)}")
        self._check_key(key)
        new = sorted(set(classes))
        for c in new:
            if self.key_for_class(c) != key:
                raise ConfigError(f"class '{c}' belongs to generator key '{self._key_of_class[c]}', not '{key}'")
        prev, ever = self._trained_classes[key], self._ever_trained[key]
        self._trained_classes[key] = new
        self._ever_trained[key] = sorted(set(ever) | set(new))
        if prev is None:
            return None
        if (policy == "new_classes" and not set(new) <= set(ever)) or (policy == "changed" and prev != new):
            return self.reset(key, node=node, round=round)
        return None

    def reset(self, key: str, *, node: str, round: int) -> ResetEvent:
        """Re-initialise ``key``'s parameters (seeded) and give its optimizers the factory's fresh state
        and param group, in place (same module, Parameter and optimizer objects)."""
        self._check_key(key)
        self._reset_counts[key] += 1
        count = self._reset_counts[key]
        for role in self.roles:
            module = self._modules[key, role]
            init_parameters(module, _seeded(self.spec.seed, "reset", key, role, count))
            opt = self._optims[key, role]
            opt.state.clear()
            reset_param_groups(opt, self.spec.optimizer)
        if self._ema:  # the average starts again from the re-initialised weights
            row = self.keys.index(key)
            with torch.no_grad():
                for name, p in self._params[key, GENERATOR]:
                    self._ema[name][row].copy_(p)
        event = ResetEvent(key, str(node), int(round))
        self._events.append(event)
        return event

    # -- state ---------------------------------------------------------------------------------
    def _meta_arch(self) -> dict:
        out = {}
        for key in self.keys:
            for role in self.roles:
                cls, kwargs = self._role_arch[role]
                out[f"{key}/{role}"] = {"class": cls, "kwargs": dict(kwargs)}
        return out

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors, meta): everything needed to continue bit for bit. Tensors are copies."""
        tensors: dict[str, Tensor] = {"conditions": self._conditions.detach().cpu().clone()}
        optimizers: dict[str, dict] = {}
        for row, key in enumerate(self.keys):
            for role in self.roles:
                opt = self._optims[key, role]
                for name, p in self._params[key, role]:
                    tensors[f"{key}/{role}/param/{name}"] = p.detach().cpu().clone()
                    if self._ema and role == GENERATOR:
                        tensors[f"{key}/{role}/ema/{name}"] = self._ema[name][row].detach().cpu().clone()
                    st = opt.state.get(p)
                    if st:
                        for f in _OPTIM_FIELDS:
                            tensors[f"{key}/{role}/optim/{name}/{f}"] = st[f].detach().cpu().clone()
                g = opt.param_groups[0]
                optimizers[f"{key}/{role}"] = {
                    "name": self.spec.optimizer.name, "lr": float(g["lr"]), "betas": [float(b) for b in g["betas"]],
                    "eps": float(g["eps"]), "weight_decay": float(g["weight_decay"]),
                    "step": self.step_count(key, role),
                }
        meta = {
            "spec": self.spec.to_json(),
            "keys": list(self.keys),
            "roles": list(self.roles),
            "arch": self._meta_arch(),
            "optimizers": optimizers,
            # per key: None before its first visit, else the last visit's classes and all ever trained
            "trained_classes": {k: (None if v is None else {"last": list(v), "ever": list(self._ever_trained[k])})
                                for k, v in self._trained_classes.items()},
            "events": [e.to_json() for e in self._events],
            "reset_counts": dict(self._reset_counts),
        }
        return tensors, meta

    def _expected_shapes(self, meta: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"conditions": tuple(self._conditions.shape)}
        shapes.update({n: tuple(t.shape) for n, t in self._parameter_views().items()})
        for key in self.keys:
            for role in self.roles:
                has_state = int(meta["optimizers"][f"{key}/{role}"]["step"]) > 0
                for name, p in self._params[key, role]:
                    if has_state:
                        shapes[f"{key}/{role}/optim/{name}/exp_avg"] = tuple(p.shape)
                        shapes[f"{key}/{role}/optim/{name}/exp_avg_sq"] = tuple(p.shape)
                        shapes[f"{key}/{role}/optim/{name}/step"] = ()
        return shapes

    def _validate_meta(self, meta: Mapping[str, Any]) -> None:
        missing = [f for f in _META_FIELDS if f not in meta]
        if missing:
            raise CheckpointError(f"store state: meta is missing {', '.join(missing)}")
        mine = self.spec.to_json()
        theirs = _spec_json(meta)
        if theirs != mine:
            fields = sorted(f for f in set(mine) | set(theirs) if mine.get(f) != theirs.get(f))
            raise ConfigError(f"store state was saved with another generator spec (differs in: {', '.join(fields)}); "
                              "load it with GeneratorStore.from_state or use the matching config")
        if list(meta["keys"]) != self.keys:
            raise CheckpointError(f"store state keys {list(meta['keys'])} do not match this store's keys {self.keys}")
        if list(meta["roles"]) != list(self.roles):
            raise CheckpointError(f"store state roles {list(meta['roles'])} do not match {list(self.roles)}")
        arch = self._meta_arch()
        for kr, a in arch.items():
            got = meta["arch"].get(kr)
            if got is None or got.get("class") != a["class"] or dict(got.get("kwargs", {})) != a["kwargs"]:
                raise CheckpointError(f"store state architecture of '{kr}' is {got}, expected {a}")
        extra_arch = set(meta["arch"]) - set(arch)
        if extra_arch:
            raise CheckpointError(f"store state has architecture for unknown {_names(extra_arch)}")
        want = {f"{k}/{r}" for k in self.keys for r in self.roles}
        if set(meta["optimizers"]) != want:
            raise CheckpointError(f"store state optimizers: missing {_names(want - set(meta['optimizers']))}, "
                                  f"unexpected {_names(set(meta['optimizers']) - want)}")
        for kr, o in meta["optimizers"].items():
            for f in ("name", "lr", "betas", "eps", "weight_decay", "step"):
                if f not in o:
                    raise CheckpointError(f"store state optimizer '{kr}' is missing '{f}'")
            if o["name"] != self.spec.optimizer.name:
                raise CheckpointError(f"store state optimizer '{kr}' is {o['name']}, this store uses "
                                      f"{self.spec.optimizer.name}")
        if set(meta["trained_classes"]) != set(self.keys) or set(meta["reset_counts"]) != set(self.keys):
            raise CheckpointError("store state trained_classes/reset_counts do not cover exactly this store's keys")

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Strict, all-or-nothing: everything is checked before anything is changed."""
        self._validate_meta(meta)
        shapes = self._expected_shapes(meta)
        _check_names_and_shapes("store state", shapes, tensors)
        for name in shapes:
            t = tensors[name]
            if t.dtype != torch.float32:
                raise CheckpointError(f"store state tensor '{name}' is {t.dtype}, expected torch.float32")
        for kr, o in meta["optimizers"].items():
            first = self._params[tuple(kr.rsplit("/", 1))][0][0]
            if int(o["step"]) > 0 and int(tensors[f"{kr}/optim/{first}/step"].item()) != int(o["step"]):
                raise CheckpointError(f"store state optimizer '{kr}': meta step {o['step']} != tensor step")

        trained = _trained_from_meta(meta["trained_classes"], self.keys)
        with torch.no_grad():
            self._conditions.copy_(tensors["conditions"])
            for name, t in self._parameter_views().items():  # parameters and moving averages
                t.copy_(tensors[name])
            for key in self.keys:
                for role in self.roles:
                    o = meta["optimizers"][f"{key}/{role}"]
                    opt = self._optims[key, role]
                    opt.state.clear()
                    for name, p in self._params[key, role]:
                        if int(o["step"]) > 0:
                            pre = f"{key}/{role}/optim/{name}/"
                            opt.state[p] = {
                                "step": tensors[pre + "step"].detach().to(p.device, torch.float32).clone(),
                                "exp_avg": tensors[pre + "exp_avg"].detach().to(p.device).clone(),
                                "exp_avg_sq": tensors[pre + "exp_avg_sq"].detach().to(p.device).clone(),
                            }
                    for g in opt.param_groups:
                        g["lr"], g["betas"] = float(o["lr"]), tuple(float(b) for b in o["betas"])
                        g["eps"], g["weight_decay"] = float(o["eps"]), float(o["weight_decay"])
        self._trained_classes, self._ever_trained = trained
        self._events = [ResetEvent(str(e["key"]), str(e["node"]), int(e["round"])) for e in meta["events"]]
        self._reset_counts = {k: int(meta["reset_counts"][k]) for k in self.keys}

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any], *,
                   device: str | torch.device | None = None) -> "GeneratorStore":
        """Rebuild a store from ``state_dict()`` output (architecture and spec come from meta), on
        ``device`` (default CPU) whatever device wrote it: state tensors are always CPU tensors."""
        if "spec" not in meta:
            raise CheckpointError("store state: meta is missing 'spec'")
        if "conditions" not in tensors:
            raise CheckpointError("store state is missing tensor 'conditions'")
        store = cls(StoreSpec.from_json(meta["spec"], key_order=meta.get("keys")), tensors["conditions"], device=device)
        store.load_state_dict(tensors, meta)
        return store

    # -- parameters only (fedavg) --------------------------------------------------------------
    def _parameter_views(self) -> dict[str, Tensor]:
        """``<key>/<role>/param/<name>`` -> the parameter, and ``<key>/generator/ema/<name>`` -> its
        moving average where the spec keeps one: a function of the parameters' history that fedavg
        averages and sends with them (a server store that is never stepped has no average of its own)."""
        out: dict[str, Tensor] = {}
        for row, key in enumerate(self.keys):
            for role in self.roles:
                for name, p in self._params[key, role]:
                    out[f"{key}/{role}/param/{name}"] = p
                    if self._ema and role == GENERATOR:
                        out[f"{key}/{role}/ema/{name}"] = self._ema[name][row]
        return out

    def parameter_tensors(self) -> dict[str, Tensor]:
        """Copies of every parameter, named ``<key>/<role>/param/<name>``, and of the generator's
        moving averages, ``<key>/generator/ema/<name>`` (spec.ema_decay > 0)."""
        return {n: t.detach().clone() for n, t in self._parameter_views().items()}

    def load_parameter_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Copy parameters (and moving averages) in (strict; optimizer state untouched)."""
        want = self._parameter_views()
        _check_names_and_shapes("parameter set", {n: tuple(p.shape) for n, p in want.items()}, tensors)
        with torch.no_grad():
            for name, p in want.items():
                p.copy_(tensors[name])

    # -- device --------------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> "GeneratorStore":
        """Move modules, optimizer moments and conditions (same Parameter/optimizer objects)."""
        device = torch.device(device)
        for role, bank in self._banks.items():
            for name in bank:
                bank[name] = bank[name].to(device)
            for i, (name, _) in enumerate(self._params[self.keys[0], role]):
                for row, key in enumerate(self.keys):
                    self._params[key, role][i][1].data = bank[name][row]  # same Parameter objects
        for opt in self._optims.values():
            for st in opt.state.values():
                for f in ("exp_avg", "exp_avg_sq", "step"):  # fused Adam keeps step on the device
                    if f in st:
                        st[f] = st[f].to(device)
        self._conditions = self._conditions.to(device)
        self._ema = {n: a.to(device) for n, a in self._ema.items()}
        self._grad_buffers = {}  # re-allocated on the new device at the next step
        self._unified_layouts = {}
        self._leaves = {}
        self._step_banks = {}  # and the step counts re-banked there from the moved state
        self._updates.clear()
        self._device = device
        return self
