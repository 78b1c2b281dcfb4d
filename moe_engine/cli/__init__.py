"""The `moe-engine` command: generate, chat, info, bench and routing subcommands, with one-line errors."""

import argparse
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

DEFAULT_MODEL = "weights/tiny-mixtral"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
BENCHMARKS = {"decode": "moe_engine.bench.decode", "kernels": "moe_engine.bench.kernels",
              "tune": "moe_engine.bench.tune", "serve": "moe_engine.bench.serve",
              "quant": "moe_engine.bench.quant_quality", "kv": "moe_engine.bench.kv", "spec": "moe_engine.bench.spec"}


class UsageError(Exception):
    """A command line argparse refused; printed on one line like our own errors."""


class StartUpInterrupt:
    """The SIGINT handler while torch imports and the model loads: say so and leave at once, as nothing has
    been produced yet. A raised KeyboardInterrupt is not enough there: a third-party `except:` around an
    optional import can swallow it, and the command then ran to the end as if never interrupted (or failed
    later with a traceback from a half-imported module)."""

    def __call__(self, signum, frame):
        _say("\ninterrupted")
        if sys.stderr is not None:
            sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def on_sigint(handler):
    """Install a SIGINT handler (None: leave things as they are); returns the one it replaced, or None.
    Only the main thread can; a process told to ignore SIGINT (started in the background, nohup) keeps
    ignoring it."""
    if (handler is None or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) == signal.SIG_IGN):
        return None
    return signal.signal(signal.SIGINT, handler)


def started() -> None:
    """Start-up is over: from here Ctrl-C raises KeyboardInterrupt, which the command turns into a clean stop
    that keeps what it produced (the text so far, a finished file)."""
    if isinstance(signal.getsignal(signal.SIGINT), StartUpInterrupt):
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message}; see `{self.prog} --help`")


def resolve_model(name: str) -> Path:
    """A relative folder is looked up from the current directory, then from the repository root (so the
    shipped weights/ work from anywhere in an editable install)."""
    path = Path(name).expanduser()
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--model", default=os.environ.get("MOE_ENGINE_MODEL") or DEFAULT_MODEL,
                        help="model folder: config.json + *.safetensors + tokenizer "
                             "(default: $MOE_ENGINE_MODEL or %(default)s)")
    common.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu")
    common.add_argument("--dtype", default="auto",
                        help="float32, bfloat16 or float16 (auto: bfloat16 on CUDA and on CPUs with native bf16, else "
                             "float32; float16 on MPS; `moe-engine info` says which and why)")
    common.add_argument("--no-cuda-graphs", action="store_true",
                        help="on CUDA, run every decode step eagerly instead of replaying CUDA graphs")
    common.add_argument("--compile", action="store_true",
                        help="on the CPU, compile decode steps with torch.compile: faster steps after a compile "
                             "of tens of seconds (cached on disk: seconds in later runs)")
    add_quant_arguments(common)
    common.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8", "int8", "int4"),
                        help="KV cache storage: auto (the model dtype), fp8 (e4m3) or int8, with a scale per token "
                             "and head (MLA: per 128 latent values) set as each token is written, or int4 (a scale "
                             "and zero point per 64 values)")
    common.add_argument("--quiet", action="store_true", help="no loading bar (shown on a terminal) and no stats line")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")

    sampling = Parser(add_help=False)
    sampling.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default %(default)s)")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default %(default)s)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    sampling.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = off)")
    sampling.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * the top probability")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    sampling.add_argument("--seed", type=int, default=None, help="same seed, same text")
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="stop when this text appears (repeatable)")

    spec = Parser(add_help=False)
    spec.add_argument("--speculative", metavar="METHOD[:K]", default=None,
                      help="speculative decoding: ngram (prompt lookup over the request's own tokens), "
                           "draft=DIR (another checkpoint with the same tokenizer drafts greedily), self[=TOPK] "
                           "(the MoE model drafts for itself with its best TOPK experts, default 1) or mtp "
                           "(a DeepSeek-V3 checkpoint's multi-token-prediction layer), with K drafts a step "
                           "(default 3), e.g. ngram:5, draft=weights/tiny-mixtral-int4:3 or self=1:3")

    parser = Parser(prog="moe-engine", description="A Mixture-of-Experts LLM inference engine.")
    from moe_engine import __version__
    parser.add_argument("--version", action="version", version=f"moe-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,chat,info,bench,routing,quantize,serve}")
    gen = sub.add_parser("generate", parents=[common, sampling, spec], help="complete a prompt, streaming to stdout",
                         description="Complete a prompt; the text streams to stdout, a tokens/s line to stderr.")
    gen.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    gen.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt first")
    sub.add_parser("chat", parents=[common, sampling, spec], help="interactive multi-turn chat (REPL)",
                   description="Chat with a model; /help inside lists the commands.")
    sub.add_parser("info", parents=[common], help="architecture, experts, parameter counts, KV-cache cost",
                   description="Load a model and describe it.")
    bench = sub.add_parser("bench", help="run a benchmark (decode, kernels, or tune: measure kernel tiles)",
                           description="Run a benchmark; arguments after its name go to it.")
    bench.add_argument("which", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments (see `bench NAME --help`)")
    bench.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    routing = sub.add_parser("routing", parents=[common], help="trace expert routing over a text: plots and a summary",
                             description="Run a text file through the model with routing traced; write the trace, "
                                         "heatmaps and a Markdown summary.")
    from moe_engine.cli.routing import add_arguments
    add_arguments(routing)
    quantize = sub.add_parser("quantize", parents=[common], help="write the model quantized (compressed-tensors)",
                              description="Quantize the model's experts (and what the flags add) and write them as "
                                          "a compressed-tensors pack-quantized folder, tokenizer files alongside.")
    from moe_engine.cli.quantize import add_arguments as add_quantize_arguments
    add_quantize_arguments(quantize)
    serve = sub.add_parser("serve", parents=[common], help="an OpenAI-compatible HTTP server",
                           description="Serve the model over HTTP with the OpenAI API (/v1/completions, "
                                       "/v1/chat/completions, /v1/models), plus /health and /metrics.")
    from moe_engine.serve.cli import add_arguments as add_serve_arguments
    add_serve_arguments(serve)
    return parser


def add_quant_arguments(parser, required: bool = False) -> None:
    """--quantization and its settings (moe_engine.config.EngineConfig's quantization fields)."""
    from moe_engine.quantize import METHODS
    parser.add_argument("--quantization", choices=METHODS, default=None, required=required,
                        help="hold weights quantized, quantized as they load: int8 (per channel), int4 (groups), "
                             "fp8 (e4m3 per channel) or fp8-block (128x128); routed and shared experts")
    parser.add_argument("--quant-group-size", "--group-size", type=int, default=128, metavar="N",
                        help="int4 group size along the input (default %(default)s; 32 or 64 are finer)")
    parser.add_argument("--quant-asymmetric", action="store_true", help="int4 with a zero point per group")
    parser.add_argument("--quantize-attention", action="store_true", help="quantize the attention projections too")
    parser.add_argument("--quantize-dense-mlp", action="store_true", help="quantize dense layers' MLPs too")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="quantize the LM head too (not when it is tied to the embedding)")
    parser.add_argument("--no-clip-search", action="store_true",
                        help="round to nearest instead of searching each group's clipping range")


def quant_settings(args) -> dict:
    """EngineConfig keyword arguments from add_quant_arguments' flags."""
    if getattr(args, "quantization", None) is None:
        return {}
    return {"quantization": args.quantization, "quant_group_size": args.quant_group_size,
            "quant_symmetric": not args.quant_asymmetric, "quantize_attention": args.quantize_attention,
            "quantize_dense_mlp": args.quantize_dense_mlp, "quant_clip_search": not args.no_clip_search,
            "quantize_lm_head": args.quantize_lm_head}


def sampling_params(args):
    from moe_engine.sampling import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=list(args.stop))


def device_and_dtype(args):
    """Checked before anything is loaded, so a bad flag fails at once."""
    from moe_engine.device import pick_device, pick_dtype
    from moe_engine.llm import check_compile
    device = pick_device(args.device)
    if getattr(args, "compile", False):
        check_compile(device)
    return device, pick_dtype(args.dtype, device)


def llm_settings(args):
    """(model folder, device, dtype, EngineConfig) from the command line, as LLM(...) takes them."""
    device, dtype = device_and_dtype(args)
    graphs = False if getattr(args, "no_cuda_graphs", False) else None
    compile = getattr(args, "compile", False)
    if compile and not args.quiet:      # a silent half minute would look like a hang
        print("compiling the decode step with torch.compile after loading (tens of seconds the first time, "
              "a few once torch has cached it)...", file=sys.stderr, flush=True)
    from moe_engine.config import EngineConfig
    from moe_engine.speculative import parse_speculative
    speculative = getattr(args, "speculative", None)
    spec = parse_speculative(speculative) if speculative else None
    config = EngineConfig(cuda_graphs=graphs, compile=compile, kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
                          speculative_config=spec, **quant_settings(args))
    return resolve_model(args.model), device, dtype, config


def load_llm(args):
    from moe_engine.llm import LLM
    path, device, dtype, config = llm_settings(args)
    llm = LLM(path, device, dtype, config=config, progress=show_progress(args))
    started()
    return llm


def show_progress(args) -> bool:
    """The loading bar, on a terminal only: a redirected stderr gets no carriage-return noise."""
    return not args.quiet and sys.stderr.isatty()


def read_stdin(what: str) -> str:
    """All of stdin as UTF-8 text; a closed stdin or bytes that are not UTF-8 are one-line errors."""
    from moe_engine.errors import MoeEngineError
    if sys.stdin is None:
        raise MoeEngineError(f"stdin is closed but {what} reads it; pipe text in, or pass it as an argument")
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MoeEngineError(f"stdin is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                             "convert it first, e.g. with iconv -t utf-8") from None


def check_output_path(path, folder: bool, flag: str = "--out") -> Path:
    """Before any work: `path` can become the folder (folder=True) or the file that will be written; the
    nearest existing ancestor must be a folder. MoeEngineError naming the flag otherwise."""
    from moe_engine.errors import MoeEngineError
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise MoeEngineError(f"{flag} {path} is a file but a folder is wanted; give a folder path (new or existing)")
    if not folder and path.is_dir():
        raise MoeEngineError(f"{flag} {path} is a folder but a file is wanted; give a file path such as {path}/out.json")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise MoeEngineError(f"{flag} {path}: {parent} is a file, so nothing can be written under it; give another path")
    return path


def run_generate(args) -> int:
    from moe_engine.errors import MoeEngineError
    params = sampling_params(args)
    prompt = read_stdin("`generate -`") if args.prompt == "-" else args.prompt
    bad = next((i for i, c in enumerate(prompt) if "\ud800" <= c <= "\udfff"), None)
    if bad is not None:         # argv bytes the locale could not decode reach Python as lone surrogates
        raise MoeEngineError(f"the prompt is not UTF-8 text (an undecodable byte at character {bad}); "
                             "pass UTF-8 text, or pipe a UTF-8 file in with `-` as the prompt")
    if not prompt:
        raise MoeEngineError("empty prompt; pass the prompt text, or pipe it in with `-` as the prompt")
    llm = load_llm(args)
    start, shown = time.perf_counter(), ""
    stream = llm.stream(prompt, params)
    try:
        first = next(stream, "")            # a refused prompt (e.g. too long) fails here, before any output
        first_at = time.perf_counter() - start if first else None
        shown = ("" if args.no_echo else prompt) + first
        sys.stdout.write(shown)
        sys.stdout.flush()
        for piece in stream:
            first_at = first_at or time.perf_counter() - start
            shown += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:
        stream.close()
        if shown and not shown.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
    if not args.quiet:
        stats = llm.last_stats
        n, seconds = stats["generated_tokens"], stats["seconds"]
        finish = getattr(llm.last_output, "finish_reason", "?")
        first = f", first token after {first_at:.2f} s" if first_at is not None else ""
        if stats.get("draft_tokens"):
            first += (f"; drafts accepted {stats['accepted_tokens']}/{stats['draft_tokens']} "
                      f"({stats['accepted_tokens'] / stats['draft_tokens']:.0%})")
        print(f"[{n} tokens in {seconds:.2f} s: {n / seconds if seconds else 0:.1f} tokens/s{first}; prompt "
              f"{stats['prompt_tokens']} tokens; finish: {finish}; {llm.device.type} "
              f"{str(llm.dtype).removeprefix('torch.')}]", file=sys.stderr)
    return 0


def run_chat(args) -> int:
    from moe_engine.cli.repl import Chat, banner, enable_line_editing
    from moe_engine.tokenizer import require_tokenizer
    from moe_engine.errors import MoeEngineError
    params = sampling_params(args)
    if sys.stdin is None:
        raise MoeEngineError("stdin is closed but chat reads your turns from it; run it on a terminal or pipe text in")
    llm = load_llm(args)
    require_tokenizer(llm.tokenizer, llm.path)
    enable_line_editing()
    print(banner(llm, args.model), flush=True)
    return Chat(llm, params, debug=args.debug).run()


def run_info(args) -> int:
    from moe_engine.cli.info import describe
    device, dtype = device_and_dtype(args)
    from moe_engine.config import EngineConfig
    from moe_engine.device import default_dtype
    quant = EngineConfig(**quant_settings(args)).quant_spec()
    why = "picked because " + default_dtype(device)[1] if args.dtype in (None, "auto") else "as --dtype asked"
    rows = describe(resolve_model(args.model), device, dtype, progress=show_progress(args), quant=quant,
                    kv_cache_dtype=args.kv_cache_dtype, dtype_reason=why)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


def run_bench(args) -> int:
    module_name = BENCHMARKS[args.which]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if e.name == module_name:
            print(f"error: the {args.which} benchmark is not in this install ({module_name} is missing); "
                  "update moe-engine to a version that has it", file=sys.stderr)
        else:
            print(f"error: the {args.which} benchmark needs {e.name or 'a module'} that is not installed "
                  f"({e}); install it into this environment", file=sys.stderr)
        return EXIT_RUNTIME
    result = module.main(args.args)
    return result if isinstance(result, int) else 0


def run_routing(args) -> int:
    from moe_engine.cli.routing import run
    return run(args)


COMMANDS = {"generate": run_generate, "chat": run_chat, "info": run_info, "bench": run_bench, "routing": run_routing,
            "quantize": lambda args: importlib.import_module("moe_engine.cli.quantize").run(args),
            "serve": lambda args: importlib.import_module("moe_engine.serve.cli").run(args)}


# Commands whose start-up includes loading the model (load_llm ends it); the others start at once.
LOADS_FIRST = ("generate", "chat", "routing")


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _say(line: str) -> None:
    """A line on stderr, if there is one (a process may be started with it closed)."""
    if sys.stderr is not None:
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The command; returns its exit code: 0, 1 (failed while running), 2 (bad input), 130 (Ctrl-C)."""
    previous = on_sigint(StartUpInterrupt())
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        _say("\ninterrupted")
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:             # called in-process (tests, scripts): leave SIGINT as it was
            signal.signal(signal.SIGINT, previous)


def _main(argv: list) -> int:
    from moe_engine.errors import MoeEngineError     # imports torch: after main's Ctrl-C handler is in place
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if sys.stdout is None:
            raise MoeEngineError("stdout is closed, so there is nowhere to write the output; "
                                 "redirect it to a file or /dev/null instead of closing it")
        if args.command not in LOADS_FIRST:
            started()
        return COMMANDS[args.command](args)
    except UsageError as e:
        _say(f"error: {_one_line(e)}")
        return EXIT_USAGE
    except MoeEngineError as e:
        if debug:
            traceback.print_exc()
        _say(f"error: {_one_line(e)}")
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep Python from complaining at exit.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):    # no real file behind stdout (e.g. captured)
            pass
        return 0
    except Exception as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        _say(f"error: {type(e).__name__}: {_one_line(e)}{hint}")
        return EXIT_RUNTIME

