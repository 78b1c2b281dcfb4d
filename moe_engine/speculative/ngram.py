"""N-gram prompt lookup: drafts are the tokens that followed the latest earlier occurrence of the
request's last n tokens (n from prompt_lookup_max down to prompt_lookup_min)."""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k draft tokens continuing ids, or [] if no suffix of n_min..n_max tokens occurred before."""
    L = len(ids)
    if k < 1 or L < n_min + 1:
        return []
    a = np.asarray(ids, dtype=np.int64)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        windows = sliding_window_view(a[:L - 1], n)             # [L - n, n]: window i = a[i:i+n], ending before L
        hits = np.flatnonzero((windows == a[L - n:]).all(1))
        if hits.size:
            start = int(hits[-1]) + n                           # the most recent occurrence
            return a[start:start + k].tolist()
    return []
