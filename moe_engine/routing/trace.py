"""Trace: every MoE layer's routing for every token processed, kept on device while recording, read as numpy."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from moe_engine.errors import MoeEngineError

FORMAT_VERSION = 1
ROW_ARRAYS = ("request_ids", "token_ids", "positions", "steps")      # one entry per record, [N]


class RequestKeys:
    """Engine request ids -> trace request keys. prompt_logits (and so perplexity) announces its tokens with
    request id -1; each such call becomes its own request -1, -2, -3, ... in call order."""

    def __init__(self):
        self.next_call = -1

    def __call__(self, owners: list[int]) -> list[int]:
        if owners and owners[0] < 0:
            key, self.next_call = self.next_call, self.next_call - 1
            return [key] * len(owners)
        return owners


def match_keys(request_ids: np.ndarray, positions: np.ndarray) -> list[tuple[int, int, int]]:
    """(kind, rank, position) per record: kind 0 for generated requests, ranked by request id (= admission
    order), kind 1 for prompt_logits calls, ranked by call order. Two runs of the same calls line up."""
    requests = sorted({int(r) for r in request_ids if r >= 0})
    calls = sorted({int(r) for r in request_ids if r < 0}, reverse=True)
    rank = {r: (0, i) for i, r in enumerate(requests)} | {r: (1, i) for i, r in enumerate(calls)}
    return [(*rank[int(r)], int(p)) for r, p in zip(request_ids, positions)]


class Trace:
    """Routing records in processing order: record i is one token (request_ids[i], positions[i],
    token_ids[i], engine step steps[i]) and its routing at every MoE layer: topk_ids / topk_weights
    [moe_layers, N, k] and, with scores=True, the router logits scores [moe_layers, N, experts].

    `routing` holds the model's RoutingConfig fields; `top_k` is the width recorded (an override may
    change it). A request's last generated token is sampled but never fed back, so it has no record.

    A preempted request is recomputed, so some (request, position) pairs appear more than once: all
    records are kept, `latest` marks the last processing of each, and the analyses (and replay) use
    only those (`final()`). Tokens served from the prefix cache are never processed, so while a trace
    or override is active the engine's prefix cache is switched off and every prompt token is recorded.
    """

    def __init__(self, scores: bool = False, tokenizer=None):
        self.record_scores = scores
        self.tokenizer = tokenizer
        self.routing: dict | None = None          # the model's RoutingConfig fields
        self._keys = RequestKeys()
        self._rows: dict[str, list[int]] = {name: [] for name in ROW_ARRAYS}
        self._step = 0
        self._ids: list[list[torch.Tensor]] = []      # per MoE layer, one [T, k] tensor per step
        self._weights: list[list[torch.Tensor]] = []  # per MoE layer, [T, k] float32
        self._scores: list[list[torch.Tensor]] = []   # per MoE layer, [T, E] float32
        self._frozen: dict | None = None              # arrays of a loaded or selected trace
        self._cache: dict | None = None
        self._cache_len = -1
        self._final: "Trace | None" = None

    # --- recording (called by the hook stack; cheap: list appends of device tensors, no sync) ---------

    def begin_step(self, owners: list[int], token_ids: list[int], positions: list[int]) -> None:
        self._rows["request_ids"].extend(self._keys(owners))
        self._rows["token_ids"].extend(token_ids)
        self._rows["positions"].extend(positions)
        self._rows["steps"].extend([self._step] * len(owners))
        self._step += 1

    def record(self, moe_index: int, router_logits: torch.Tensor, cfg, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor) -> None:
        if self.routing is None:
            self.routing = dataclasses.asdict(cfg)
        while len(self._ids) <= moe_index:
            self._ids.append([]), self._weights.append([]), self._scores.append([])
        self._ids[moe_index].append(topk_ids)
        self._weights[moe_index].append(topk_weights)
        if self.record_scores:
            self._scores[moe_index].append(router_logits)

    # --- reading -----------------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        """All arrays by name (materialised on first read after new records)."""
        if self._frozen is not None:
            return self._frozen
        n = len(self._rows["token_ids"])
        if self._cache is None or self._cache_len != n:
            self._cache, self._cache_len, self._final = self._materialize(n), n, None
        return self._cache

    def _materialize(self, n: int) -> dict[str, np.ndarray]:
        out = {name: np.asarray(values, dtype=np.int64) for name, values in self._rows.items()}
        for layer, parts in enumerate(self._ids):
            if sum(p.shape[0] for p in parts) != n:
                raise RuntimeError(f"routing trace out of step: layer {layer} has "
                                   f"{sum(p.shape[0] for p in parts)} rows for {n} tokens (read mid-forward?)")
        k = max((p.shape[1] for parts in self._ids for p in parts), default=0)
        out["topk_ids"] = _stack(self._ids, n, k, -1, np.int32)               # [L, N, k]
        out["topk_weights"] = _stack(self._weights, n, k, 0.0, np.float32)    # [L, N, k]
        if self.record_scores:
            E = self.routing["num_experts"] if self.routing else 0
            out["scores"] = _stack(self._scores, n, E, 0.0, np.float32)      # [L, N, E]
        return out

    def __getattr__(self, name):
        # request_ids, token_ids, positions, steps, topk_ids, topk_weights, scores as attributes.
        if name in ROW_ARRAYS or name in ("topk_ids", "topk_weights", "scores"):
            return self.arrays().get(name)
        raise AttributeError(name)

    def __len__(self) -> int:
        return len(self.arrays()["token_ids"])

    @property
    def num_layers(self) -> int:
        return self.arrays()["topk_ids"].shape[0]

    @property
    def num_experts(self) -> int:
        if self.routing is None:
            raise MoeEngineError("the trace is empty; run generate() or prompt_logits() inside "
                                 "`with llm.trace_routing() as trace:`")
        return self.routing["num_experts"]

    @property
    def top_k(self) -> int:
        return self.arrays()["topk_ids"].shape[2]

    @property
    def has_scores(self) -> bool:
        return "scores" in self.arrays()

    @property
    def latest(self) -> np.ndarray:
        """bool [N]: False for a record superseded by a later processing of the same (request, position)."""
        arrays = self.arrays()
        if "latest" not in arrays:
            seen, keep = set(), np.zeros(len(arrays["token_ids"]), dtype=bool)
            for i in range(len(keep) - 1, -1, -1):
                key = (int(arrays["request_ids"][i]), int(arrays["positions"][i]))
                keep[i] = key not in seen
                seen.add(key)
            arrays["latest"] = keep
        return arrays["latest"]

    def select(self, rows) -> "Trace":
        """A read-only trace of the given records (a bool mask or indices, in the order given)."""
        arrays = self.arrays()
        rows = np.asarray(rows)
        picked = {name: (a[:, rows] if a.ndim == 3 else a[rows]) for name, a in arrays.items() if name != "latest"}
        out = Trace(self.record_scores and "scores" in picked, self.tokenizer)
        out.routing, out._frozen = self.routing, picked
        return out

    def final(self) -> "Trace":
        """The records the analyses use: the last processing of each (request, position)."""
        self.arrays()
        if self._final is None:
            self._final = self if self.latest.all() else self.select(self.latest)
        return self._final

    def for_request(self, request_id: int) -> "Trace":
        """One request's final records, by position (prompt_logits calls are -1, -2, ... in call order)."""
        a = self.arrays()
        rows = np.flatnonzero((a["request_ids"] == request_id) & self.latest)
        return self.select(rows[np.argsort(a["positions"][rows], kind="stable")])

    def match_keys(self) -> list[tuple[int, int, int]]:
        return match_keys(self.arrays()["request_ids"], self.arrays()["positions"])

    def token_classes(self) -> np.ndarray:
        """int8 [N] index into token_classes.CLASSES of each record's token (needs the tokenizer)."""
        arrays = self.arrays()
        if "token_classes" not in arrays:
            from moe_engine.study.token_classes import classify_records
            if self.tokenizer is None:
                raise MoeEngineError("token classes need the tokenizer: trace with an LLM that has one, or set "
                                     "trace.tokenizer = llm.tokenizer")
            arrays["token_classes"] = classify_records(arrays["request_ids"], arrays["positions"],
                                                       arrays["token_ids"], self.tokenizer)
        return arrays["token_classes"]

    def set_token_classes(self, classes: np.ndarray) -> None:
        """Use these classes (int8 [N], one per record) instead of classing each request's text alone,
        e.g. from token_classes.classify_stream for a text evaluated in windows."""
        classes = np.asarray(classes, dtype=np.int8)
        if classes.shape != (len(self),):
            raise MoeEngineError(f"{classes.shape[0] if classes.ndim else 0} token classes for {len(self)} "
                                 "records; give one class per record")
        self.arrays()["token_classes"] = classes
        self._final = None

    def token_texts(self) -> list[str]:
        """The text of each record's token (needs the tokenizer)."""
        from moe_engine.study.token_classes import TokenTexts
        if self.tokenizer is None:
            raise MoeEngineError("token texts need the tokenizer: set trace.tokenizer = llm.tokenizer")
        texts = TokenTexts(self.tokenizer)
        return [texts[int(t)] for t in self.arrays()["token_ids"]]

    def __repr__(self) -> str:
        a = self.arrays()
        return (f"Trace(records={len(a['token_ids'])}, requests={len(set(a['request_ids'].tolist()))}, "
                f"moe_layers={a['topk_ids'].shape[0]}, top_k={a['topk_ids'].shape[2]}, scores={'scores' in a})")

    # --- analysis (see moe_engine.study.analysis) -------------------------------------------------

    def expert_load(self, weighted: bool = False) -> np.ndarray:
        from moe_engine.study.analysis import expert_load
        return expert_load(self, weighted)

    def imbalance(self) -> dict[str, np.ndarray]:
        from moe_engine.study.analysis import imbalance
        return imbalance(self)

    def load_entropy(self) -> np.ndarray:
        from moe_engine.study.analysis import load_entropy
        return load_entropy(self)

    def token_entropy(self) -> np.ndarray:
        from moe_engine.study.analysis import token_entropy
        return token_entropy(self)

    def coactivation(self) -> np.ndarray:
        from moe_engine.study.analysis import coactivation
        return coactivation(self)

    def layer_transitions(self) -> np.ndarray:
        from moe_engine.study.analysis import layer_transitions
        return layer_transitions(self)

    def adjacent_agreement(self) -> np.ndarray:
        from moe_engine.study.analysis import adjacent_agreement
        return adjacent_agreement(self)

    def load_by_class(self) -> dict[str, np.ndarray]:
        from moe_engine.study.analysis import load_by_class
        return load_by_class(self)

    def class_affinity(self) -> dict[str, np.ndarray]:
        from moe_engine.study.analysis import class_affinity
        return class_affinity(self)

    def compare(self, other: "Trace") -> dict:
        from moe_engine.study.analysis import compare
        return compare(self, other)

    def summary(self) -> dict:
        from moe_engine.study.analysis import summary
        return summary(self)

    # --- export --------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write PATH.npz (the arrays) and PATH.json (routing config + summary); returns the .npz path."""
        path = Path(path)
        path = path.with_suffix("") if path.suffix in (".npz", ".json") else path
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(self.arrays())
        arrays.pop("latest", None)
        if "token_classes" not in arrays and self.tokenizer is not None and len(self):
            arrays["token_classes"] = self.token_classes()
        np.savez_compressed(path.with_suffix(".npz"), **arrays)
        meta = {"format": FORMAT_VERSION, "routing": self.routing, "record_scores": self.has_scores,
                "summary": self.summary() if len(self) else None}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
        return path.with_suffix(".npz")

    @classmethod
    def load(cls, path: str | Path, tokenizer=None) -> "Trace":
        path = Path(path)
        path = path.with_suffix("") if path.suffix in (".npz", ".json") else path
        npz, meta_path = path.with_suffix(".npz"), path.with_suffix(".json")
        if not npz.is_file() or not meta_path.is_file():
            raise MoeEngineError(f"no saved trace at {path} (want {npz.name} and {meta_path.name}); "
                                 "check the path given to trace.save()")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise MoeEngineError(f"{meta_path} is trace format {meta.get('format')}, this version reads "
                                 f"{FORMAT_VERSION}; save the trace again with this version")
        with np.load(npz, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        trace = cls(meta["record_scores"], tokenizer)
        trace.routing, trace._frozen = meta["routing"], arrays
        return trace


def _stack(layers: list[list[torch.Tensor]], n: int, width: int, fill, dtype) -> np.ndarray:
    """Per-layer lists of [T_i, w_i] device tensors -> [L, n, width] numpy, narrower rows padded with fill.
    One device-to-host copy per layer when the widths agree (the usual case)."""
    out = np.full((len(layers), n, width), fill, dtype=dtype)
    host = torch.float32 if dtype == np.float32 else torch.int64
    for layer, parts in enumerate(layers):
        if parts and all(p.shape[1] == width for p in parts):
            out[layer] = torch.cat(parts).to("cpu", host).numpy()
            continue
        start = 0
        for part in parts:
            rows, w = part.shape
            out[layer, start:start + rows, :w] = part.to("cpu", host).numpy()
            start += rows
    return out
