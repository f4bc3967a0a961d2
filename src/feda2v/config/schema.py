"""Structured config schemas: the single source of truth for config names, types and defaults.

conf/schema.yaml is generated from it (scripts/sync_config.py); every app validates the composed
config against ``Feda2vConfig`` so a typo or a wrong type is an error that names the key, whether
the config came from ``conf/`` or from DVC's ``params.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class PartitionConfig:
    scheme: str = "classes_per_node"  # iid | dirichlet | classes_per_node
    alpha: float = 0.5  # Dirichlet concentration; smaller = more skew
    classes_per_node: int = 2


@dataclass
class InstrumentsConfig:
    """Render settings of the offline instrument data source (FedA2V analogue)."""

    classes: int = 20  # first N of the curated General MIDI instrument list
    clips_per_class: int = 150
    sample_rate: int = 16000
    clip_seconds: float = 1.0
    feature_skew_nodes: int = 0  # nodes whose clips come from the second sound library
    cache_dir: str = "data/cache"


@dataclass
class DataConfig:
    name: str = "instruments"  # instruments | fashion_mnist | digits
    nodes: int = 10
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    test_fraction: float = 0.2
    condition: str = "text"  # text (MiniLM sentence embedding of the class name) | onehot
    max_samples: int = 0  # 0 = all; caps large sources (fashion_mnist) for quick runs
    prepared_dir: str = "data/prepared"
    # feda2v-prepare also writes one bundle per site (its partition, the conditions, its manifest
    # entry) under DIR/node_NNN/, for federations whose nodes hold only their own data (Flower)
    site_bundles_dir: Optional[str] = None
    instruments: InstrumentsConfig = field(default_factory=InstrumentsConfig)
    progress: str = "auto"  # auto (bar on a terminal, else quiet) | bar | lines | off


@dataclass
class OptimizerConfig:
    """The one optimizer factory's settings: every (key, role) optimizer and every reset use these."""

    name: str = "adamw"  # adamw | adam
    # null: the generator type's own default (vae/cvae: 3e-3 with the cosine schedule, 2e-3 constant,
    # [0.9, 0.999]; gan: 1e-3, [0.5, 0.99]),
    # so generator.type=gan and generator=gan compose the same training (store/kinds.py)
    lr: Optional[float] = None
    betas: Optional[List[float]] = None
    # the lr over the federation's rounds: constant | cosine (from lr down to a tenth of it by round
    # decay_rounds, store/optim.lr_scale); null: the type's default (cvae keys of several classes:
    # cosine; per class, vae, gan: constant)
    schedule: Optional[str] = None
    # the rounds the cosine decays over (later rounds stay at its last lr); null: federation.rounds.
    # Recorded resolved: a cosine run resumes with more rounds only with this set to what it had.
    decay_rounds: Optional[int] = None
    eps: float = 1e-8
    weight_decay: float = 1e-2


@dataclass
class GanConfig:
    """The GAN's schedule and objective (generator.type=gan); why these defaults: store/steps.py."""

    schedule: str = "alternating"  # alternating (D step(s), then G step(s) against the updated D) | simultaneous
    # discriminator updates per batch. 2: the generator then meets a discriminator that has caught
    # up with its last move (instruments defaults, 3 seeds, unified: TSTR 0.607 -> 0.647, recall
    # 0.44 -> 0.54, Frechet 14.2 -> 11.7, training ~1.8x; README, the GAN)
    d_steps: int = 2
    g_steps: int = 1  # generator updates per batch
    loss: str = "nonsaturating"  # nonsaturating | hinge
    r1_gamma: float = 1.0  # R1 penalty weight on real samples (0 = off)


@dataclass
class GeneratorConfig:
    type: str = "cvae"  # vae | cvae | gan (the kinds table: store/kinds.py)
    arch: str = "default"  # architecture variant of the kind (store/kinds.py); fedgfe* = published (migrated runs)
    fusion_dim: int = 512  # arch=fedgfe_multimodal only: the published multimodal VAE's condition projection
    granularity: str = "unified"  # unified | per_class | per_group
    class_groups: Dict[str, List[str]] = field(default_factory=dict)
    default_group: Optional[str] = None  # group for classes missing from class_groups
    latent_dim: int = 16
    # width of every hidden layer; null: the type's default (store/kinds.py: cvae 512 for keys of
    # several classes (unified, groups) and 256 per class, gan 256, vae 128; the published
    # architectures 128), recorded resolved in checkpoints
    hidden_dim: Optional[int] = None
    beta_max: float = 1.0  # VAE KL weight after warm-up
    # On the key's persistent optimizer step counter. KL annealing (Bowman et al., 2016) over the
    # first third of the default run's unified steps (30 rounds x 10 nodes x 4 batches x 5 epochs
    # ~ 6000): measured at 20 rounds, 3 seeds, against 200 and 3000 (README, generator comparison).
    beta_warmup_steps: int = 2000
    # VAE kinds (arch default), opt-in: learn a per-feature output variance (its own Gaussian
    # likelihood term, on the detached residual) and sample decoder mean + sigma * noise instead of
    # the mean alone. Measured (README, generator comparison): unified cVAE recall 0.47 -> 0.85 and
    # Frechet 11.0 -> 9.3, TSTR/TRTR 0.753 -> 0.775 (2 of 3 seeds up); per-class cVAE TSTR/TRTR
    # 0.717 -> 0.696, so not the default.
    output_variance: bool = False
    # cVAE (arch default): a learned conditional prior p(z | c) = N(m(c), diag(exp(v(c)))) (one
    # linear layer from the condition, zero-initialised: N(0, I) at the start), the KL taken to it
    # and sampling drawn from it, instead of one N(0, I) for every class. null: the type's default
    # (cvae: true; vae, gan and the published architectures have none), so generator.type=X and
    # generator=X compose the same training (store/kinds.py; README, generator comparison).
    conditional_prior: Optional[bool] = None
    # The weights sampling uses (evaluation, distillation, the MLflow model): a moving average of
    # each key's generator parameters over that key's own optimizer steps, kept beside them as
    # state (decay min(d, (1 + t) / (10 + t)) at the key's step t); 0: the trained weights
    # themselves. Why: the relay's last visits pull the trained weights toward the last nodes'
    # classes; the average spans many nodes (README, generator comparison). null: the type's default.
    ema_decay: Optional[float] = None
    # cVAE and GAN (arch default): the condition also modulates the generating network's two hidden
    # layers (the VAE's decoder, the GAN's generator), a (1 + scale) + shift from one
    # zero-initialised linear layer of the condition (FiLM, Perez et al., 2018), on top of the
    # concatenated input. Why: one network shared by many classes must shape each class's spread,
    # not only shift its mean (README, "The condition's FiLM"). null: the type's default (keys
    # holding several classes, unified or class groups: true; per class, where a key's condition
    # never changes, false; the unconditional VAE and the published architectures have none).
    film: Optional[bool] = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    gan: GanConfig = field(default_factory=GanConfig)


@dataclass
class FlowerConfig:
    """federation.engine=flower: Flower's timing and what a lost node means (operational: neither
    enters the checkpoint's config nor blocks a resume)."""

    reply_timeout_s: float = 600.0  # longest wait for one visit's reply before the node counts as lost
    poll_s: float = 0.05  # interval between the server's pulls for replies
    connect_timeout_s: float = 120.0  # wait for SuperNodes to connect (start, and rejoin under 'wait')
    # fail: stop the run (non-zero exit, one line); skip: finish the round without the node and
    # record it; wait: re-send to the node's partition (a restarted node rejoins) up to `retries` times
    on_node_failure: str = "fail"
    retries: int = 2
    # sharing=local|fedavg: each node's store (generator + optimizer moments) lives on its node,
    # checkpointed in <dir>/node_NNN/. A SuperNode's node config 'state-dir' wins (a real site);
    # this is the default for nodes without one (simulation, one machine). null = <checkpoint.dir>/nodes
    node_state_dir: Optional[str] = None


@dataclass
class FederationConfig:
    mode: str = "generator_only"  # generator_only | full
    sharing: str = "shared"  # shared | local | fedavg
    # 30: the unified cVAE's cosine lr pays for the longer run on every seed (five-draw TSTR/TRTR
    # over six seeds 0.893 at 20 rounds -> 0.916 at 30; README, "The lr schedule").
    rounds: int = 30
    local_epochs: int = 5
    batch_size: int = 64
    fraction: float = 1.0  # share of nodes taking part in a round
    # When a key is reset (re-initialised, fresh optimizer from the factory) as it meets classes:
    # new_classes = classes it was never trained on (the published rule) | changed = a class set
    # other than its previous visit's | never. true/false (the published flag) = new_classes/never.
    reset_on_class_change: str = "new_classes"
    engine: str = "inprocess"  # inprocess | flower
    # full mode: node adapter/classifier and server distillation
    classifier_lr: float = 1e-3
    classifier_hidden: int = 128
    distill: bool = True  # full mode: fine-tune the global classifier on synthetic samples each round
    synthetic_per_class: str = "auto"  # auto (= real training count per class) | an integer
    distill_epochs: int = 1
    flower: FlowerConfig = field(default_factory=FlowerConfig)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    every: int = 1  # rounds between checkpoints; the last round is always written
    keep_last: int = 3


@dataclass
class TrainConfig:
    resume: Optional[str] = None  # null | latest | <path>
    reports_dir: str = "reports/train"
    metrics_path: str = "reports/train_metrics.json"  # DVC metrics: no timing, no run ids
    timing_path: str = "reports/timing/train.json"  # wall-clock figures: untracked (git and DVC)
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines | off
    # torch intra-op threads for training (0 = torch's default). The generators are small MLPs:
    # one thread is fastest here, and more threads contend badly on a shared 2-core machine.
    threads: int = 1
    # A fresh run refuses a checkpoint.dir / reports_dir holding another run's results; true
    # replaces them (deleted only once this run's first checkpoint is complete).
    start_over: bool = False
    # Where the store, the federation, the full-mode classifier, evaluation and sampling run:
    # auto (cuda when available) | cpu | cuda | cuda:N. cpu by default: the same config then gives
    # the same bytes on every machine (a GPU run differs from a CPU run in the last bits).
    device: str = "cpu"


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "feda2v"
    run_name: Optional[str] = None  # default: built from config
    required: bool = False  # true: an unreachable server fails before training
    # Which checkpoints a run uploads as artifacts: last (the final one), keep_last (those
    # checkpoint.keep_last leaves on disk), all (every one written).
    upload_checkpoints: str = "last"
    # CPU, memory, disk and network as system/* metrics (every 2 s unless
    # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise).
    system_metrics: bool = True


@dataclass
class ProfilerConfig:
    enabled: bool = False
    wait: int = 1
    warmup: int = 1
    active: int = 3
    repeat: int = 1
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False
    dir: str = "reports/profile"


@dataclass
class EvaluateConfig:
    checkpoint: str = "checkpoints/latest.ckpt"
    reports_dir: str = "reports"
    samples_per_class: int = 200
    knn_k: int = 5
    seed: int = 0
    progress: str = "auto"  # auto (bar on a terminal, else quiet) | bar | lines | off


@dataclass
class Feda2vConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# generator.optimizer.schedule's values (nullable, so checked as a rule in config/validate.py)
LR_SCHEDULES = ("constant", "cosine")

# Allowed values of the string "enums" (kept as str so YAML stays plain and DVC -S works).
CHOICES: Dict[str, tuple] = {
    "data.name": ("instruments", "fashion_mnist", "digits"),
    "data.partition.scheme": ("iid", "dirichlet", "classes_per_node"),
    "data.condition": ("text", "onehot"),
    "generator.type": ("vae", "cvae", "gan"),
    "generator.arch": ("default", "fedgfe", "fedgfe_multimodal", "concat"),
    "generator.granularity": ("unified", "per_class", "per_group"),
    "generator.optimizer.name": ("adamw", "adam"),
    "generator.gan.schedule": ("alternating", "simultaneous"),
    "generator.gan.loss": ("nonsaturating", "hinge"),
    "federation.mode": ("generator_only", "full"),
    "federation.sharing": ("shared", "local", "fedavg"),
    "federation.engine": ("inprocess", "flower"),
    "federation.reset_on_class_change": ("new_classes", "changed", "never"),
    "federation.flower.on_node_failure": ("fail", "skip", "wait"),
    "train.progress": ("auto", "bar", "lines", "off"),
    "data.progress": ("auto", "bar", "lines", "off"),
    "evaluate.progress": ("auto", "bar", "lines", "off"),
    "tracking.upload_checkpoints": ("last", "keep_last", "all"),
}

# The published system's flag names, accepted as aliases (top level of a config or an override).
LEGACY_ALIASES: Dict[str, str] = {
    "generator_only_mode": "federation.mode",  # bool: true -> generator_only, false -> full
    "shared_generator_in_only_mode": "federation.sharing",  # bool: true -> shared, false -> local
    "generator_granularity": "generator.granularity",
    "generator_type": "generator.type",
    "reset_generator_on_class_change": "federation.reset_on_class_change",
    "generator_class_groups": "generator.class_groups",
}

