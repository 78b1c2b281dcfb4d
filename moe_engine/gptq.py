"""GPTQ (Frantar et al. 2022): quantize a weight's input columns in order, each column's rounding error fed
back into the columns not yet quantized through the inverse Hessian of the layer's inputs."""

import torch

from kernels.quant import CLIP_GRID, dequantize_values, quantize_int

DAMP = 0.01          # added to the Hessian's diagonal, as a share of its mean (the paper's 1%)
BLOCK = 128          # columns whose updates are applied together (lazy batch); a multiple of the group


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """hessian [B, K, K] (sum of x xᵀ over the inputs) -> U [B, K, K] upper triangular with Uᵀ U = H⁻¹ of the
    damped H: row i of U, divided by U[i, i], is how column i's error spreads over the later columns. A column
    no input touched (zero diagonal) gets a unit diagonal, so it is rounded to nearest and moves nothing.
    Damping grows tenfold until the Cholesky factorisation succeeds."""
    H = hessian.clone()
    diag = H.diagonal(dim1=-2, dim2=-1)                                       # [B, K], a view
    diag.masked_fill_(diag == 0, 1.0)
    mean = diag.mean(-1, keepdim=True)                                        # [B, 1]
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H + (damp * 10 ** attempt) * mean[..., None] * eye)
        if not info.any():
            break
    else:
        raise ValueError("the calibration Hessian is not positive definite even with 10^5 x damping")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, asymmetric: bool = False,
                  scale_dtype=torch.bfloat16, clip_search: bool = False, damp: float = DAMP, clip: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [B, N, K] (float32, or float64 for a reference), hessian [B, K, K] of its inputs -> (q int8 [B, N, K],
    scale [B, N, K / group] in scale_dtype, zero int8 like scale or None), the format quantize_int returns and
    QuantizedWeight.store_quantized takes, with w ~ (q - zero) * scale.

    Columns go left to right. When a group starts, its scales (and zeros) come from kernels.quant.quantize_int
    over the group's columns as they are then, after the error feedback of every earlier column (the bf16
    rounding included, so the scale the later columns are rounded against is the one stored); clip_search
    picks each group's range as quantize_int does, else its full range times clip. Each column is then rounded and its
    error, divided by U[i, i], subtracted from the later columns along row i of U (inverse_hessian_factor)."""
    B, N, K = w.shape
    if K % group:
        raise ValueError(f"group size {group} does not divide the input width {K}")
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.to(dtype).clone()                                                   # [B, N, K], updated in place
    U = inverse_hessian_factor(hessian.to(dtype), damp)                      # [B, K, K]
    block = group * max(1, BLOCK // group)
    q = torch.empty(B, N, K, dtype=torch.int8, device=w.device)
    scales = torch.empty(B, N, K // group, dtype=scale_dtype, device=w.device)
    zeros = torch.empty(B, N, K // group, dtype=torch.int8, device=w.device) if asymmetric else None
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        W1 = W[..., b0:b1]                                                    # [B, N, c], a view
        U1 = U[:, b0:b1, b0:b1]                                               # [B, c, c]
        err = torch.empty_like(W1)                                            # [B, N, c]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:
                _, s, z = quantize_int(W1[..., i:i + group] * clip, bits, group, asymmetric, clip_search, scale_dtype)
                scales[..., col // group] = s[..., 0]
                scale = s[..., 0].to(dtype)                                   # [B, N]
                zero = torch.zeros_like(scale) if z is None else z[..., 0].to(dtype)
                if zeros is not None:
                    zeros[..., col // group] = z[..., 0]
            x = W1[..., i]                                                    # [B, N]
            level = (torch.round(x / scale) + zero).clamp(qmin, qmax)        # as quantize_int rounds
            q[..., col] = level.to(torch.int8)
            e = (x - (level - zero) * scale) / U1[:, i, i, None]              # [B, N]
            W1[..., i:] -= e[..., None] * U1[:, None, i, i:]                  # [B, N, 1] * [B, 1, c - i]
            err[..., i] = e
        W[..., b1:] -= err @ U[:, b0:b1, b1:]                                 # [B, N, c] @ [B, c, K - b1]
    return q, scales, zeros


def gptq_search(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, asymmetric: bool = False,
                scale_dtype=torch.bfloat16, damp: float = DAMP
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """gptq_quantize with each row's group ranges shrunk by the one factor of CLIP_GRID (or quantize_int's own
    per-group clip search) that gives that row the least output error on the calibration inputs,
    (w - ŵ) H (w - ŵ)ᵀ. Rows are quantized independently of each other, so each row may take its own
    candidate. Measured on tiny-deepseek's down projections (one group of 128 per row): plain GPTQ's scales
    (the row's full range) lose to the clip search even on the calibration inputs; this search wins on both."""
    best = None
    for clip, search in [(a, False) for a in CLIP_GRID] + [(1.0, True)]:
        q, scale, zero = gptq_quantize(w, hessian, bits, group, asymmetric, scale_dtype, search, damp, clip)
        d = w.to(hessian.dtype) - dequantize_values(q, scale, zero, (1, group), hessian.dtype)   # [B, N, K]
        err = torch.einsum("bnk,bkj,bnj->bn", d, hessian, d)                                       # [B, N]
        if best is None:
            best = [err, q, scale, zero]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better[..., None], q, best[1])
        best[2] = torch.where(better[..., None], scale, best[2])
        if zero is not None:
            best[3] = torch.where(better[..., None], zero, best[3])
    return best[1], best[2], best[3]
