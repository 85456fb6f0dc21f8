"""Data-inference defenses as round stages: ATS image transformations, Soteria and gradient pruning.

* :class:`ATSTransform` (batch transform, ``--data_recovery_protection``): every client trains on
  images transformed by ATS policies (Gao et al., "Privacy-preserving Collaborative Learning with
  Automatic Transformation Search", CVPR 2021), so what it uploads is the gradient of transformed
  images. It is a client-side defense: it acts on every client's training batches, honest or
  not, and never on the evaluation (the toolkit's validation set is unpolicied by default).
* :class:`GradientPruning` (update stage, ``--grad_prune``): each client zeroes the entries of
  its update below the ``rate`` quantile of their layer (Zhu et al., "Deep Leakage from
  Gradients", NeurIPS 2019).
* :class:`SoteriaPruning` (update stage, ``--soteria_rate``): each client zeroes the last layer's
  weight-gradient columns of the representation features that leak the most (Sun et al., CVPR 2021).

The toolkit's flags (csl-cqu/Roubst-and-Privacy-preserving-Federated-Learning-System,
``main_fedavg.py`` and ``modules/data_inference_defense/defense/defense.py::get_policy``):
``--data_recovery_protection`` switches ATS on; ``--augid N`` uses policy ``N`` of the list for the
dataset and model; otherwise ``--topn K`` (default 2) makes a hybrid of the top ``K`` policies, in
which each image draws one uniformly (``PolicyHybrid``). ``--ats_policy 3-1-7`` (or a hybrid
``3-1-7+43-18-18``) gives a policy directly. The lists (:data:`spfl_vmap.defenses.ats.POLICY_LISTS`)
are the toolkit's ``policy_list_*.csv`` for mnistRGB, CIFAR-10 and CIFAR-100, and our own search's
for 1-channel FashionMNIST and MNIST (``docs/results/ats_search_fashion_mnist_cnn.csv``; the
toolkit's mnistRGB list barely changes those images). ``--ats_list NAME`` chooses another
built-in list, e.g. ``--ats_list mnistRGB`` for the toolkit's on FashionMNIST, and the
toolkit's ``--dataset mnistRGB`` gets its own. ``--ats_policy_file CSV`` replaces the list with the kept
policies of a ranked CSV written by ``spfl ats-search`` (ATS's own search,
``spfl_vmap.experiments.ats_search``), and ``--augid``/``--topn`` then choose from it.
Like the toolkit, a model without a list of its own for the dataset uses the dataset's first list.

What differs from the toolkit: its pipelines also crop, flip and cut out CIFAR images
(``RandomCrop(32, 4)``, ``RandomHorizontalFlip``, ``Cutout(16)``), which are data augmentation
rather than the defense and are not applied here; the transforms compute in float without PIL's
rounding to 8 bits after each op (``spfl_vmap.defenses.ats`` says where that matters).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any, Callable, Optional

import torch

from ..attacks.backdoor import content_keys, hash_uniform
from ..attacks.inversion import ATTACK_NAMES, Upload, invert, pixel_box
from ..attacks.inversion_metrics import reconstruction_metrics, to_unit
from ..config import NORMALIZERS, SECTIONS, Config, need
from ..data import PackedClients
from ..distributed import extremes
from ..data.loaders import PIXEL_NORMALIZATION
from ..defenses.ats import (LIST_ORIGINS, POLICY_LISTS, Policy, apply_policy, describe_policy, num_draws, parse_policies, parse_policy,
                            policy_name)
from ..defenses.ats_search import read_policy_csv
from ..defenses.pruning import prune_per_layer
from ..defenses.soteria import prune_columns, representation_model, representation_ratios, soteria_keep
from ..errors import ConfigError
from ..stages import Audit, BatchTransform, BuildEnv, EvalHook, Metrics, Pipeline, RoundContext, Stage, UpdateStage

TOOLKIT_TOPN = 2  # main_fedavg.py: --topn default
# --audit_* defaults, small enough for a CPU run: one client, one image, one restart, 100 iterations
AUDIT_DEFAULTS = {"audit_every": 1, "audit_clients": 1, "audit_batch": 1, "audit_restarts": 1, "audit_iterations": 100}
# our dataset -> the name of its policy list in POLICY_LISTS: the toolkit's policy_list_{name}.csv,
# except 1-channel FashionMNIST and MNIST, which get our own search's list (the toolkit has none
# for them; its mnistRGB list, autocontrast/posterize policies, leaves FashionMNIST nearly intact)
LIST_OF_DATASET = {"mnist_rgb": "mnistRGB", "mnist": "fashion_mnist", "fashion_mnist": "fashion_mnist", "cifar10": "cifar10",
                   "cifar100": "cifar100"}
DATASET_ALIASES = {"mnistRGB": "mnist_rgb"}  # the toolkit's dataset name (test/datarecovery_defense.sh)


# ---- the config section -----------------------------------------------------------------------
@NORMALIZERS.register("inference")
def toolkit_dataset_name(cfg: Config) -> dict[str, Any]:
    """The toolkit's ``--dataset mnistRGB`` is our ``mnist_rgb`` (MNIST as 3x32x32)."""
    return {"dataset": DATASET_ALIASES[cfg.dataset]} if cfg.dataset in DATASET_ALIASES else {}


def policy_list(cfg: Config) -> tuple[str, tuple[str, ...]]:
    """``("mnistRGB/convnet", policies)``: the built-in list for ``cfg``'s dataset and model.

    The list is ``--ats_list NAME[/MODEL]`` when given, else the dataset's
    (:data:`LIST_OF_DATASET`). A model without its own list gets the first model's (the
    toolkit's ``get_policy`` does the same, with a warning). A dataset without a list is a
    :class:`ConfigError`. With ``--ats_policy_file`` the list is that file's kept policies
    (``spfl ats-search``'s ranked CSV).
    """
    if cfg.ats_policy_file is not None:
        return cfg.ats_policy_file, read_policy_csv(cfg.ats_policy_file)
    names = sorted({d for (d, _) in POLICY_LISTS})
    if cfg.ats_list is not None:
        name, _, model = cfg.ats_list.partition("/")
        if name not in names:
            raise ConfigError(f"unknown --ats_list {cfg.ats_list!r}; the built-in lists are {', '.join(names)} (NAME or NAME/MODEL)")
        models = [m for (d, m) in POLICY_LISTS if d == name]
        if model and model not in models:
            raise ConfigError(f"--ats_list {cfg.ats_list}: the list {name} exists for the models {', '.join(models)}")
        model = model or (cfg.model if cfg.model in models else models[0])
        return f"{name}/{model}", POLICY_LISTS[(name, model)]
    name = LIST_OF_DATASET.get(cfg.dataset)
    if name is None:
        known = ", ".join(sorted(LIST_OF_DATASET))
        raise ConfigError(f"--data_recovery_protection: no ATS policy list for dataset {cfg.dataset} (lists exist for {known}); "
                          f"give a policy with --ats_policy, e.g. --ats_policy 3-1-7, or a list with --ats_list "
                          f"({', '.join(names)})")
    models = [m for (d, m) in POLICY_LISTS if d == name]
    model = cfg.model if cfg.model in models else models[0]
    return f"{name}/{model}", POLICY_LISTS[(name, model)]


def list_origin(cfg: Config) -> str:
    """Where ``cfg``'s ATS policies come from, in words (for the run's description and console)."""
    if cfg.ats_policy is not None:
        return "given with --ats_policy"
    if cfg.ats_policy_file is not None:
        return f"the kept policies of --ats_policy_file {cfg.ats_policy_file}"
    name = cfg.ats_list.partition("/")[0] if cfg.ats_list is not None else LIST_OF_DATASET[cfg.dataset]
    return LIST_ORIGINS[name]


def resolve_policies(cfg: Config) -> tuple[str, tuple[Policy, ...]]:
    """``(where they come from, the policies)`` that ATS applies for ``cfg`` (validated config)."""
    if cfg.ats_policy is not None:
        return "--ats_policy", parse_policies(cfg.ats_policy)
    source, names = policy_list(cfg)
    if cfg.augid is not None:
        return f"{source}[{cfg.augid}]", (parse_policy(names[cfg.augid]),)
    k = cfg.topn if cfg.topn is not None else min(TOOLKIT_TOPN, len(names))
    return f"{source}[:{k}]", tuple(parse_policy(s) for s in names[:k])


def ats_on(cfg: Config) -> bool:
    return cfg.data_recovery_protection


@SECTIONS.register("inference")
def validate(cfg: Config) -> None:
    """``--data_recovery_protection`` with at most one of ``--augid`` / ``--topn`` /
    ``--ats_policy``, each within the list (the dataset's, or ``--ats_policy_file``'s);
    ``--grad_prune`` and ``--soteria_rate`` fractions in ``(0, 1)``."""
    if cfg.grad_prune is not None:
        r = cfg.grad_prune
        need(math.isfinite(r) and 0.0 < r < 1.0,
             f"--grad_prune is the fraction of each layer pruned, in (0, 1) (Soteria's --pruning_rate 60 is 0.6), got {r}")
    if cfg.soteria_rate is not None:
        r = cfg.soteria_rate
        need(math.isfinite(r) and 0.0 < r < 1.0, f"--soteria_rate is the fraction of the last layer's features pruned, in (0, 1) "
                                                 f"(Soteria's --pruning_rate 60 is --soteria_rate 0.6), got {r}")
    if cfg.soteria_samples is not None:
        need(cfg.soteria_rate is not None, "--soteria_samples sets how Soteria computes its ratio: add --soteria_rate")
        need(cfg.soteria_samples >= 1, f"--soteria_samples must be >= 1, got {cfg.soteria_samples}")
    validate_audit(cfg)
    given = [f"--{k}" for k in ("augid", "topn", "ats_policy") if getattr(cfg, k) is not None]
    if not ats_on(cfg):
        given += ["--ats_policy_file"] if cfg.ats_policy_file is not None else []
        given += ["--ats_use_prob"] if cfg.ats_use_prob else []
        given += ["--ats_list"] if cfg.ats_list is not None else []
        need(not given, f"{', '.join(given)} choose the ATS policies: add --data_recovery_protection")
        return
    need(len(given) <= 1, f"give one of --augid, --topn, --ats_policy, not {' and '.join(given)}")
    need(cfg.ats_policy is None or cfg.ats_policy_file is None,
         "give one of --ats_policy, --ats_policy_file, not both (--augid/--topn choose from the file)")
    lists = [f"--{k}" for k in ("ats_list", "ats_policy_file", "ats_policy") if getattr(cfg, k) is not None]
    need(cfg.ats_list is None or len(lists) == 1, f"give one of {', '.join(lists)}, not both")
    if cfg.ats_policy is not None:
        parse_policies(cfg.ats_policy)  # one-line error on a bad id
        return
    source, names = policy_list(cfg)
    if cfg.augid is not None:
        need(0 <= cfg.augid < len(names), f"--augid {cfg.augid} is out of range: the ATS list {source} has {len(names)} "
                                          f"policies (0..{len(names) - 1})")
    if cfg.topn is not None:
        need(1 <= cfg.topn <= len(names), f"--topn {cfg.topn}: the ATS list {source} has {len(names)} policies "
                                          f"(--topn 1..{len(names)})")


def validate_audit(cfg: Config) -> None:
    """``--audit_inversion`` one of the attacks; the other ``--audit_*`` flags need it and are >= 1."""
    given = [f"--{k}" for k in AUDIT_DEFAULTS if getattr(cfg, k) is not None]
    if cfg.audit_inversion is None:
        need(not given, f"{', '.join(given)} set up the inversion audit: add --audit_inversion {{{','.join(ATTACK_NAMES)}}}")
        return
    need(cfg.audit_inversion in ATTACK_NAMES,
         f"unknown --audit_inversion {cfg.audit_inversion!r}; choose one of: {', '.join(ATTACK_NAMES)}")
    for k in AUDIT_DEFAULTS:
        v = getattr(cfg, k)
        need(v is None or v >= 1, f"--{k} must be >= 1, got {v}")
    need(cfg.use_gradient or cfg.client_optimizer == "sgd",
         "--audit_inversion models a FedAvg client's local SGD steps; --client_optimizer adam is not modelled: "
         "use sgd, or audit gradients with --use_gradient")


def audit_setting(cfg: Config, key: str) -> int:
    """The value of ``--{key}``, or its default (:data:`AUDIT_DEFAULTS`)."""
    v = getattr(cfg, key)
    return AUDIT_DEFAULTS[key] if v is None else int(v)


# ---- uploads as the attacker sees them ------------------------------------------------------------
def upload_model(cfg: Config, batch: int) -> Upload:
    """The attacker's model of a client's upload computed on ``batch`` images.

    The attacker knows the architecture, the global parameters, ``batch``, and for FedAvg the
    local epochs, lr, momentum and weight decay. It models a local update as ``epochs *
    ceil(batch / batch_size)`` SGD steps on all ``batch`` images; with ``batch <= --batch_size``
    (one step per epoch) that is exactly what the trainer does, with a larger ``batch`` it is an
    approximation (the client's shuffled mini-batches are unknown to the server). It does not
    model the defenses: those are what the attack is measured against.
    """
    if cfg.use_gradient:
        return Upload("gradient")
    steps = cfg.epochs * -(-batch // cfg.batch_size)
    return Upload("update", steps=steps, lr=float(cfg.lr), momentum=float(cfg.momentum), wd=float(cfg.wd))


def fresh_uploads(
    cfg: Config, env: BuildEnv, pipeline: Pipeline, make_trainer: Callable[[BuildEnv], Any], ctx: RoundContext, batch: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What clients ``ctx.client_ids`` upload at ``ctx.global_params`` when each holds only its
    first ``batch`` samples (its partition order): the engine's trainer (``make_trainer`` of a
    :class:`BuildEnv` restricted to those samples) with the pipeline's batch transforms, then its
    update stages (attacks, then client-side defenses such as pruning, Soteria, local DP), exactly
    as in round ``ctx.round``. Used by ``spfl invert`` and by :class:`InversionAudit`.

    Read-only: the update stages' states (e.g. Neurotoxin's previous model) are restored after
    the call, and all randomness is ``ctx``'s ``(seed, purpose, round, client)`` generators.

    Returns:
        ``(U [M, D], x [M, B, C, H, W], y [M, B])``: the uploads and the clients' samples.
    """
    packed = env.packed
    small = PackedClients(x=packed.x, y=packed.y, index=packed.index[:, :batch].contiguous(),
                          counts=packed.counts.clamp(max=batch))
    small_counts = [min(c, batch) for c in env.counts]
    trainer = make_trainer(dataclasses.replace(env, packed=small, counts=small_counts, n_train=sum(small_counts)))
    M = ctx.num_clients
    ctx = dataclasses.replace(ctx, counts=[batch] * M, weights=torch.full((M,), float(batch), dtype=ctx.weights.dtype, device=ctx.device))
    saved = [copy.deepcopy(s.state_dict()) for s in pipeline.update_stages]
    U = trainer.train(ctx, pipeline.batch_transforms).U  # (M, D)
    for stage in pipeline.update_stages:
        U, _ = stage.apply(ctx, U)
    for stage, state in zip(pipeline.update_stages, saved):
        stage.load_state_dict(state)
    idx = small.index[torch.tensor(ctx.client_ids, device=small.index.device)]  # (M, B)
    return U, packed.x[idx], packed.y[idx]


# ---- stages -------------------------------------------------------------------------------------
def pixel_normalization(cfg: Config, env: BuildEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean (C, 1, 1), std (C, 1, 1))`` with ``x = (pixel - mean) / std`` for pixels in ``[0, 1]``.

    The dataset's own constants (``spfl_vmap.data.loaders.PIXEL_NORMALIZATION``); for datasets
    without them (``digits``, ``synthetic``) the training data's per-channel range ``[lo, hi]``
    is mapped onto ``[0, 1]`` (exact for digits, whose levels 0 and 16 both occur).
    """
    # extremes: under torchrun the whole training set's per-channel range, not this rank's
    mean, std = pixel_stats(cfg.dataset, None if cfg.dataset in PIXEL_NORMALIZATION else extremes(env.packed.x))
    return mean.to(env.device), std.to(env.device)


def pixel_stats(dataset: str, x_train: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pixel_normalization` from a dataset name and its training images
    ``x_train (n, C, H, W)`` (only read for datasets without constants): ``(mean (C, 1, 1),
    std (C, 1, 1))`` on the CPU."""
    if dataset in PIXEL_NORMALIZATION:
        mean, std = (torch.tensor(v, dtype=torch.float32) for v in PIXEL_NORMALIZATION[dataset])
    elif x_train is None:
        raise ValueError(f"dataset {dataset} has no pixel constants: pass its training images")
    else:
        lo, hi = x_train.amin(dim=(0, 2, 3)).float().cpu(), x_train.amax(dim=(0, 2, 3)).float().cpu()  # (C,)
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        mean, std = -lo / span, 1.0 / span
    return mean.view(-1, 1, 1), std.view(-1, 1, 1)


class ATSTransform(BatchTransform):
    """Round step 4: every client's training images go through its ATS policy (all clients).

    The images are taken to pixel space (``x * std + mean``, clamped to ``[0, 1]``), transformed by
    :func:`~spfl_vmap.defenses.ats.apply_policy` and normalised again. Each image's draws (which
    policy of a hybrid, each op's sign, and with ``--ats_use_prob`` each op's gate) are
    ``hash_uniform(derive_seed(seed, "ats", round), client id, sample, slot, draw)``, with the
    sample identified by :func:`~spfl_vmap.attacks.backdoor.content_keys`, as the backdoor
    module's poisoning does: a transform is not told the local step, and a generator drawn per
    call would depend on ``--client_chunk``, while the hash depends only on the round, the client
    and its batch, so every chunking and every engine transforms the same images the same way.
    ATS draws afresh on every load of an image; here an image at the same slot of the same
    client's batch twice in one round (a client with a single batch and no reshuffle between its
    epochs) gets the same draw both times.
    """

    name = "ats"

    def __init__(self, cfg: Config, env: BuildEnv) -> None:
        self.source, self.policies = resolve_policies(cfg)
        self.origin = list_origin(cfg)
        self.use_prob = cfg.ats_use_prob
        self.mean, self.std = pixel_normalization(cfg, env)  # (C, 1, 1)
        self.draws = num_draws(self.policies)

    def apply(
        self, ctx: RoundContext, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], Metrics]:
        n, B = y.shape
        ids = torch.tensor(ctx.client_ids, dtype=torch.long, device=y.device)[rows.to(y.device)]  # (n,)
        slots = torch.arange(B, device=y.device)
        draw = torch.arange(self.draws, device=y.device)
        u = hash_uniform(ctx.seed_for("ats"), ids[:, None, None], content_keys(x, y)[..., None], slots[None, :, None],
                         draw[None, None, :])  # (n, B, draws)
        mean, std = self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)
        pixels = (x * std + mean).clamp(0.0, 1.0)  # (n, B, C, H, W)
        out = apply_policy(pixels, self.policies, u, self.use_prob)
        return ((out - mean) / std, y), {}

    def describe(self) -> dict[str, Any]:
        return {"ats": {"policies": [policy_name(p) for p in self.policies], "source": self.source, "list": self.origin,
                        "ops": [describe_policy(p) for p in self.policies], "use_prob": self.use_prob,
                        "pixel_mean": [float(v) for v in self.mean.flatten()],
                        "pixel_std": [float(v) for v in self.std.flatten()]}}


class GradientPruning(UpdateStage):
    """Round step 7 (a client-side defense, on every row): per layer, each client's update keeps
    only its entries of magnitude at least the ``rate`` quantile of that layer
    (:func:`~spfl_vmap.defenses.pruning.prune_per_layer`; Zhu et al. 2019).

    Metrics: ``grad_prune_kept``, the mean fraction of entries kept.
    """

    name = "grad_prune"

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        out, kept = prune_per_layer(U, ctx.spec.numels, self.rate)  # (N, D), (N,)
        return out, {"grad_prune_kept": float(kept.mean())}

    def describe(self) -> dict[str, Any]:
        return {"grad_prune": {"rate": self.rate, "per": "parameter tensor, per client"}}


class SoteriaPruning(UpdateStage):
    """Round step 7 (a client-side defense, on every row): Soteria (Sun et al., "Soteria:
    Provable Defense against Privacy Leakage in Federated Learning from Representation
    Perspective", CVPR 2021; :mod:`spfl_vmap.defenses.soteria`).

    Each client prunes the columns of its last layer's weight block that belong to the
    ``rate`` fraction of representation features with the smallest summed
    ``||d r_f / d x|| / (r_f + 0.1)``, computed at the round's global model on the samples its
    upload is computed on: the first ``ctx.counts[i]`` samples of its data (all of them in a run;
    ``spfl invert``'s ``B``), at most ``--soteria_samples``. With ``--use_gradient`` (FedSGD) that
    is the authors' rule on the uploaded gradient. For FedAvg the same mask is applied to the last
    layer's weight update (the sum of the local steps' weight gradients, each of whose columns is
    ``r_f`` times a logit gradient), with the ratio taken at the global model: an extension, the
    paper treats a single gradient. The ratio is computed on the raw samples: with ATS on as well,
    the upload comes from transformed images.

    All clients' samples go through one batch (one backward per feature, or one ``jvp`` per
    input coordinate); the per-client sums are an ``index_add`` and the masks one quantile call.

    Metrics: ``soteria_pruned``, the fraction of feature columns zeroed.
    """

    name = "soteria"

    def __init__(self, cfg: Config, env: BuildEnv) -> None:
        self.rate = float(cfg.soteria_rate)
        self.max_samples = cfg.soteria_samples
        self.use_gradient = cfg.use_gradient
        self.rep, self.layer, linear = representation_model(env.model, tuple(env.input_shape))
        self.rep_keys = {k for k, _ in self.rep.named_parameters()}
        i = list(env.spec.names).index(f"{self.layer}.weight")
        self.offset = sum(env.spec.numels[:i])  # where the last layer's weight (out, F) starts in a row of U
        self.out_features, self.features = linear.weight.shape
        self.packed = env.packed

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        N = ctx.num_clients
        dev = self.packed.index.device
        counts = torch.tensor(ctx.counts, dtype=torch.long, device=dev)  # (N,)
        if self.max_samples is not None:
            counts = counts.clamp(max=self.max_samples)
        S = int(counts.max())
        rows = self.packed.index[torch.tensor(ctx.client_ids, dtype=torch.long, device=dev), :S]  # (N, S)
        valid = torch.arange(S, device=dev)[None, :] < counts[:, None]  # (N, S)
        x = self.packed.x[rows[valid]]  # (M, C, H, W) every client's samples
        owner = torch.arange(N, device=dev)[:, None].expand(N, S)[valid]  # (M,)
        params = {k: v.detach() for k, v in ctx.global_params.items() if k in self.rep_keys}
        _, ratio = representation_ratios(self.rep, params, x)  # (M, F)
        scores = torch.zeros(N, self.features, dtype=ratio.dtype, device=dev).index_add_(0, owner, ratio)  # (N, F)
        keep = soteria_keep(scores, self.rate).to(U.device)  # (N, F)
        return prune_columns(U, keep, self.offset, self.out_features), {"soteria_pruned": float(1.0 - keep.float().mean())}

    def describe(self) -> dict[str, Any]:
        return {"soteria": {"rate": self.rate, "layer": f"{self.layer}.weight", "features": self.features,
                            "samples": self.max_samples if self.max_samples is not None else "all of the upload's",
                            "acts_on": "uploaded gradient" if self.use_gradient else "last-layer weight update (ratio at the global model)"}}


class InversionAudit(Audit, EvalHook):
    """Round step 10: every ``--audit_every`` rounds, attack ``--audit_clients`` honest clients'
    uploads with ``--audit_inversion`` (DLG, Zhu et al. NeurIPS 2019; iDLG, Zhao et al. 2020;
    Inverting Gradients, Geiping et al. NeurIPS 2020) and report how well the server reconstructs
    their images.

    What is attacked: a row of the round's ``U`` is a client's update over *all* its local data
    in shuffled mini-batches, which no attack can invert as a whole (hundreds of images, unknown
    batch order). The audit therefore attacks a *fresh upload*, as ``spfl invert`` does
    (:func:`fresh_uploads`): the first ``M`` honest clients of the cohort (``ctx.malicious``
    False) holding at least ``B = --audit_batch`` samples each compute, at the round's global
    model, the upload of their first ``B`` samples through the run's own trainer, batch
    transforms (ATS) and update stages (pruning, Soteria, local DP). The ground truth for PSNR,
    SSIM and labels is those ``B`` samples. Defenses inside the aggregation (DP-FedAvg's
    clip-and-noise sum, ``--dp_mode user``) act after the upload and are not seen.

    Read-only: the fresh uploads come from a separate trainer, every update stage's state is
    restored, and the attack's randomness is ``seed_for("audit_inversion")`` of the round, so a
    run with the audit trains exactly the same model as without it (``tests/attacks/test_inversion_audit.py``).

    Metrics (means over the audited clients): ``audit_psnr``, ``audit_ssim``,
    ``audit_label_acc``, plus ``audit_clients``, ``audit_round`` and ``audit_s`` (seconds).
    ``metrics.jsonl`` holds evaluated rounds only, so the stage is also an evaluation hook: an
    evaluated row carries the latest audit since the previous evaluated row (``audit_round``
    says which round it attacked), and rows with no audit since then carry no audit keys.
    """

    name = "audit_inversion"

    def __init__(self, cfg: Config, env: BuildEnv) -> None:
        self.cfg, self.env = cfg, env
        self.attack = str(cfg.audit_inversion)
        self.every = audit_setting(cfg, "audit_every")
        self.clients = audit_setting(cfg, "audit_clients")
        self.batch = audit_setting(cfg, "audit_batch")
        self.restarts = audit_setting(cfg, "audit_restarts")
        self.iterations = audit_setting(cfg, "audit_iterations")
        self.upload = upload_model(cfg, self.batch)
        self.box = pixel_box(env.packed.x)  # ((C,), (C,)) normalized values of pixels 0 and 1
        self.pipeline: Optional[Pipeline] = None
        self.make_trainer: Optional[Callable[[BuildEnv], Any]] = None
        self.pending: Metrics = {}  # the latest audit not yet in an evaluated row

    def attach(self, pipeline: Pipeline, make_trainer: Callable[[BuildEnv], Any]) -> None:
        """The run's pipeline and trainer factory (``spfl_vmap.builder.build`` calls this)."""
        self.pipeline, self.make_trainer = pipeline, make_trainer

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[None, Metrics]:
        if self.pipeline is None or self.make_trainer is None:
            raise RuntimeError("InversionAudit needs attach(pipeline, make_trainer) before the first round")
        t0 = time.perf_counter()
        mal = ctx.malicious.tolist()
        rows = [i for i in range(ctx.num_clients) if not mal[i] and ctx.counts[i] >= self.batch][: self.clients]
        m: Metrics = {"audit_clients": len(rows), "audit_round": ctx.round}
        if rows:
            ids = [ctx.client_ids[i] for i in rows]
            sub = dataclasses.replace(ctx, client_ids=ids, counts=[ctx.counts[i] for i in rows],
                                      malicious=ctx.malicious[rows], weights=ctx.weights[rows])
            Uf, x, y = fresh_uploads(self.cfg, self.env, self.pipeline, self.make_trainer, sub, self.batch)  # (M, D)
            params = {k: v.detach() for k, v in ctx.global_params.items()}
            res = invert(self.attack, self.env.model, params, Uf, num_images=self.batch, input_shape=tuple(self.env.input_shape),
                         upload=self.upload, restarts=self.restarts, iterations=self.iterations,
                         seed=ctx.seed_for("audit_inversion"), problem_ids=ids, box=self.box)
            mean = reconstruction_metrics(to_unit(res.x.detach(), self.box), to_unit(x, self.box), res.labels, y)["mean"]
            m.update(audit_psnr=mean["psnr"], audit_ssim=mean["ssim"], audit_label_acc=mean["label_acc"])
        m["audit_s"] = time.perf_counter() - t0
        self.pending = dict(m)
        return None, m

    def evaluate(self, ctx: RoundContext, model: Any, params: Any) -> tuple[None, Metrics]:
        out, self.pending = self.pending, {}
        return None, out

    def state_dict(self) -> dict[str, Any]:
        return {"pending": dict(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = dict(state.get("pending", {}))

    def describe(self) -> dict[str, Any]:
        return {"audit_inversion": {"attack": self.attack, "every": self.every, "clients": self.clients, "batch": self.batch,
                                    "restarts": self.restarts, "iterations": self.iterations,
                                    "upload": dataclasses.asdict(self.upload),
                                    "attacks": "fresh uploads of each audited client's first `batch` samples at the round's model"}}


def stages(cfg: Config, env: BuildEnv) -> list[Stage]:
    """ATS's batch transform, Soteria, the pruning stage and the inversion audit, each when its
    flag is on (the builder attaches the audit to the pipeline)."""
    out: list[Stage] = []
    if ats_on(cfg):
        out.append(ATSTransform(cfg, env))
    if cfg.soteria_rate is not None:
        out.append(SoteriaPruning(cfg, env))
    if cfg.grad_prune is not None:
        out.append(GradientPruning(cfg.grad_prune))
    if cfg.audit_inversion is not None:
        out.append(InversionAudit(cfg, env))
    return out


__all__ = ["ATSTransform", "GradientPruning", "InversionAudit", "SoteriaPruning", "fresh_uploads", "list_origin",
           "pixel_normalization", "pixel_stats", "policy_list", "resolve_policies", "stages", "toolkit_dataset_name", "upload_model", "validate",
           "validate_audit"]
