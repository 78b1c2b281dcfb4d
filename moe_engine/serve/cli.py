"""The `moe-engine serve` command: its flags and the function that loads the model and runs uvicorn."""

import sys
from pathlib import Path

from moe_engine.errors import MoeEngineError


def add_arguments(parser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients ask for (default: the model folder's name)")
    parser.add_argument("--max-waiting", type=int, default=256,
                        help="requests that may wait for a place in the batch; past it, 503 (default %(default)s)")
    parser.add_argument("--default-max-tokens", type=int, default=256,
                        help="max_tokens of a request that gives none (default %(default)s)")
    parser.add_argument("--engine-thread", action="store_true",
                        help="run the engine in a thread of the server's process instead of a process of its own")


def run(args) -> int:
    try:
        import uvicorn
        from moe_engine.serve.app import create_app
    except ImportError as e:
        raise MoeEngineError(f"`moe-engine serve` needs {e.name or 'fastapi and uvicorn'}: "
                             "pip install 'moe-engine[serve]'") from None
    from moe_engine.cli import llm_settings, load_llm, show_progress
    from moe_engine.serve.process import EngineProcess
    if args.max_waiting < 0 or args.default_max_tokens < 1:
        raise MoeEngineError("--max-waiting must be >= 0 and --default-max-tokens >= 1")
    if args.engine_thread:
        engine = load_llm(args)
    else:
        path, device, dtype, config = llm_settings(args)
        engine = EngineProcess(path, device, dtype, config, args.max_waiting, show_progress(args)).start()
    name = args.served_model_name or Path(engine.path).resolve().name
    app = create_app(engine, name, args.api_key, args.max_waiting, args.default_max_tokens)
    if not args.quiet:
        print(f"serving {name} on http://{args.host}:{args.port}/v1 (OpenAI API)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0
