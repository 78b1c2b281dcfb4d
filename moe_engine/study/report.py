"""Markdown tables of a trace's routing: per-layer summary and which experts take which token classes."""

import numpy as np

from moe_engine.study import analysis


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_table(trace) -> str:
    """One row per MoE layer: busiest and idlest expert, imbalance, entropies, agreement with the next layer."""
    load = analysis.expert_load(trace)
    imb = analysis.imbalance(trace)
    entropy = analysis.load_entropy(trace)
    nmi = analysis.adjacent_agreement(trace)
    token_entropy = analysis.token_entropy(trace) if trace.final().has_scores else None
    E = load.shape[1]
    header = ["MoE layer", "busiest expert", "idlest expert", "max/mean", "CV",
              f"load entropy (bits, max {np.log2(E):.2f})", "top-1 NMI with next layer"]
    if token_entropy is not None:
        header.append("router entropy per token (bits)")
    rows = []
    for l, row in enumerate(load):
        cells = [l, f"{row.argmax()} ({row.max():.1%})", f"{row.argmin()} ({row.min():.1%})",
                 f"{imb['max_over_mean'][l]:.2f}", f"{imb['cv'][l]:.2f}", f"{entropy[l]:.2f}",
                 f"{nmi[l]:.2f}" if l < len(nmi) else "-"]
        if token_entropy is not None:
            cells.append(f"{token_entropy[l]:.2f}")
        rows.append(cells)
    return markdown_table(header, rows)


def class_table(trace) -> str:
    """One row per token class: its token count and, per MoE layer, the expert most over-represented for
    it (its affinity: the class's share of that expert's tokens over the class's share overall)."""
    counts = analysis.class_counts(trace)
    affinity = analysis.class_affinity(trace)
    L = next(iter(affinity.values())).shape[0]
    total = sum(counts.values())
    rows = []
    for name, values in affinity.items():
        cells = [name, f"{counts[name]} ({counts[name] / total:.0%})"]
        cells += [f"{row.argmax()} (x{row.max():.1f})" for row in values]
        rows.append(cells)
    return markdown_table(["token class", "tokens"] + [f"layer {l}: top expert (affinity)" for l in range(L)], rows)
