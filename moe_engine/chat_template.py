"""Chat templates rendered as transformers renders them, in a sandbox with a time and an output-size limit.

A template is untrusted code from the checkpoint: it may loop for ever or build a 10 GB string. Python code
cannot be killed from another thread, so the limits stop the work itself: every template `for` loop and
the output stream check the clock, and every operation that can make a big value in one step (`*`, `+`,
`~`, `**`, `%`, str methods and filters with a width) checks its size first. Exceeding a limit is a
MoeEngineError naming the template's file, within about the time limit.
"""

import json
import re
import time
from contextvars import ContextVar
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moe_engine.errors import MoeEngineError

MAX_SECONDS = 2.0          # wall time of one rendering
MAX_CHARS = 1 << 23        # 8 Mi characters: any one value, and the whole output (a prompt is far less)
_BIG_WIDTH = re.compile(r"(?:%[-+ #0]*\d*\.?|\{[^{}]*:[^{}\d]*)(\d{8,})")   # a spec's width of 10**7 and up
_ARG_WIDTH = re.compile(r"%[^a-zA-Z%]*\*|\{[^{}]*\{")  # a width taken from the arguments
_COUNT_FILTERS = {"center", "indent", "wordwrap", "truncate", "batch", "slice"}
_COUNT_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs"}


class _LimitExceeded(Exception):
    pass


class _Limits:
    def __init__(self, seconds: float, chars: int):
        self.deadline = time.monotonic() + seconds
        self.seconds, self.chars = seconds, chars

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"it ran longer than {self.seconds:g} s (an endless or huge loop)")

    def size(self, n: int, what: str = "a value") -> None:
        if n > self.chars:
            raise _LimitExceeded(f"it built {what} of {n} items, over the limit of {self.chars}")


class _Ticking:
    """An iterable of a template `for` loop that checks the clock at each step; len() as the wrapped one's."""

    def __init__(self, inner, limits: _Limits):
        self.inner, self.limits = inner, limits

    def __iter__(self):
        for i, item in enumerate(self.inner):
            if not i & 63:
                self.limits.tick()
            yield item

    def __len__(self):
        return len(self.inner)


class _LimitedCodeGenerator(CodeGenerator):
    """Jinja's code generator with each `for` loop's iterable and each `~` concatenation passed through the
    environment's limits (node.iter is wrapped in place: a template is compiled once)."""

    def visit_For(self, node: nodes.For, frame) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("limited_iter"), [node.iter], [], None, None)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.limited_value(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Generation(jinja2.ext.Extension):
    """transformers' {% generation %} ... {% endgeneration %} tag: renders its body (the assistant-token mask
    transformers can record from it is not needed for inference)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _length(v) -> int | None:
    return len(v) if isinstance(v, (str, list, tuple)) else None


class _Namespace(jinja2.utils.Namespace):
    """transformers' namespace: no underscore-prefixed attributes."""

    def __init__(*args, **kwargs):  # noqa: N805 (jinja's signature trick: namespace(self=...) works)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes "
                                                  f"on a namespace, got {name!r}")


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment (trim_blocks, lstrip_blocks, loopcontrols, its tojson,
    raise_exception, strftime_now, namespace) with the limits of one rendering."""

    code_generator_class = _LimitedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
        self._limits: ContextVar[_Limits | None] = ContextVar("chat_template_limits", default=None)
        self.filters = {name: self._sized(name, f) for name, f in self.filters.items()}
        self.filters["tojson"] = self._sized("tojson", _tojson)
        self.globals.pop("lipsum", None)       # a text generator no chat template needs
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)

    # -- the limits ------------------------------------------------------------------------------------
    @property
    def limits(self) -> _Limits:
        return self._limits.get() or _Limits(MAX_SECONDS, MAX_CHARS)

    def limited_iter(self, iterable):
        self.limits.size(_length(iterable) or 0, "a loop")
        return _Ticking(iterable, self.limits)

    def limited_value(self, value):
        limits = self.limits
        limits.tick()
        n = _length(value)
        if n is not None:
            limits.size(n, "a string")
        return value

    def _check_counts(self, args, kwargs) -> None:
        """Widths and counts given to str methods and filters that build a value that big."""
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.limits.chars:
                raise _LimitExceeded(f"it asked for a width or count of {a}, over the limit of {self.limits.chars}")

    def _check_format(self, fmt, args, kwargs=None) -> None:
        if not isinstance(fmt, str):
            return
        big = _BIG_WIDTH.search(fmt)
        if big:
            raise _LimitExceeded(f"it asked for a format width of {big[1]}")
        if _ARG_WIDTH.search(fmt):        # widths taken from the arguments: "%*s", "{:{w}}"
            self._check_counts(args, kwargs or {})

    def _check_replace(self, s, old="", new="") -> None:
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            count = len(s) + 1 if old == "" else s.count(old)
            self.limits.size(len(s) + count * max(0, len(new) - len(old)), "a string")

    def _check_join(self, items, sep) -> None:
        n = _length(items)
        if n and isinstance(sep, str):
            self.limits.size(len(sep) * (n - 1), "a string")

    def _sized(self, name: str, f):
        """A filter with its size checks (the value filtered is the first argument after any context that
        jinja passes), its result's size checked too."""
        skip = 1 if hasattr(f, "jinja_pass_arg") else 0

        def filtered(*args, **kwargs):
            self.limits.tick()
            value, params = (args[skip], args[skip + 1:]) if len(args) > skip else (None, ())
            if name in _COUNT_FILTERS:
                self._check_counts(params, kwargs)
            elif name == "format":
                self._check_format(value, params, kwargs)
            elif name == "replace":
                self._check_replace(value, *params[:2])
            elif name == "join":
                self._check_join(value, params[0] if params else kwargs.get("d", ""))
            return self.limited_value(f(*args, **kwargs))
        if hasattr(f, "jinja_pass_arg"):       # pass_context / pass_eval_context / pass_environment
            filtered.jinja_pass_arg = f.jinja_pass_arg
        return filtered

    def call_binop(self, context, operator, left, right):
        limits = self.limits
        limits.tick()
        if operator == "*":
            seq, n = (left, right) if _length(left) is not None else (right, left)
            if _length(seq) is not None and isinstance(n, int):
                limits.size(_length(seq) * max(n, 0), "a string or list")
        elif operator == "+" and _length(left) is not None and _length(right) is not None:
            limits.size(_length(left) + _length(right), "a string or list")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            limits.size(max(left.bit_length(), 1) * right // 4, "a number of digits")   # ~hex digits
        elif operator == "%" and isinstance(left, str):
            self._check_format(left, right if isinstance(right, tuple) else (right,))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (the sandbox's signature)
        __self.limits.tick()
        name = getattr(__obj, "__name__", "")
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)   # the sandbox wraps str.format
        if isinstance(owner, str):
            if name in _COUNT_METHODS:
                __self._check_counts(args, kwargs)
            elif name == "replace":
                __self._check_replace(owner, *args[:2])
            elif name == "join" and args:
                __self._check_join(args[0], owner)
            elif name in ("format", "format_map"):
                __self._check_format(owner, args, kwargs)
        return __self.limited_value(super().call(__context, __obj, *args, **kwargs))

    # -- rendering -------------------------------------------------------------------------------------
    def render(self, template: jinja2.Template, source: str, seconds: float = MAX_SECONDS,
               chars: int = MAX_CHARS, **context) -> str:
        """template rendered with context, stopped with a MoeEngineError naming source past the limits."""
        limits = _Limits(seconds, chars)
        token = self._limits.set(limits)
        out, n = [], 0
        try:
            for chunk in template.generate(**context):
                n += len(chunk)
                limits.size(n, "an output")
                limits.tick()
                out.append(chunk)
        except _LimitExceeded as e:
            raise MoeEngineError(f"the chat template from {source} was stopped: {e}; fix or replace the "
                                 "template (or pass prompts as plain text)") from None
        except jinja2.exceptions.TemplateError as e:
            if type(e) is jinja2.exceptions.TemplateError:      # raise_exception(...) in the template
                raise MoeEngineError(f"the chat template from {source} refused the conversation: {e}") from None
            raise MoeEngineError(f"the chat template from {source} failed ({type(e).__name__}: {e}); check the "
                                 "messages (role and content of each) or fix the template") from None
        except RecursionError:
            raise MoeEngineError(f"the chat template from {source} recursed too deep; fix the template") from None
        except MemoryError:
            raise MoeEngineError(f"the chat template from {source} ran out of memory; fix the template") from None
        except Exception as e:    # any other failure of template code is the template's, not ours
            raise MoeEngineError(f"the chat template from {source} failed ({type(e).__name__}: {e}); check the "
                                 "messages or fix the template") from None
        finally:
            self._limits.reset(token)
        return "".join(out)


def compile_template(env: LimitedEnvironment, text: str, source: str) -> jinja2.Template:
    try:
        return env.from_string(text)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise MoeEngineError(f"the chat template in {source} has a syntax error (line {e.lineno}: {e.message}); "
                             "fix the template or re-download the file") from None
    except RecursionError:
        raise MoeEngineError(f"the chat template in {source} is nested too deep to compile; fix it") from None


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping, and its options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)
