"""PNG plots for the artifact's report/: learning curves and a picture of test-set errors."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from core.calibration import reliability  # noqa: E402


def plot_curves(history: dict, monitor: str, path: Path) -> None:
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    train = history["train_loss"]
    if train:
        steps = np.array([h["step"] for h in train])
        losses = np.array([h["loss"] for h in train])
        ax_loss.plot(steps, losses, color="#bbb", lw=0.8, label="train (per step)")
        window = max(1, len(losses) // 30)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1:], smooth, color="C0", label=f"train (mean of {window})")
    val = history["validation"]
    if val:
        ax_loss.plot([v["step"] for v in val], [v["loss"] for v in val], "o-", color="C1", label="validation")
        ax_metric.plot([v["step"] for v in val], [v.get(monitor, np.nan) for v in val], "o-", color="C2")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    ax_loss.legend(fontsize=8)
    ax_metric.set(xlabel="optimizer step", ylabel=monitor, title=f"Validation {monitor}")
    ax_metric.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    cm = np.asarray(matrix)
    size = max(3.5, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="Test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_regression(y_true: np.ndarray, y_pred: np.ndarray, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(y_true, y_pred, s=6, alpha=0.4)
    lo, hi = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
    ax.plot([lo, hi], [lo, hi], color="C1", lw=1, label="y = x")
    ax.set(xlabel="true", ylabel="predicted", title="Test: predicted vs true")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_label(per_class: dict[str, dict[str, float]], path: Path) -> None:
    names = list(per_class)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(names) + 2), 3.5))
    ax.bar(names, [per_class[n]["f1"] for n in names])
    ax.set(ylabel="F1", ylim=(0, 1), title="Test F1 per label")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_against_baselines(model: dict[str, float], baselines: dict[str, dict[str, float]], metrics: tuple[str, ...],
                           path: Path) -> None:
    """Grouped bars: each metric for the model and for every baseline (test split)."""
    shown = [m for m in metrics if m in model]
    runs = {"fine-tuned": model, **baselines}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(shown)), 3.8))
    width = 0.8 / len(runs)
    for k, (name, values) in enumerate(runs.items()):
        ax.bar(np.arange(len(shown)) + k * width, [values.get(m, np.nan) for m in shown], width, label=name)
    ax.set_xticks(np.arange(len(shown)) + 0.4 - width / 2, shown)
    ax.set(ylabel="test score (0-100)", title="Fine-tuned model against baselines")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(raw: np.ndarray, calibrated: np.ndarray, targets: np.ndarray, kind: str,
                     calibration: dict[str, dict[str, float]], path: Path) -> None:
    """Reliability diagram of the test split before and after calibration: observed frequency against confidence
    per bin (top-class confidence for single-label, every label's probability for multi-label)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfectly calibrated")
    for name, scores, color in (("before", raw, "C1"), ("after", calibrated, "C0")):
        if kind == "softmax":
            confidence, correct = scores.max(axis=1), (scores.argmax(axis=1) == targets).astype(np.float64)
        else:
            confidence, correct = scores.ravel(), np.asarray(targets, dtype=np.float64).ravel()
        _, mean_conf, frequency, counts = reliability(confidence, correct)
        kept = counts > 0
        ax.plot(mean_conf[kept], frequency[kept], "o-", color=color, ms=4,
                label=f"{name} (ECE {calibration[name]['ece']:.3f})")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1),
           title="Test reliability")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
