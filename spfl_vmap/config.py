"""Run configuration: one frozen dataclass, validated before any work starts.

Field names are the original toolkit's flag names (``--client_num_in_total``, ``--comm_round``,
``--partition_method`` ...) so its users' scripts carry over; the CLI accepts each with dashes or
underscores. A YAML/JSON file (``--config``) may supply any field; flags given on the command
line override it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, get_type_hints

from .errors import ConfigError

PARTITIONS = ("homo", "hetero", "shards")
CLIENT_OPTIMIZERS = ("sgd", "adam")
SERVER_OPTIMIZERS = ("sgd", "adam")
ENGINES = ("vmap", "loop")
STRATEGIES = ("auto", "vmap", "loop")
DEVICES = ("auto", "cpu", "cuda")
DP_MODES = ("none", "example", "user", "local")
# keyword arguments the engine passes itself; users may not set them in *_params
ENGINE_KWARGS = {"weights", "f", "state", "generator", "knowledge", "aggregator", "malicious"}


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
    import inspect

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
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    seed: int = field(default=0, metadata={"help": "seed of everything random in the run"})
    # evaluation and outputs
    frequency_of_the_test: int = field(default=5, metadata={"help": "evaluate every K rounds (and at the last)"})
    eval_batch_size: int = field(default=2000, metadata={"help": "batch size of the global test evaluation"})
    out: Optional[str] = field(default=None, metadata={"help": "run directory (default runs/<timestamp>-<name>)"})
    name: Optional[str] = field(default=None, metadata={"help": "run name used in the default run directory"})
    checkpoint_every: int = field(default=0, metadata={"help": "write a checkpoint every K rounds (0 = never)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    # Byzantine resilience (original toolkit flag names)
    byzantine_aggregate: bool = field(default=False, metadata={"help": "original toolkit switch; the module is on whenever --by_attack/--by_defense is set"})
    by_defense: str = field(default="mean", metadata={"help": "aggregator: mean | median | trimmed_mean | krum | multi_krum | bulyan | dnc | geomed | centered_clipping | signguard | norm_clip"})
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

    def __post_init__(self) -> None:
        from .data import DATASETS, dataset_meta
        from .models import MODELS, check_model_input

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

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
        need(self.checkpoint_every >= 0, "--checkpoint_every must be >= 0")
        need(self.model_width >= 1, "--model_width must be >= 1")
        need(self.synthetic_train >= 1 and self.synthetic_test >= 1, "synthetic sizes must be >= 1")
        need(0 <= self.seed < 2**63, "--seed must be in [0, 2^63)")
        meta = dataset_meta(self.dataset)
        check_model_input(self.model, meta.input_shape, self.dataset)
        self._validate_byzantine(need)
        self._validate_privacy(need)

    def _validate_byzantine(self, need) -> None:
        from .aggregators import AGGREGATORS
        from .attacks import ATTACKS

        need(self.by_defense in AGGREGATORS, f"unknown --by_defense {self.by_defense!r}; choose one of: {', '.join(AGGREGATORS.names())}")
        need(self.by_attack in ATTACKS, f"unknown --by_attack {self.by_attack!r}; choose one of: {', '.join(ATTACKS.names())}")
        need(self.by_mode in ("fixed", "per_round"), f"--by_mode must be fixed or per_round, got {self.by_mode!r}")
        need(self.by_workers >= 0, "--by_workers must be >= 0")
        need(0.0 <= self.by_frac < 1.0, f"--by_frac must be in [0, 1), got {self.by_frac}")
        need(not (self.by_workers and self.by_frac), "give --by_workers or --by_frac, not both")
        limit = self.client_num_per_round if self.by_mode == "per_round" else self.client_num_in_total
        need(self.num_byzantine <= limit, f"{self.num_byzantine} Byzantine clients exceed the {limit} clients available")
        need(self.by_attack == "none" or self.num_byzantine > 0, f"--by_attack {self.by_attack} needs --by_workers or --by_frac > 0")
        if self.by_f is not None:
            need(0 <= self.by_f < self.client_num_per_round, "--by_f must be in [0, client_num_per_round)")
        n, f = self.client_num_per_round, self.assumed_f
        # Blanchard et al. 2017 (Krum: n >= 2f+3 when f > 0); El Mhamdi et al. 2018 (Bulyan: n >= 4f+3)
        rule = {"krum": ("2f+3", 2 * f + 3 if f else 0), "multi_krum": ("2f+3", 2 * f + 3 if f else 0),
                "bulyan": ("4f+3", 4 * f + 3)}.get(self.by_defense)
        if rule is not None:
            need(n >= rule[1], f"--by_defense {self.by_defense} needs n >= {rule[0]} = {rule[1]} clients per round for f={f} "
                               f"(got {n}); raise --client_num_per_round or lower --by_f / the Byzantine count")
        check_params("--by_defense_params", AGGREGATORS.get(self.by_defense), self.by_defense_params)
        check_params("--by_attack_params", ATTACKS.get(self.by_attack), self.by_attack_params)

    def _validate_privacy(self, need) -> None:
        need(self.dp_mode in DP_MODES, f"--dp_mode must be one of {DP_MODES}, got {self.dp_mode!r}")
        need(self.accountant in ("rdp", "prv"), f"--accountant must be rdp or prv, got {self.accountant!r}")
        if self.effective_dp_mode == "none":
            return
        if self.dp_sigma is not None:
            need(math.isfinite(self.dp_sigma) and self.dp_sigma > 0, f"--dp_sigma must be > 0 (sigma 0 gives epsilon = inf), got {self.dp_sigma}")
        need(self.grad_norm > 0, f"--grad_norm must be > 0, got {self.grad_norm}")
        if self.dp_delta is not None:
            need(0 < self.dp_delta < 1, f"--dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.target_epsilon is not None:
            need(math.isfinite(self.target_epsilon) and self.target_epsilon > 0, "--target_epsilon must be > 0")
        need(0 < self.dp_clip_quantile < 1 and self.dp_clip_lr > 0, "--dp_clip_quantile must be in (0, 1) and --dp_clip_lr > 0")
        need(not (self.dp_adaptive_clip and self.effective_dp_mode != "user"), "--dp_adaptive_clip applies to --dp_mode user only")
        need(not self.use_gradient or self.effective_dp_mode != "example", "--dp_mode example trains with DP-SGD; it cannot be combined with --use_gradient")
        need(self.engine == "vmap" or self.effective_dp_mode != "example", "--dp_mode example needs --engine vmap (DP-SGD is vectorized)")
        if self.effective_dp_mode == "user":
            need(self.by_defense == "mean", "--dp_mode user sums clipped updates; it cannot be combined with a robust --by_defense")

    # ---- derived values -------------------------------------------------------------------
    @property
    def effective_server_lr(self) -> float:
        if self.server_lr is not None:
            return self.server_lr
        return self.lr if self.use_gradient else 1.0

    @property
    def num_byzantine(self) -> int:
        """Byzantine clients in the population (fixed mode) or per cohort (per_round mode)."""
        if self.by_workers:
            return self.by_workers
        base = self.client_num_per_round if self.by_mode == "per_round" else self.client_num_in_total
        return int(round(self.by_frac * base))

    @property
    def assumed_f(self) -> int:
        """The f robust aggregators assume: ``--by_f``, else the malicious count per cohort
        (per_round mode) or its expectation (fixed mode)."""
        if self.by_f is not None:
            return self.by_f
        if self.by_mode == "per_round":
            return self.num_byzantine
        return int(round(self.num_byzantine * self.client_num_per_round / self.client_num_in_total))

    @property
    def byzantine_on(self) -> bool:
        return self.byzantine_aggregate or self.by_attack != "none" or self.by_defense != "mean"

    @property
    def effective_dp_mode(self) -> str:
        if self.dp_mode == "none" and self.differential_privacy:
            return "example"
        return self.dp_mode

    def attack_kwargs(self) -> dict[str, Any]:
        return parse_params(self.by_attack_params)

    def defense_kwargs(self) -> dict[str, Any]:
        return parse_params(self.by_defense_params)

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
