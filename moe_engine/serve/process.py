"""The server's engine in a process of its own: the HTTP side and the engine stop sharing one interpreter
lock. On the 2-core CPU machine, an engine thread beside uvicorn ran its steps 2.5x slower than alone,
waiting on the lock for the event loop's JSON and socket work; a process of its own runs them at full speed."""

import itertools
import multiprocessing
import threading
from pathlib import Path

from moe_engine.config import EngineConfig
from moe_engine.errors import MoeEngineError
from moe_engine.serve.loop import Busy, EngineLoop, Request, deliver_to_event_loops


class EngineProcess:
    """The parent's side: the EngineLoop interface the app uses (submit, cancel, metrics, start, stop,
    tokenizer, max_model_len, path), with the model loaded and stepped in a spawned child process.
    Requests go down a pipe; each engine step's events for all requests come back in one message."""

    def __init__(self, model: str | Path, device=None, dtype=None, config: EngineConfig | None = None,
                 max_waiting: int = 256, progress: bool = False, threads: int | None = None):
        self.path, self.max_waiting = Path(model), max_waiting
        context = multiprocessing.get_context("spawn")     # a forked torch with threads running can deadlock
        self.conn, child = context.Pipe()
        self.process = context.Process(target=worker_main, name="moe-engine-worker", daemon=True,
                                       args=(child, str(model), device, dtype, config or EngineConfig(),
                                             max_waiting, progress, threads))
        self.requests: dict[int, Request] = {}
        self.ids = itertools.count(1)
        self.lock = threading.Lock()            # guards the pipe's sending end and the counters
        self.num_queued = self.sent_since_report = 0
        self.replies: list = []
        self.replied = threading.Condition(self.lock)
        self.tokenizer = self.max_model_len = None
        self.reader: threading.Thread | None = None

    def start(self) -> "EngineProcess":
        """Start the child and wait until its model is loaded; a model that fails to load raises here
        with the child's one-line reason."""
        if self.reader is not None:
            return self
        from moe_engine.tokenizer import load_tokenizer
        self.process.start()
        while not self.conn.poll(0.2):
            if not self.process.is_alive():
                raise MoeEngineError(f"the engine process exited with code {self.process.exitcode} while loading "
                                     f"{self.path}; see its messages above")
        kind, payload = self.conn.recv()
        if kind == "fatal":
            self.process.join(timeout=10)
            raise MoeEngineError(payload)
        self.max_model_len = payload["max_model_len"]
        self.tokenizer = load_tokenizer(self.path, payload["hf_config"])
        self.reader = threading.Thread(target=self._read, name="moe-engine-worker-reader", daemon=True)
        self.reader.start()
        return self

    def stop(self) -> None:
        if self.process.is_alive():
            with self.lock, _quiet():
                self.conn.send(("stop",))
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()

    def submit(self, req: Request) -> None:
        with self.lock:
            if self.num_queued + self.sent_since_report >= self.max_waiting:
                raise Busy(f"the server is busy: {self.num_queued} requests are waiting already; retry shortly")
            if not self.process.is_alive():
                raise MoeEngineError("the engine process has stopped; restart the server")
            req.rid = next(self.ids)
            self.requests[req.rid] = req
            self.sent_since_report += 1
            self.conn.send(("add", req.rid, req.prompt_ids, req.params, req.stream, req.top_logprobs))

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self.lock, _quiet():
            self.conn.send(("abort", req.rid))

    def metrics(self) -> str:
        """The child's Prometheus text, asked for and waited on (at most one engine step)."""
        with self.lock:
            self.conn.send(("metrics",))
            if not self.replied.wait_for(lambda: self.replies, timeout=60):
                raise MoeEngineError("the engine process did not answer within 60 s")
            return self.replies.pop(0)

    def _read(self) -> None:
        """Parent thread: the child's messages to the requests' event loops."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "events":
                _, items, queued = message
                with self.lock:
                    self.num_queued, self.sent_since_report = queued, 0
                pairs = []
                for rid, event in items:
                    req = self.requests.get(rid)
                    if req is None:
                        continue
                    if event[0] in ("done", "error"):
                        del self.requests[rid]
                    pairs.append((req, event))
                deliver_to_event_loops(pairs)
            elif message[0] == "metrics":
                with self.lock:
                    self.replies.append(message[1])
                    self.replied.notify_all()
        failed = [(req, ("error", "the engine process stopped")) for req in self.requests.values()]
        self.requests.clear()
        deliver_to_event_loops(failed)


class _quiet:
    """Sending to a child that has exited already is not an error worth raising while shutting down."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, (BrokenPipeError, OSError))


def worker_main(conn, model: str, device, dtype, config: EngineConfig, max_waiting: int, progress: bool,
                threads: int | None = None) -> None:
    """The child: load the model, then run an EngineLoop whose events go back down the pipe. threads: the
    child's torch threads on the CPU (None: one fewer than torch's default, leaving a core to the HTTP side)."""
    import torch
    from moe_engine.llm import LLM
    try:
        llm = LLM(model, device, dtype, config=config, progress=progress)
        if llm.device.type == "cpu":
            torch.set_num_threads(threads or max(1, torch.get_num_threads() - 1))
    except KeyboardInterrupt:
        return
    except MoeEngineError as e:
        conn.send(("fatal", str(e)))
        return
    except Exception as e:             # say why in one line; the parent turns it into its error
        conn.send(("fatal", f"loading {model} failed: {type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"max_model_len": llm.max_model_len, "hf_config": llm.config}))
    send_lock, requests = threading.Lock(), {}

    def send(message) -> None:
        with send_lock:
            conn.send(message)

    def deliver(items: list) -> None:
        for req, event in items:
            if event[0] in ("done", "error"):
                requests.pop(req.rid, None)
        send(("events", [(req.rid, event) for req, event in items], loop.num_queued))

    loop = EngineLoop(llm, max_waiting, deliver)
    loop.on_queued = lambda n: send(("events", [], n))

    def read() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("stop",)
            kind = message[0]
            if kind == "add":
                _, rid, ids, params, stream, top = message
                req = Request(ids, params, stream, None, None, rid=rid, top_logprobs=top)
                requests[rid] = req
                loop.inbox.put(("add", req))
            elif kind == "abort" and message[1] in requests:
                loop.cancel(requests[message[1]])
            elif kind == "metrics":
                loop.inbox.put(("call", lambda: send(("metrics", loop.metrics()))))
            elif kind == "stop":
                loop.stopping.set()
                loop.inbox.put(None)
                return

    threading.Thread(target=read, name="moe-engine-worker-inbox", daemon=True).start()
    try:
        loop._run()
    except KeyboardInterrupt:
        pass
