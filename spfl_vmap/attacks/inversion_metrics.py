"""How good a reconstruction is: PSNR, SSIM, label accuracy, batch matching and a picture.

All image metrics are computed on de-normalized images in ``[0, 1]`` (breaching's
``analysis/metrics.py`` convention): :func:`to_unit` maps the model's normalized inputs back
with the per-channel values of pixel 0 and pixel 1 (the attack's ``box``).

* **PSNR** and **SSIM**: ``torchmetrics`` (``peak_signal_noise_ratio`` with ``data_range=1`` per
  image; ``structural_similarity_index_measure`` with its Gaussian window, sigma 1.5, as in Wang
  et al. 2004). An exact reconstruction's PSNR is capped at :data:`PSNR_CAP`. breaching reports
  CW-SSIM (it needs ``pytorch_wavelets``); ours is the plain SSIM.
* **LPIPS** is left out: torchmetrics' and the ``lpips`` package's versions download a
  pretrained backbone (AlexNet/VGG) at first use, which an offline machine cannot do.
* **Matching**: the images of a batch come back in any order, so each reconstruction is paired
  with an original by ``scipy.optimize.linear_sum_assignment`` on their MSE (breaching matches
  on LPIPS features; MSE needs no network).
* **Labels**: after matching, a reconstruction's label is correct when it equals its
  original's; ``label_overlap`` is breaching's order-free count (multiset intersection / B).

``torchmetrics``, ``scipy`` and ``matplotlib`` are imported inside the functions: importing
torchmetrics takes seconds, which no other command should pay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

#: PSNR of an exact reconstruction (MSE 0 would be +inf): 100 dB is an MSE of 1e-10.
PSNR_CAP = 100.0


def to_unit(x: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Normalized images ``[..., C, H, W]`` -> pixels in ``[0, 1]`` (clamped); ``box`` holds the
    normalized values ``(lo [C], hi [C])`` of pixel 0 and 1."""
    lo = box[0].to(x).reshape(-1, 1, 1)
    hi = box[1].to(x).reshape(-1, 1, 1)
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


def psnr(rec: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``rec`` against ``orig``, both ``[N, C, H, W]`` in ``[0, 1]``;
    NaN where ``rec`` is NaN."""
    from torchmetrics.functional.image.psnr import peak_signal_noise_ratio

    v = peak_signal_noise_ratio(rec.float(), orig.float(), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return v.clamp(max=PSNR_CAP)


def ssim(rec: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of ``rec`` against ``orig``, both ``[N, C, H, W]`` in ``[0, 1]``."""
    from torchmetrics.functional.image.ssim import structural_similarity_index_measure

    return structural_similarity_index_measure(rec.float(), orig.float(), data_range=1.0, reduction="none")


def match(rec: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """For each original, the index of its reconstruction: ``[M, B]`` from ``rec, orig [M, B,
    C, H, W]``, minimizing the summed MSE per problem (Hungarian algorithm). A NaN
    reconstruction costs more than any finite one."""
    from scipy.optimize import linear_sum_assignment

    M, B = orig.shape[:2]
    cost = ((rec[:, :, None] - orig[:, None]) ** 2).flatten(3).mean(-1)  # (M, B rec, B orig)
    cost = torch.nan_to_num(cost.double(), nan=1e30, posinf=1e30).cpu().numpy()
    out = torch.empty(M, B, dtype=torch.long)
    for m in range(M):  # scipy's solver is per matrix; B x B is tiny
        r, c = linear_sum_assignment(cost[m])
        out[m, torch.as_tensor(c)] = torch.as_tensor(r)
    return out


def label_overlap(rec_labels: torch.Tensor, true_labels: torch.Tensor) -> torch.Tensor:
    """breaching's ``count_integer_overlap / B`` per problem: ``[M]`` from ``[M, B]`` labels."""
    K = int(max(rec_labels.max(), true_labels.max())) + 1
    a = torch.nn.functional.one_hot(rec_labels.long().cpu(), K).sum(1)
    b = torch.nn.functional.one_hot(true_labels.long().cpu(), K).sum(1)
    return torch.minimum(a, b).sum(1).double() / rec_labels.shape[1]


def reconstruction_metrics(
    rec01: torch.Tensor, orig01: torch.Tensor, rec_labels: torch.Tensor, true_labels: torch.Tensor
) -> dict[str, Any]:
    """Per-image and mean metrics of ``M`` problems of ``B`` images.

    Args:
        rec01: ``[M, B, C, H, W]`` reconstructions in ``[0, 1]``.
        orig01: ``[M, B, C, H, W]`` originals in ``[0, 1]``.
        rec_labels: ``[M, B]`` the labels of the reconstructions (same order as ``rec01``).
        true_labels: ``[M, B]``.

    Returns:
        ``{"order": [M, B] matched reconstruction per original, "psnr", "ssim": [M, B] tensors,
        "label_correct": [M, B] bool, "label_overlap": [M], "mean": {"psnr", "ssim",
        "label_acc", "label_overlap"}}``; means skip NaN (failed) images.
    """
    M, B = orig01.shape[:2]
    order = match(rec01.cpu(), orig01.cpu())  # (M, B)
    rows = torch.arange(M)[:, None]
    rec = rec01.cpu()[rows, order]  # (M, B, C, H, W) matched to the originals
    lab = rec_labels.cpu()[rows, order]
    p = psnr(rec.flatten(0, 1), orig01.cpu().flatten(0, 1)).reshape(M, B)
    s = ssim(rec.flatten(0, 1), orig01.cpu().flatten(0, 1)).reshape(M, B)
    correct = lab == true_labels.cpu()
    overlap = label_overlap(rec_labels, true_labels)
    return {
        "order": order, "psnr": p, "ssim": s, "label_correct": correct, "label_overlap": overlap,
        "mean": {
            "psnr": float(p.nanmean()), "ssim": float(s.nanmean()),
            "label_acc": float(correct.double().mean()), "label_overlap": float(overlap.mean()),
        },
    }


def save_grid(
    orig01: torch.Tensor, rec01: torch.Tensor, path: str | Path, title: str = "",
    captions: Sequence[str] | None = None, columns: int = 16,
) -> Path:
    """A PNG of originals (upper row of each pair) above their reconstructions.

    Args:
        orig01: ``[N, C, H, W]`` in ``[0, 1]`` (``C`` = 1 or 3).
        rec01: ``[N, C, H, W]``, matched to ``orig01``.
        path: the PNG to write.
        title: figure title.
        captions: ``N`` strings under the reconstructions (e.g. their PSNR).
        columns: images per row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N = orig01.shape[0]
    cols = max(1, min(columns, N))
    pairs = -(-N // cols)
    fig, axes = plt.subplots(2 * pairs, cols, figsize=(1.1 * cols, 2.4 * pairs + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def show(ax, img: torch.Tensor) -> None:
        img = torch.nan_to_num(img.detach().float().cpu(), nan=0.0)
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())

    for i in range(N):
        r, c = divmod(i, cols)
        show(axes[2 * r, c], orig01[i])
        show(axes[2 * r + 1, c], rec01[i])
        if captions is not None:
            axes[2 * r + 1, c].set_title(captions[i], fontsize=7, y=-0.28)
    for r in range(pairs):
        axes[2 * r, 0].text(-0.1, 0.5, "original", transform=axes[2 * r, 0].transAxes, ha="right", va="center", fontsize=7)
        axes[2 * r + 1, 0].text(-0.1, 0.5, "reconstr.", transform=axes[2 * r + 1, 0].transAxes, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
