"""The federation's state and one round of it: routing, aggregation, distillation.

Which stores exist, which one a node trains and what happens around a round's visits belong to the
sharing mode (``federation/sharing.py``); this module only asks it.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from feda2v.errors import ConfigError
from feda2v.federation.aggregate import average_state
from feda2v.federation.node import accuracy, node_name, train_classifier, train_generators
from feda2v.federation.sharing import sharing_mode
from feda2v.models.classifier import Classifier
from feda2v.seeding import numpy_generator, torch_generator
from feda2v.store import GeneratorStore, StoreSpec
from feda2v.store.device import resolve_device


# Per-round losses that do not depend on the key layout, so runs of any granularity and generator
# type chart together. Each is a mean over the round's (node, key) losses weighted by the samples
# the node trained that key on; name -> the per-key metrics summed, per generator family.
KEY_INDEPENDENT_LOSSES = {
    # what the generator's optimizer minimises: recon + beta*KL (VAE), the G loss (GAN)
    "loss/generator": (("loss",), ("g_loss",)),
    "loss/neg_elbo": (("recon", "kl"),),  # the VAE's negative ELBO: recon + KL at beta = 1
    "loss/recon": (("recon",),),
    "loss/kl": (("kl",),),
    "loss/gan_g": (("g_loss",),),
    "loss/gan_d": (("d_loss",),),
}


def key_independent_losses(node_results) -> dict:
    """``loss/<name>`` (see ``KEY_INDEPENDENT_LOSSES``) for one round's node results; a name is
    present only when the generator reports its parts."""
    sums: dict = defaultdict(float)
    weights: dict = defaultdict(float)
    for r in node_results:
        for key, ms in r.losses.items():
            w = float(r.samples_per_key.get(key, 0))
            if w <= 0:
                continue
            for name, alternatives in KEY_INDEPENDENT_LOSSES.items():
                parts = next((a for a in alternatives if all(p in ms for p in a)), None)
                if parts is not None:
                    sums[name] += w * sum(ms[p] for p in parts)
                    weights[name] += w
    return {name: sums[name] / weights[name] for name in KEY_INDEPENDENT_LOSSES if weights[name]}


@dataclass
class RoundResult:
    round: int
    nodes: list = field(default_factory=list)  # NodeResult per participant, in training order
    metrics: dict = field(default_factory=dict)  # flat name -> float, for tracking and reports
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    downstream: Optional[dict] = None
    missing: list = field(default_factory=list)  # participants whose visit was lost (Flower, skip policy)


class Federation:
    """Every piece of training state of one run; ``state_dict`` captures all of it."""

    def __init__(self, cfg, data, *, node_resident: bool = False):
        """``node_resident``: the engine runs visits on nodes that keep their own stores (Flower);
        where the sharing mode allows it (local, fedavg) the server then holds no node store, and
        ``node_rounds`` records which round each node's state belongs to (0: never trained)."""
        fed = cfg.federation
        self.sharing = sharing_mode(fed.sharing)
        if fed.mode == "full" and not self.sharing.has_server_store:
            raise ConfigError(f"federation.mode=full needs sharing=shared or fedavg: with "
                              f"sharing={self.sharing.name} no server-side generator exists to distil from")
        self.cfg, self.data = cfg, data
        self.device = resolve_device(cfg.train.device)  # node data stays on the host; visits move it
        self.classes = list(data.classes)
        self.spec = StoreSpec.from_config(cfg, classes=self.classes, feature_dim=data.feature_dim,
                                          condition_dim=data.condition_dim)
        names = [node_name(n.node_id) for n in data.nodes]
        self.node_resident = bool(node_resident and self.sharing.node_resident)
        self.stores: dict[str, GeneratorStore] = {
            name: GeneratorStore(self.spec, data.conditions, device=self.device)
            for name in self.sharing.store_names(names, resident=self.node_resident)}
        self.node_rounds: dict[str, int] = {name: 0 for name in names} if self.node_resident else {}
        self.classifier = None
        if fed.mode == "full":
            self.classifier = Classifier(data.feature_dim, len(self.classes), fed.classifier_hidden)
            self.classifier.init_seeded(cfg.seed, "classifier")
            self.classifier.to(self.device)
        self.round = 0  # rounds completed
        self.missing: dict[int, list[str]] = {}  # round -> participants lost in it (engine failure policy)

    # -- routing -------------------------------------------------------------------------
    @property
    def primary_store(self) -> str:
        """The store evaluate and the MLflow model use (the sharing mode decides)."""
        return self.sharing.primary_store(list(self.stores))

    def store_name_for(self, node: str) -> str:
        return self.sharing.store_name_for(node)

    def store_for(self, node: str) -> GeneratorStore:
        return self.stores[self.store_name_for(node)]

    def train_samples(self, nd) -> int:
        """A node's training samples, from the manifest (a distributed run's server holds no
        training data: data/prepared.py:load_server_view)."""
        return int(sum(self.data.manifest["counts"]["train"][nd.node_id]))

    def participants(self, round_: int) -> list:
        nodes = list(self.data.nodes)
        k = max(1, math.ceil(self.cfg.federation.fraction * len(nodes)))
        if k >= len(nodes):
            return nodes
        pick = numpy_generator(self.cfg.seed, "participants", round_).choice(len(nodes), k, replace=False)
        return [nodes[i] for i in sorted(pick.tolist())]  # relay order: node id order

    # -- one round -----------------------------------------------------------------------
    def train_visits(self, round_: int, visits: list, on_step: Optional[Callable[[], None]] = None):
        """Train each (node data, store name) visit here, in order; yields each NodeResult.
        Engines that run the nodes elsewhere (Flower) pass their own function to ``run_round``."""
        fed = self.cfg.federation
        for nd, store_name in visits:
            yield train_generators(
                self.stores[store_name], nd, classes=self.classes, seed=self.cfg.seed, round_=round_,
                local_epochs=fed.local_epochs, batch_size=fed.batch_size,
                reset_on_change=fed.reset_on_class_change, on_step=on_step)

    def train_classifiers(self, round_: int, participants: list, start: dict):
        """Full mode, in-process: each participant with training data trains the classifier from
        ``start``; yields (node name, state, weight = its training samples), in participant order.
        Engines that run the nodes elsewhere (Flower) pass their own function to ``run_round``."""
        fed = self.cfg.federation
        for nd in participants:
            if len(nd.train_y) == 0:
                continue
            self.classifier.load_state_dict(start)
            train_classifier(self.classifier, nd.train_x, nd.train_y, lr=fed.classifier_lr,
                             epochs=fed.local_epochs, batch_size=fed.batch_size,
                             gen=torch_generator(self.cfg.seed, "classifier", round_, nd.node_id))
            yield (node_name(nd.node_id), {k: v.clone() for k, v in self.classifier.state_dict().items()},
                   float(len(nd.train_y)))

    def run_round(self, round_: int, on_step: Optional[Callable[[], None]] = None,
                  on_node: Optional[Callable[[object], None]] = None,
                  train_visits: Optional[Callable] = None,
                  train_classifiers: Optional[Callable] = None,
                  node_parameters: Optional[dict] = None) -> RoundResult:
        """One round: route participants to stores, train them (``train_visits``, in-process by
        default), then aggregate, distil (full mode: node classifiers by ``train_classifiers``) and
        summarise. ``node_parameters``: filled by an engine whose nodes keep their stores (node ->
        the parameters its visit trained), for the aggregation."""
        if self.node_resident and train_visits is None:
            raise ConfigError("this federation's node stores live on their nodes: run it with "
                              "federation.engine=flower")
        t_start = time.perf_counter()
        result = RoundResult(round=round_)
        visits = [(nd, self.store_name_for(node_name(nd.node_id))) for nd in self.participants(round_)]
        self.sharing.before_round(self.stores, visits)
        for res in (train_visits or self.train_visits)(round_, visits, on_step):
            result.nodes.append(res)
            result.train_seconds += res.train_seconds
            if on_node is not None:
                on_node(res)
        done = {r.node for r in result.nodes}
        result.missing = [node_name(nd.node_id) for nd, _ in visits if node_name(nd.node_id) not in done]
        self.sharing.after_round(self.stores, result.nodes, node_parameters)
        if self.classifier is not None:
            result.downstream, lost = self._full_mode_round(
                round_, [nd for nd, _ in visits if node_name(nd.node_id) in done],
                train_classifiers or self.train_classifiers)
            result.missing += [n for n in lost if n not in result.missing]
        if result.missing:
            self.missing[round_] = list(result.missing)
        self.round = round_
        result.wall_seconds = time.perf_counter() - t_start
        result.metrics = self._round_metrics(result)
        result.metrics["nodes_missing"] = float(len(result.missing))
        return result

    def _full_mode_round(self, round_: int, participants, train_classifiers) -> tuple[dict, list]:
        """FedAvg of node classifiers, then server fine-tuning on synthetic samples per class.
        Returns the downstream report and the participants whose classifier visit was lost."""
        fed = self.cfg.federation
        start = {k: v.clone() for k, v in self.classifier.state_dict().items()}
        trained = list(train_classifiers(round_, participants, start))
        states, weights = [st for _, st, _ in trained], [w for _, _, w in trained]
        answered = {n for n, _, _ in trained}
        lost = [node_name(nd.node_id) for nd in participants
                if self.train_samples(nd) and node_name(nd.node_id) not in answered]
        self.classifier.load_state_dict(average_state(states, weights) if states else start)
        test_x, test_y = self._global_test()
        before = accuracy(self.classifier, test_x, test_y)
        per_node_before = self._per_node_accuracy()
        synthetic = 0
        if fed.distill:
            sx, sy = self._synthetic_set(round_)
            synthetic = int(len(sy))
            train_classifier(self.classifier, sx, sy, lr=fed.classifier_lr, epochs=fed.distill_epochs,
                             batch_size=fed.batch_size,
                             gen=torch_generator(self.cfg.seed, "distill", round_))
        after = accuracy(self.classifier, test_x, test_y)
        per_node_after = self._per_node_accuracy()
        return {
            "global_acc_fedavg": before, "global_acc_distilled": after,
            "synthetic_samples": synthetic,
            "per_node": {n: {"fedavg": per_node_before[n], "distilled": per_node_after[n]}
                         for n in per_node_before},
        }, lost

    def _synthetic_set(self, round_: int):
        store = self.stores[self.primary_store]
        spc = self.cfg.federation.synthetic_per_class
        if spc == "auto":  # the manifest's counts (verified against every partition that holds them)
            counts = torch.zeros(len(self.classes), dtype=torch.long)
            for row in self.data.manifest["counts"]["train"]:
                counts += torch.tensor(row, dtype=torch.long)
        else:
            counts = torch.full((len(self.classes),), int(spc), dtype=torch.long)
        y = torch.repeat_interleave(torch.arange(len(self.classes)), counts)
        with torch.no_grad():
            x = store.sample(y, gen=torch_generator(self.cfg.seed, "synthetic", round_))
        return x, y

    def _global_test(self):
        xs = [nd.test_x for nd in self.data.nodes]
        ys = [nd.test_y for nd in self.data.nodes]
        return torch.cat(xs), torch.cat(ys)

    def _per_node_accuracy(self) -> dict:
        return {node_name(nd.node_id): accuracy(self.classifier, nd.test_x, nd.test_y)
                for nd in self.data.nodes}

    def _round_metrics(self, result: RoundResult) -> dict:
        """Per-key losses averaged over the round's node steps; key-independent losses (``loss/...``,
        see ``KEY_INDEPENDENT_LOSSES``); resets; timing."""
        sums: dict = defaultdict(float)
        weights: dict = defaultdict(float)
        for r in result.nodes:
            for key, ms in r.losses.items():
                for m, v in ms.items():
                    sums[f"{m}/{key}"] += v * r.steps
                    weights[f"{m}/{key}"] += r.steps
        metrics = {f"gen/{name}": sums[name] / weights[name] for name in sorted(sums) if weights[name]}
        metrics.update(key_independent_losses(result.nodes))
        metrics["resets"] = float(sum(len(r.resets) for r in result.nodes))
        metrics["round_seconds"] = result.wall_seconds
        metrics["train_step_seconds"] = result.train_seconds
        metrics["engine_overhead_share"] = (
            1.0 - result.train_seconds / result.wall_seconds if result.wall_seconds > 0 else 0.0)
        if result.downstream:
            metrics["acc/global_fedavg"] = result.downstream["global_acc_fedavg"]
            metrics["acc/global_distilled"] = result.downstream["global_acc_distilled"]
        return metrics

    # -- state ---------------------------------------------------------------------------
    def state_dict(self):
        """Every piece of training state as a RunState (the layout is checkpoint/runstate's)."""
        from feda2v.checkpoint.runstate import capture_federation, state_config

        return capture_federation(self, config=state_config(self.cfg),
                                  data_manifest_hash=getattr(self.data, "manifest_hash", None), with_rng=False)

    def load_state_dict(self, state) -> None:
        """Load a RunState in place (CheckpointError if it does not fit this federation)."""
        from feda2v.checkpoint.runstate import load_federation

        load_federation(self, state, restore_globals=False)
