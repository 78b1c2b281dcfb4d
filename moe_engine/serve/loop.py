"""The engine loop of the server: one background thread owns the LLM's engine; requests come in through a queue."""

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from moe_engine.errors import MoeEngineError
from moe_engine.llm import _stable_len
from moe_engine.sampling import SamplingParams
from moe_engine.sequence import Sequence


class Busy(Exception):
    """The waiting queue is full: answer 503 and ask the client to retry later."""


@dataclass(eq=False)
class Request:
    """One HTTP request's generation. Events reach the handler on `events` (an asyncio queue of its
    event loop): ("delta", text, token_ids[, logprobs of those tokens when asked]), then ("logprobs", ...)
    for a non-streaming request that asked, then ("done", finish_reason, counts) or ("error", message);
    counts: {"completion_tokens", "cached_tokens"}. In an engine process, aio_loop and events are None."""
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    aio_loop: asyncio.AbstractEventLoop | None
    events: asyncio.Queue | None = field(default_factory=asyncio.Queue)
    rid: int = 0
    seq: Sequence | None = None
    cancelled: bool = False
    sent_chars: int = 0
    sent_tokens: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    last_token: float | None = None
    top_logprobs: int | None = None       # set: the finished request also gets ("logprobs", ...)



def deliver_to_event_loops(items: list) -> None:
    """Hand (request, event) pairs to their handlers: one wake-up per event loop for the lot."""
    by_loop: dict = {}
    for req, event in items:
        by_loop.setdefault(req.aio_loop, []).append((req.events, event))
    for aio_loop, batch in by_loop.items():
        aio_loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list) -> None:
    for events, event in batch:
        events.put_nowait(event)


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count) in seconds."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum, self.count = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class EngineLoop:
    """Runs llm.engine in one thread: every submitted request joins the running batch (continuous
    batching across clients). At most max_waiting requests wait to be admitted; past that, Busy."""

    def __init__(self, llm, max_waiting: int = 256, deliver=deliver_to_event_loops):
        self.llm, self.engine, self.max_waiting, self.deliver = llm, llm.engine, max_waiting, deliver
        self.tokenizer, self.max_model_len, self.path = llm.tokenizer, llm.max_model_len, llm.path
        self.inbox: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.num_queued = 0                       # submitted, not yet running or finished (under lock)
        self.admit = threading.Event()           # cleared: new requests stay queued (drain, tests)
        self.admit.set()
        self.stopping = threading.Event()
        self.live: dict[Sequence, Request] = {}
        self.queued: list[Request] = []           # taken from the inbox, not yet running (engine thread only)
        self.tokens_generated = 0
        self.requests_done = 0
        self.ttft = Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.per_token = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.on_queued = None                     # called with num_queued when it changes (an engine process)
        self.thread = threading.Thread(target=self._run, name="moe-engine-loop", daemon=True)

    def start(self) -> "EngineLoop":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def submit(self, req: Request) -> None:
        with self.lock:
            if self.num_queued >= self.max_waiting:
                raise Busy(f"the server is busy: {self.num_queued} requests are waiting already; retry shortly")
            self.num_queued += 1
        self.inbox.put(("add", req))

    def cancel(self, req: Request) -> None:
        """The client went away: drop the request and free its cache blocks (in the engine thread)."""
        req.cancelled = True
        self.inbox.put(("abort", req))

    # Engine thread from here on.
    def _run(self) -> None:
        reported = 0
        while not self.stopping.is_set():
            idle = not self.engine.has_work() and not self.queued
            try:
                item = self.inbox.get(timeout=0.5) if idle else self.inbox.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:
                self._handle(item)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            if self.admit.is_set():
                for req in self.queued:
                    self._add(req)
                self.queued = []
            if self.engine.has_work():
                self._step()
            self._update_queued()
            if self.on_queued is not None and self.num_queued != reported:
                reported = self.num_queued
                self.on_queued(reported)

    def _handle(self, item) -> None:
        kind, req = item
        if kind == "add":
            self.queued.append(req)
        elif kind == "call":            # work that must run in the engine thread (an engine process's replies)
            req()
        elif kind == "abort" and req.seq is not None and not req.seq.finished:
            self.engine.abort(req.seq)
            self.live.pop(req.seq, None)

    def _add(self, req: Request) -> None:
        if req.cancelled:
            return
        try:
            req.seq = self.llm._new_sequence(req.prompt_ids, req.params)   # validates, then engine.add
        except MoeEngineError as e:
            self.deliver([(req, ("error", str(e)))])
            return
        except Exception as e:          # never let one request take the loop down
            self.deliver([(req, ("error", f"{type(e).__name__}: {e}"))])
            return
        req.seq.streaming = req.stream or bool(req.params.stop)
        req.seq.logprobs = req.top_logprobs
        self.live[req.seq] = req

    def _update_queued(self) -> None:
        running = set(self.engine.scheduler.running)
        waiting = [r for r in self.queued] + [r for r in self.live.values() if r.seq not in running]
        with self.lock:
            self.num_queued = len(waiting) + self.inbox.qsize()

    def _step(self) -> None:
        try:
            produced = self.engine.step()
        except Exception as e:          # a failed step fails the requests in it, not the server
            failed = []
            for seq, req in list(self.live.items()):
                self.engine.abort(seq)
                failed.append((req, ("error", f"engine step failed: {type(e).__name__}: {e}")))
            self.live.clear()
            self.deliver(failed)
            return
        now, outbox = time.perf_counter(), []
        for seq, _ in produced:
            req = self.live.get(seq)
            if req is None:
                continue
            if seq.finish_reason == "error":        # this request alone failed (see Engine.step)
                req.emit_later(outbox, "error", seq.error)
                self.live.pop(seq, None)
                continue
            self.tokens_generated += 1
            if req.last_token is None:
                self.ttft.observe(now - req.submitted)
            else:
                self.per_token.observe(now - req.last_token)
            req.last_token = now
            if req.stream:
                self._send_delta(req, outbox)
            if seq.finished:
                if not req.stream:
                    outbox.append((req, ("delta", seq.text, list(seq.output_ids))))
                if req.top_logprobs is not None and not req.stream:
                    outbox.append((req, ("logprobs", *self._logprobs(seq))))
                counts = {"completion_tokens": len(seq.output_ids), "cached_tokens": seq.num_prompt_cached}
                outbox.append((req, ("done", seq.finish_reason, counts)))
                self.live.pop(seq, None)
                self.requests_done += 1
        if outbox:
            self.deliver(outbox)

    @staticmethod
    def _logprobs(seq: Sequence, start: int = 0) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """Output tokens start.. : each one's log-probability and the likeliest alternatives there, as the
        engine recorded them from the step's logits (the log-softmax of the model's distribution)."""
        picked = seq.token_logprobs[start:]
        return [lp for lp, _ in picked], [alts for _, alts in picked]

    @staticmethod
    def _send_delta(req: Request, outbox: list) -> None:
        seq = req.seq
        ready = len(seq.text) if seq.finished else _stable_len(seq.text, seq.params.stop)
        if ready > req.sent_chars or seq.finished:
            extra = (EngineLoop._logprobs(seq, req.sent_tokens),) if req.top_logprobs is not None else ()
            outbox.append((req, ("delta", seq.text[req.sent_chars:ready], seq.output_ids[req.sent_tokens:], *extra)))
            req.sent_chars, req.sent_tokens = max(ready, req.sent_chars), len(seq.output_ids)

    def metrics(self) -> str:
        """Prometheus text exposition of the loop's state."""
        blocks = self.engine.blocks
        gauges = [("moe_engine_requests_running", "requests in the running batch", len(self.engine.scheduler.running)),
                  ("moe_engine_requests_waiting", "requests waiting to be admitted", self.num_queued),
                  ("moe_engine_cache_blocks_used", "KV-cache blocks in use", blocks.num_blocks - blocks.num_free),
                  ("moe_engine_cache_blocks_total", "KV-cache blocks in all", blocks.num_blocks)]
        lines = []
        for name, help_text, value in gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        for name, help_text, value in [("moe_engine_generated_tokens_total", "tokens generated", self.tokens_generated),
                                       ("moe_engine_requests_finished_total", "requests finished", self.requests_done)]:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
        lines += self.ttft.lines("moe_engine_time_to_first_token_seconds", "time from request to its first token")
        lines += self.per_token.lines("moe_engine_time_per_output_token_seconds", "time between output tokens")
        return "\n".join(lines) + "\n"
