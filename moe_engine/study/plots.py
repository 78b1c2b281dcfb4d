"""Matplotlib heatmaps of a trace (optional `plot` extra): expert load, co-activation, token-class affinity."""

from pathlib import Path

import numpy as np

from moe_engine.errors import MoeEngineError


def _figure(width: float, height: float):
    # A bare Figure, not pyplot: no global state and no display backend needed.
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MoeEngineError("plots need matplotlib, which is not installed; install it with "
                             "pip install 'moe-engine[plot]' (or pip install matplotlib)") from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_expert_load(trace, path, title: str = "Expert load") -> Path:
    """Layer x expert heatmap of the load share (a Trace, or a [L, E] load array); cells in percent."""
    load = trace if isinstance(trace, np.ndarray) else trace.expert_load()             # [L, E]
    L, E = load.shape
    fig = _figure(max(4.0, 0.45 * E + 1.5), 0.45 * L + 1.3)
    ax = fig.add_subplot()
    image = ax.imshow(load * 100, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xlabel("expert"), ax.set_ylabel("MoE layer"), ax.set_title(title, fontsize=10)
    ax.set_xticks(range(E)), ax.set_yticks(range(L))
    if E <= 16:
        top = load.max() * 100
        for (l, e), value in np.ndenumerate(load * 100):
            ax.text(e, l, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 * top else "white")
    fig.colorbar(image, ax=ax, label="% of assignments")
    return _save(fig, path)


def plot_coactivation(trace, path, title: str = "Expert co-activation") -> Path:
    """One E x E panel per MoE layer: % of tokens choosing both experts (diagonal left blank: it is the load)."""
    coact = trace if isinstance(trace, np.ndarray) else trace.coactivation()          # [L, E, E]
    L, E = coact.shape[:2]
    cols = min(L, 4)
    rows = -(-L // cols)
    fig = _figure(2.4 * cols + 0.8, 2.4 * rows + 0.5)
    off = coact * 100
    off[:, np.arange(E), np.arange(E)] = np.nan
    vmax = np.nanmax(off) if np.isfinite(off).any() else 1.0
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= L:
            ax.set_axis_off()
            continue
        image = ax.imshow(off[i], cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(f"MoE layer {i}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=axes, label="% of tokens", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_class_affinity(trace, path, title: str = "Token-class affinity") -> Path:
    """One class x expert panel per MoE layer: log2 of the class's over-representation among each
    expert's tokens (red: the expert takes more of that class than overall, blue: less)."""
    affinity = trace if isinstance(trace, dict) else trace.class_affinity()          # {class: [L, E]}
    names = list(affinity)
    L, E = next(iter(affinity.values())).shape
    cols = min(L, 2)
    rows = -(-L // cols)
    fig = _figure(max(3.0, 0.3 * E + 1.6) * cols + 0.6, (0.28 * len(names) + 0.9) * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= L:
            ax.set_axis_off()
            continue
        values = np.stack([affinity[n][i] for n in names])                             # [C, E]
        logs = np.log2(np.clip(values, 1 / 8, 8))
        image = ax.imshow(logs, cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_xticks(range(E))
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(f"MoE layer {i}", fontsize=8)
    fig.colorbar(image, ax=axes, label="log2 affinity", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
