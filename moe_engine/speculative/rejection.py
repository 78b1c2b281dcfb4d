"""Accepting drafts against the target's rows: greedy (draft == argmax) and the rejection rule that
keeps the target distribution exactly (Leviathan et al. 2023; Chen et al. 2023)."""

import torch


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """targets: the target's argmax at each of the k + 1 rows. The drafts up to the first that differs
    from the target's token there, then the target's token (the correction, or the bonus after all k)."""
    out = []
    for d, t in zip(drafts, targets):
        if d != t:
            return out + [t]
        out.append(d)
    return out + [targets[len(drafts)]]


def rejection_sample(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                     generator: torch.Generator | None) -> list[int]:
    """p [k + 1, V]: the target's probabilities at each row (any positive scale); q [k, V] the draft's, or
    None for drafts without probabilities (n-gram: q is one-hot on the draft). Draft j is accepted with
    probability min(1, p_j(d) / q_j(d)); at the first rejection a token is drawn from max(0, p_j - q_j)
    renormalised (with one-hot q: p_j without d), else after all k one from p_k. On the CPU."""
    p = p.float().cpu()
    p = p / p.sum(-1, keepdim=True)
    q = None if q is None else (q.float().cpu() / q.float().cpu().sum(-1, keepdim=True))
    out = []
    for j, d in enumerate(drafts):
        pd = float(p[j, d])
        qd = 1.0 if q is None else float(q[j, d])
        if float(torch.rand(1, generator=generator)) * qd < pd:
            out.append(d)
            continue
        if q is None:
            residual = p[j].clone()
            residual[d] = 0.0
        else:
            residual = (p[j] - q[j]).clamp_min(0.0)
        if not float(residual.sum()) > 0:      # p == q up to rounding: any draw from p is exact
            residual = p[j]
        return out + [int(torch.multinomial(residual, 1, generator=generator))]
    return out + [int(torch.multinomial(p[len(drafts)], 1, generator=generator))]
