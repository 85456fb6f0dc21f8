"""Run configuration: one frozen dataclass, validated before any work starts.

Field names are the original toolkit's flag names (``--client_num_in_total``, ``--comm_round``,
``--partition_method`` ...) so its users' scripts carry over; the CLI accepts each with dashes or
underscores. A YAML/JSON file (``--config``) may supply any field; flags given on the command
line override it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, get_type_hints

from .data import DATASETS, dataset_meta
from .errors import ConfigError
from .models import MODELS, check_model_input
from .registry import Registry

PARTITIONS = ("homo", "hetero", "shards")
CLIENT_OPTIMIZERS = ("sgd", "adam")
SERVER_OPTIMIZERS = ("sgd", "adam")
ENGINES = ("vmap", "loop")
COMPILE_MODES = ("off", "trace", "inductor")
STRATEGIES = ("auto", "vmap", "loop")
DEVICES = ("auto", "cpu", "cuda")
DP_MODES = ("none", "example", "user", "local")
# keyword arguments the engine passes itself; users may not set them in *_params
ENGINE_KWARGS = {"weights", "f", "state", "generator", "knowledge", "aggregator", "malicious", "client_ids"}

# Validators of config sections, ``fn(cfg) -> None`` raising ConfigError. Each module registers
# the validator of its own fields (``spfl_vmap/modules``); the builder registers the rules that
# span modules. ``Config.__post_init__`` runs them all, before any data is loaded.
SECTIONS: Registry = Registry("config section")
RULES: Registry = Registry("cross-module config rule")
# ``fn(cfg) -> {field: canonical value}``, run before validation (e.g. "MKrum" -> "multi_krum")
NORMALIZERS: Registry = Registry("config normalizer")
# the original toolkit's model names that we map to ours
MODEL_ALIASES = {"convnet_test": "convnet"}

# Settings that may change when a run is resumed: they extend it, or change what is evaluated,
# shown or written, never the rounds already trained. Every other field must match the checkpoint.
RESUMABLE_CHANGES = frozenset({
    "comm_round", "frequency_of_the_test", "eval_batch_size", "progress", "out", "name", "checkpoint_every",
    "max_rejected_rounds", "data_dir", "download", "dp_epsilon_json", "dist_backend", "dist_timeout",
})


def need(ok: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``ok``."""
    if not ok:
        raise ConfigError(msg)


def parse_params(text: str) -> dict[str, Any]:
    """``"a=1,b=x,c=true"`` -> ``{"a": 1, "b": "x", "c": True}`` (ints, floats, bools, strings)."""
    out: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        if "=" not in item:
            raise ConfigError(f"hyperparameter {item!r} must look like name=value")
        k, v = (x.strip() for x in item.split("=", 1))
        low = v.lower()
        if low in ("true", "false"):
            out[k] = low == "true"
        elif low in ("none", "null"):
            out[k] = None
        else:
            try:
                out[k] = int(v)
            except ValueError:
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
    return out


def check_params(flag: str, fn: Any, text: str) -> None:
    """Every key of ``text`` must be a keyword-only parameter of ``fn``; a typo is an error."""
    allowed = {
        n for n, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    } - ENGINE_KWARGS
    for key in parse_params(text):
        if key not in allowed:
            raise ConfigError(f"{flag}: {fn.__name__} has no hyperparameter {key!r}; it takes: {', '.join(sorted(allowed)) or 'none'}")


@dataclass(frozen=True)
class Config:
    """Everything that determines a run. Same config + same device = same result."""

    # data
    dataset: str = field(default="fashion_mnist", metadata={"help": "dataset name"})
    data_dir: str = field(default="./data", metadata={"help": "root of torchvision-layout datasets"})
    download: bool = field(default=False, metadata={"help": "download missing datasets (needs internet)"})
    synthetic_train: int = field(default=2000, metadata={"help": "train samples of the synthetic dataset"})
    synthetic_test: int = field(default=500, metadata={"help": "test samples of the synthetic dataset"})
    partition_method: str = field(default="hetero", metadata={"help": "homo (IID) | hetero (Dirichlet) | shards"})
    partition_alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration for hetero"})
    partition_min_samples: int = field(default=10, metadata={"help": "minimum samples per client for hetero"})
    client_num_in_total: int = field(default=100, metadata={"help": "number of clients"})
    client_num_per_round: int = field(default=10, metadata={"help": "clients sampled per round"})
    # model
    model: str = field(default="lr", metadata={"help": "lr | cnn | cnn_cifar | convnet | resnet20 | resnet56"})
    model_width: int = field(default=64, metadata={"help": "width of convnet"})
    # local training
    comm_round: int = field(default=10, metadata={"help": "number of rounds"})
    epochs: int = field(default=1, metadata={"help": "local epochs per round"})
    batch_size: int = field(default=10, metadata={"help": "local batch size B"})
    client_optimizer: str = field(default="sgd", metadata={"help": "sgd | adam"})
    lr: float = field(default=0.03, metadata={"help": "client learning rate"})
    momentum: float = field(default=0.0, metadata={"help": "client SGD momentum"})
    wd: float = field(default=0.0, metadata={"help": "client weight decay"})
    use_gradient: bool = field(default=False, metadata={"help": "FedSGD: clients upload their full local gradient"})
    # server
    server_optimizer: str = field(default="sgd", metadata={"help": "sgd | adam, applied to the aggregate"})
    server_lr: Optional[float] = field(default=None, metadata={"help": "server lr (default 1, or --lr with --use_gradient)"})
    server_momentum: float = field(default=0.0, metadata={"help": "server SGD momentum (FedAvgM)"})
    # engine
    engine: str = field(default="vmap", metadata={"help": "vmap (vectorized) | loop (per-client reference)"})
    strategy: str = field(default="auto", metadata={"help": "vmap engine strategy: auto | vmap | loop"})
    client_chunk: int = field(default=0, metadata={"help": "clients trained together per chunk (0 = automatic)"})
    compile: str = field(default="trace", metadata={"help": "per-step graphs of the vmap engine: trace (make_fx, traced once per shape bucket and replayed) | inductor (torch.compile per bucket) | off (eager)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    seed: int = field(default=0, metadata={"help": "seed of everything random in the run"})
    # torch.distributed (read only under torchrun; see spfl_vmap.distributed)
    dist_backend: str = field(default="auto", metadata={"help": "under torchrun: the torch.distributed backend, auto (nccl on CUDA, gloo on the CPU) | gloo | nccl"})
    dist_timeout: float = field(default=600.0, metadata={"help": "under torchrun: seconds a collective waits for the other processes before the job fails"})
    dist_gather: bool = field(default=False, metadata={"help": "under torchrun: gather every update row on every process, whatever the rule and attack (bit-identical to one process; default: rows stay in their process where the rule and attack allow it: partial sums, distance blocks, column blocks, attack statistics by collectives)"})
    # evaluation and outputs
    frequency_of_the_test: int = field(default=5, metadata={"help": "evaluate every K rounds (and at the last)"})
    eval_batch_size: int = field(default=2000, metadata={"help": "batch size of the global test evaluation"})
    out: Optional[str] = field(default=None, metadata={"help": "run directory (default runs/<timestamp>-<name>)"})
    name: Optional[str] = field(default=None, metadata={"help": "run name used in the default run directory"})
    checkpoint_every: int = field(default=0, metadata={"help": "write a checkpoint every K rounds (0 = never)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    max_rejected_rounds: int = field(default=5, metadata={"help": "stop the run after K consecutive rejected rounds (every update or the aggregate non-finite); 0 = never"})
    # Byzantine resilience (original toolkit flag names)
    byzantine_aggregate: bool = field(default=False, metadata={"help": "original toolkit switch; the module is on whenever --by_attack/--by_defense is set"})
    by_defense: str = field(default="mean", metadata={"help": "aggregator: mean | median | trimmed_mean | krum | multi_krum | bulyan | dnc | geomed | centered_clipping | signguard | norm_clip | rlr | foolsgold | flame | fltrust"})
    root_samples: Optional[int] = field(default=None, metadata={"help": "server root set: class-stratified training samples held out from every client (FLTrust; default 100 with --by_defense fltrust, else 0)"})
    by_defense_params: str = field(default="", metadata={"help": "aggregator hyperparameters, e.g. 'beta=0.1' or 'tau=5,n_iter=3'"})
    by_attack: str = field(default="none", metadata={"help": "attack: none | gaussian | sign_flip | label_flip | alie | ipm | min_max | min_sum | fang | nan | inf"})
    by_attack_params: str = field(default="", metadata={"help": "attack hyperparameters, e.g. 'sigma=200' or 'perturbation=sign'"})
    by_workers: int = field(default=0, metadata={"help": "number of Byzantine clients"})
    by_frac: float = field(default=0.0, metadata={"help": "fraction of Byzantine clients (alternative to --by_workers)"})
    by_mode: str = field(default="fixed", metadata={"help": "fixed: a fixed set of malicious client ids; per_round: exactly by_workers malicious in every cohort"})
    by_f: Optional[int] = field(default=None, metadata={"help": "f the aggregator assumes (default: expected malicious clients per round)"})
    all_grads: bool = field(default=True, metadata={"help": "omniscient attacker that sees all benign updates; --no-all_grads: only its own"})
    # differential privacy (original toolkit flag names where they exist)
    differential_privacy: bool = field(default=False, metadata={"help": "original toolkit switch; same as --dp_mode example"})
    dp_mode: str = field(default="none", metadata={"help": "none | example (DP-SGD per client) | user (DP-FedAvg) | local (each client noises its update)"})
    dp_sigma: Optional[float] = field(default=None, metadata={"help": "noise multiplier sigma (default 1.0, or calibrated to --target_epsilon; given together with --target_epsilon, the run stops at the budget)"})
    dp_delta: Optional[float] = field(default=None, metadata={"help": "delta (default 1/n: dataset size for example level, population for user level)"})
    grad_norm: float = field(default=1.0, metadata={"help": "clip norm: per-sample gradient (example) or whole update (user, local)"})
    target_epsilon: Optional[float] = field(default=None, metadata={"help": "calibrate --dp_sigma so that the whole run spends this epsilon"})
    accountant: str = field(default="rdp", metadata={"help": "rdp | prv"})
    dp_adaptive_clip: bool = field(default=False, metadata={"help": "user level: adaptive clipping to a norm quantile (Andrew et al. 2021)"})
    dp_clip_quantile: float = field(default=0.5, metadata={"help": "target quantile of adaptive clipping"})
    dp_clip_lr: float = field(default=0.2, metadata={"help": "geometric learning rate of adaptive clipping"})
    dp_epsilon_json: bool = field(default=False, metadata={"help": "also write epsilons.json: {client_id: epsilon} as the original toolkit did"})
    # backdoor (BadNets, Gu et al. 2017; DBA, Xie et al. 2020; model replacement, Bagdasaryan et al. 2020);
    # the malicious clients are the Byzantine ones (--by_workers / --by_frac / --by_mode)
    bd_attack: str = field(default="none", metadata={"help": "backdoor attack: none | badnets | dba (each attacker embeds one of 4 local triggers)"})
    bd_target: int = field(default=7, metadata={"help": "target label of the backdoor"})
    bd_source: Optional[int] = field(default=None, metadata={"help": "one-to-one: only samples of this class are poisoned (default all-to-one)"})
    bd_trigger: str = field(default="square", metadata={"help": "trigger: square | plus (the toolkit's 3x3 plus at (2,2)) | rlr_plus (RLR's FashionMNIST plus)"})
    bd_trigger_size: int = field(default=3, metadata={"help": "side of the square trigger"})
    bd_trigger_location: str = field(default="bottom_right", metadata={"help": "square trigger: top_left | top_right | bottom_left | bottom_right | center | 'row,col'"})
    bd_poison_frac: float = field(default=0.5, metadata={"help": "fraction of each malicious batch that is poisoned (one-to-one: of its source-class samples)"})
    bd_boost: Optional[float] = field(default=None, metadata={"help": "model replacement: scale the malicious updates by this gamma (default no boost)"})
    bd_boost_auto: bool = field(default=False, metadata={"help": "model replacement with gamma = clients this round / server lr"})
    bd_project: Optional[float] = field(default=None, metadata={"help": "constrain-and-scale: project each malicious update onto the L2 ball of this radius, before the boost (TFF's norm_bound 0.33)"})
    bd_neurotoxin: Optional[float] = field(default=None, metadata={"help": "Neurotoxin: keep this fraction of coordinates, those the last global update changed least (the authors' gradmask_ratio, 0.95-0.99 in their scripts)"})
    bd_schedule: str = field(default="continuous", metadata={"help": "rounds the backdoor attackers act in: continuous | single:R | every:K (rounds 1, K+1, ...) | from:R"})
    bd_defense: str = field(default="none", metadata={"help": "none | toolkit_clip_noise (per-layer clip + per-client noise) | norm_bound (Sun et al. 2019: whole-update clip, noise on the aggregate)"})
    bd_clip: float = field(default=1.0, metadata={"help": "clip bound of --bd_defense: per tensor (per_layer, the toolkit's shrink) or per update (global, norm_bound)"})
    bd_noise: float = field(default=0.0, metadata={"help": "Gaussian noise std of --bd_defense: per client (toolkit) or on the aggregate (norm_bound; see --bd_noise_on)"})
    bd_clip_mode: Optional[str] = field(default=None, metadata={"help": "toolkit_clip_noise: per_layer (the toolkit's, default) | global (whole update, Sun et al. 2019)"})
    bd_noise_on: Optional[str] = field(default=None, metadata={"help": "toolkit_clip_noise: client (each update, the toolkit's, default) | aggregate (Sun et al. 2019)"})
    backdoor_test: bool = field(default=False, metadata={"help": "original toolkit switch: its backdoor attack (badnets, plus trigger, target 7, clients index % --backdoor_test_frequency == 0, default 10)"})
    backdoor_test_frequency: Optional[int] = field(default=None, metadata={"help": "original toolkit: the malicious clients are those with client index % K == 0 (instead of --by_workers/--by_frac)"})
    backdoor_test_boost: Optional[float] = field(default=None, metadata={"help": "original toolkit name of --bd_boost"})
    backdoor_defense: bool = field(default=False, metadata={"help": "original toolkit switch; same as --bd_defense toolkit_clip_noise"})
    backdoor_defense_shrink: Optional[float] = field(default=None, metadata={"help": "original toolkit name of --bd_clip for toolkit_clip_noise"})
    backdoor_defense_noise: Optional[float] = field(default=None, metadata={"help": "original toolkit name of --bd_noise for toolkit_clip_noise"})
    # CRFL (Xie et al. ICML 2021): clip the global model and noise it every round; certify with `spfl certify`
    crfl: bool = field(default=False, metadata={"help": "CRFL: after each round clip the global model to L2 norm rho_t and add N(0, crfl_sigma^2) to it (needs a plain SGD server)"})
    crfl_rho: float = field(default=15.0, metadata={"help": "CRFL clip norm of the whole global model (the cap of the schedule; the authors' MNIST value is 15)"})
    crfl_rho_init: Optional[float] = field(default=None, metadata={"help": "CRFL's growing clip rho_t = min(crfl_rho, crfl_rho_init + crfl_rho_step * t) (authors' MNIST: 2 and 0.1); default: constant --crfl_rho"})
    crfl_rho_step: float = field(default=0.0, metadata={"help": "growth of the CRFL clip per round (needs --crfl_rho_init)"})
    crfl_sigma: float = field(default=0.01, metadata={"help": "CRFL Gaussian noise std added to the global model each round (authors' MNIST: 0.01)"})
    # data-inference defenses: ATS image transformations (Gao et al. CVPR 2021; the toolkit's flag names)
    # and gradient pruning (Zhu et al. 2019)
    data_recovery_protection: bool = field(default=False, metadata={"help": "ATS: train every client on images transformed by the dataset's ATS policies (default: the top --topn 2, each image draws one)"})
    augid: Optional[int] = field(default=None, metadata={"help": "ATS: use policy N of the dataset/model's list (the toolkit's --augid)"})
    topn: Optional[int] = field(default=None, metadata={"help": "ATS: each image draws one of the top N policies of the list (the toolkit's --topn; default 2)"})
    ats_policy: Optional[str] = field(default=None, metadata={"help": "ATS: an explicit policy of sub-policy ids such as 3-1-7, or a hybrid 3-1-7+43-18-18"})
    ats_use_prob: bool = field(default=False, metadata={"help": "ATS: apply each op with its listed probability (ATS's code applies every op)"})
    grad_prune: Optional[float] = field(default=None, metadata={"help": "gradient pruning (Zhu et al. 2019): zero each update's entries below this quantile of |entry| in each layer, e.g. 0.6"})
    ats_policy_file: Optional[str] = field(default=None, metadata={"help": "ATS: a ranked policy CSV (spfl ats-search's ats_search.csv) whose kept policies replace the dataset's list for --augid/--topn"})
    ats_list: Optional[str] = field(default=None, metadata={"help": "ATS: the built-in policy list --augid/--topn choose from, NAME or NAME/MODEL: mnistRGB, cifar10, cifar100 (the toolkit's) or fashion_mnist (our search); default the dataset's"})
    soteria_rate: Optional[float] = field(default=None, metadata={"help": "Soteria (Sun et al. CVPR 2021): zero this fraction of the last layer's weight-gradient columns, the features of smallest ||dr/dx||/(r+0.1); Soteria's --pruning_rate 60 is 0.6"})
    soteria_samples: Optional[int] = field(default=None, metadata={"help": "Soteria: compute the ratio on at most this many of each client's samples (default: all the samples its upload is computed on)"})
    audit_inversion: Optional[str] = field(default=None, metadata={"help": "audit during training: attack honest clients' uploads with dlg, idlg or ig every --audit_every rounds (read-only; audit_psnr/audit_ssim/audit_label_acc in metrics.jsonl)"})
    audit_every: Optional[int] = field(default=None, metadata={"help": "audit every K rounds (default 1)"})
    audit_clients: Optional[int] = field(default=None, metadata={"help": "audit the first M honest clients of the cohort holding >= --audit_batch samples (default 1)"})
    audit_batch: Optional[int] = field(default=None, metadata={"help": "images per audited upload: each audited client's first B samples (default 1)"})
    audit_restarts: Optional[int] = field(default=None, metadata={"help": "attack restarts per audited client (default 1)"})
    audit_iterations: Optional[int] = field(default=None, metadata={"help": "attack iterations per audit (default 100, CPU-friendly; spfl invert's ig uses 4800)"})

    def __post_init__(self) -> None:
        check_types(self)
        for name in NORMALIZERS.names():  # canonical names for aliases (the original toolkit's spellings)
            for k, v in NORMALIZERS.get(name)(self).items():
                object.__setattr__(self, k, v)
        if self.model in MODEL_ALIASES:
            object.__setattr__(self, "model", MODEL_ALIASES[self.model])
        need(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS.names())}")
        need(self.model in MODELS, f"unknown model {self.model!r}; choose one of: {', '.join(MODELS.names())}")
        need(self.partition_method in PARTITIONS, f"--partition_method must be one of {PARTITIONS}, got {self.partition_method!r}")
        need(self.client_optimizer in CLIENT_OPTIMIZERS, f"--client_optimizer must be one of {CLIENT_OPTIMIZERS}, got {self.client_optimizer!r}")
        need(self.server_optimizer in SERVER_OPTIMIZERS, f"--server_optimizer must be one of {SERVER_OPTIMIZERS}, got {self.server_optimizer!r}")
        need(self.engine in ENGINES, f"--engine must be one of {ENGINES}, got {self.engine!r}")
        need(self.strategy in STRATEGIES, f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        need(self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}")
        need(self.client_num_in_total >= 1, f"--client_num_in_total must be >= 1, got {self.client_num_in_total}")
        need(self.client_num_per_round >= 1, f"--client_num_per_round must be >= 1, got {self.client_num_per_round}")
        need(
            self.client_num_per_round <= self.client_num_in_total,
            f"--client_num_per_round ({self.client_num_per_round}) cannot exceed --client_num_in_total ({self.client_num_in_total})",
        )
        need(self.comm_round >= 1, f"--comm_round must be >= 1, got {self.comm_round}")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}")
        for name in ("lr", "wd", "momentum", "server_momentum", "partition_alpha"):
            v = getattr(self, name)
            need(math.isfinite(v) and v >= 0, f"--{name} must be a finite number >= 0, got {v}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.momentum < 1 and self.server_momentum < 1, "momentum must be < 1")
        if self.partition_method == "hetero":
            need(self.partition_alpha > 0, f"--partition_alpha must be > 0 for hetero, got {self.partition_alpha}")
        need(self.partition_min_samples >= 1, "--partition_min_samples must be >= 1")
        if self.server_lr is not None:
            need(math.isfinite(self.server_lr) and self.server_lr > 0, f"--server_lr must be > 0, got {self.server_lr}")
        need(self.frequency_of_the_test >= 1, "--frequency_of_the_test must be >= 1")
        need(self.eval_batch_size >= 1, "--eval_batch_size must be >= 1")
        need(self.client_chunk >= 0, "--client_chunk must be >= 0")
        need(self.compile in COMPILE_MODES, f"--compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        need(self.checkpoint_every >= 0, "--checkpoint_every must be >= 0")
        need(self.max_rejected_rounds >= 0, "--max_rejected_rounds must be >= 0")
        need(self.model_width >= 1, "--model_width must be >= 1")
        need(self.synthetic_train >= 1 and self.synthetic_test >= 1, "synthetic sizes must be >= 1")
        need(0 <= self.seed < 2**63, "--seed must be in [0, 2^63)")
        meta = dataset_meta(self.dataset)
        check_model_input(self.model, meta.input_shape, self.dataset)
        for name in SECTIONS.names():  # each module validates its own section
            SECTIONS.get(name)(self)
        for rule in RULES.names():  # rules that span modules (registered by the builder)
            RULES.get(rule)(self)

    # ---- derived values -------------------------------------------------------------------
    @property
    def effective_server_lr(self) -> float:
        if self.server_lr is not None:
            return self.server_lr
        return self.lr if self.use_gradient else 1.0

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """Build from a mapping; keys may use dashes; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        norm = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(norm) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        hints = field_types()
        return cls(**{k: coerce(k, v, hints[k]) for k, v in norm.items()})


def check_types(cfg: "Config") -> None:
    """Each field holds its declared type: ``Config(lr="0.1")`` or ``Config(comm_round=2.5)`` is an
    error, not a run with a string learning rate. (Config files and flags are coerced first.)"""
    hints = field_types()
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        tp = hints[f.name]
        if v is None and base_type(tp) is not tp:  # Optional[...]
            continue
        bt = base_type(tp)
        ok = (isinstance(v, bool) if bt is bool else
              isinstance(v, int) and not isinstance(v, bool) if bt is int else
              isinstance(v, (int, float)) and not isinstance(v, bool) if bt is float else
              isinstance(v, bt))
        if not ok:
            raise ConfigError(f"{f.name} must be {'an' if bt is int else 'a'} {bt.__name__}, got {type(v).__name__} {v!r}")
        if bt is float and not isinstance(v, float):
            object.__setattr__(cfg, f.name, float(v))  # an int where a float is declared


def resume_mismatches(saved: dict[str, Any], cfg: "Config") -> list[str]:
    """``name (saved -> now)`` for every result-affecting field where ``cfg`` differs from the
    config a run was checkpointed with (fields absent from ``saved`` are taken at their default)."""
    defaults = {f.name: f.default for f in fields(Config)}
    now = cfg.to_dict()
    out = []
    for k in sorted(now):
        if k in RESUMABLE_CHANGES:
            continue
        before = saved.get(k, defaults[k])
        if before != now[k]:
            out.append(f"{k} ({before!r} -> {now[k]!r})")
    return out


def field_types() -> dict[str, Any]:
    return get_type_hints(Config)


def base_type(tp: Any) -> type:
    """``Optional[float]`` -> ``float``."""
    args = getattr(tp, "__args__", None)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0]
    return tp


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/JSON/CLI value to the field's type, with a one-line error on failure."""
    if value is None:
        return None
    bt = base_type(tp)
    try:
        if bt is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if bt is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if bt is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} expects {bt.__name__}, got {value!r}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of config fields."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise ConfigError(f"cannot parse config file {str(p)!r}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of flag names to values")
    return data
