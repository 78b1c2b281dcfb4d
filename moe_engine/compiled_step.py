"""A torch.compile'd function whose compiled graph, once torch has chosen it for a shape, is called directly.

On every call torch.compile runs Python bytecode that checks its guards (hundreds for a model: each
module, parameter and input) and fetches every parameter through its attribute chain before the compiled
graph runs: ~0.3-0.5 ms a call on 2 cores for the tiny models' decode step, a tenth of the step at a batch
of 8. A decode step calls the same function with the same model and caches every time; only the step's
small input tensors change, and of those only their sizes matter to the guards.

So the first call with a given key (the caller's summary of those sizes) goes through torch.compile as
usual. Its compiled graph records the flat arguments torch gave it, and each argument's source (the
expression torch read it from, e.g. L['head'].size()[0]). Later calls with that key rebuild the argument
list by re-reading only the sources rooted in the per-call inputs, and call the graph. Everything else
(parameters, caches) is the object torch read then; should one of those tensors be given other storage
(a parameter re-stored in another dtype), the direct call is dropped and the call goes through torch.
Where any of this cannot be read (another torch version), every call simply goes through torch.compile.
"""

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class _Direct:
    graph: Callable            # the compiled graph: takes the flat arguments
    args: list                 # the flat arguments of the call that recorded it
    per_call: list             # (position, reader of the per-call inputs) for the arguments that change
    tensors: list              # every other tensor argument
    pointers: list             # and where its data was then
    single: bool               # the function returns the graph's one output, not a tuple of them


@dataclass
class _Served:
    graph: Callable
    sources: list
    args: tuple
    out: Any


class CompiledStep:
    """fn compiled with Inductor (options as its config), called as step(key, *args): the parameters of fn
    named in `per_call` are the inputs that change between calls, and the key sums up what of them
    torch.compile's guards could tell apart (their sizes). A call with a key seen before skips the guards
    and the bytecode. fn returns a tensor or a tuple of tensors."""

    def __init__(self, fn: Callable, per_call: tuple[str, ...], options: dict):
        self.per_call, self.options = per_call, options
        self.names = list(inspect.signature(fn).parameters)
        self.compiled = torch.compile(fn, backend=self._backend, dynamic=False, fullgraph=True)
        self.direct: dict = {}
        self._served: _Served | None = None

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list):
        from torch._inductor.compile_fx import compile_fx
        graph = compile_fx(gm, example_inputs, config_patches=self.options)
        sources = _sources(gm)

        def run(*args):
            out = graph(*args)
            self._served = _Served(graph, sources, args, out)
            return out
        return run

    def __call__(self, key, *args, before_trace: Callable[[], None] | None = None):
        """fn(*args); before_trace is called first when the call goes through torch.compile."""
        direct = self.direct.get(key)
        if direct is not None and list(map(_data_ptr, direct.tensors)) == direct.pointers:
            flat = list(direct.args)
            for pos, read in direct.per_call:
                flat[pos] = read(args)
            out = direct.graph(*flat)
            return out[0] if direct.single else tuple(out)
        if before_trace is not None:
            before_trace()
        self._served = None
        result = self.compiled(*args)
        self.direct.pop(key, None)
        direct = self._record(self._served, args, result)
        if direct is not None:
            self.direct[key] = direct
        return result

    def _record(self, served: _Served | None, args: tuple, result) -> _Direct | None:
        """The direct call for what torch just ran: one of our graphs, whose outputs are the result as they
        are, and whose every argument is the per-call input (or size) its source names or a tensor that
        later calls pass again; a number from anywhere else could change unseen, so it leaves the call to
        torch."""
        if served is None or served.sources is None:
            return None            # torch ran no graph of ours, or did not say where its inputs come from
        single = not isinstance(result, tuple)
        outs = (result,) if single else result
        if len(outs) != len(served.out) or not all(a is b for a, b in zip(outs, served.out)):
            return None            # the graph's outputs are not the result as they are
        per_call, tensors = [], []
        for pos, (source, value) in enumerate(zip(served.sources, served.args)):
            read = self._reader(source)
            if read is not None:
                if not _same(read(args), value):    # not what we think it is: leave this call to torch
                    return None
                per_call.append((pos, read))
            elif isinstance(value, torch.Tensor):
                tensors.append(value)
            else:
                return None
        return _Direct(served.graph, list(served.args), per_call, tensors, list(map(_data_ptr, tensors)), single)

    def _reader(self, source: str):
        """A function of the call's args giving the value of `source` when it is rooted in a per-call input
        (L['head'], L['head'].size()[0], ...); None for any other source."""
        for i, name in enumerate(self.names):
            root = f"L[{name!r}]"
            if name in self.per_call and source.startswith(root):
                return eval(f"lambda args: args[{i}]{source[len(root):]}")   # noqa: S307 (torch's own source text)
        return None


def _sources(gm: torch.fx.GraphModule) -> list[str] | None:
    """The source expression of each of the graph's inputs, in order; None where torch does not say."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            source = getattr(node.meta.get("grapharg"), "source", None)
            name = getattr(source, "name", None)
            name = name() if callable(name) else name
            if not isinstance(name, str):
                return None
            out.append(name)
    return out


_data_ptr = torch.Tensor.data_ptr


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b
