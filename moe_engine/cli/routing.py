"""`moe-engine routing`: trace a text file's routing; write the trace, heatmaps and a Markdown summary."""

import time
from pathlib import Path

from moe_engine.errors import MoeEngineError


def add_arguments(parser) -> None:
    """The routing subcommand's own options (--model, --device, --dtype, --quiet come from the main CLI)."""
    parser.add_argument("--text-file", required=True, help="the text to run through the model (e.g. source code)")
    parser.add_argument("--out", required=True, help="folder for trace.npz/.json, *.png and summary.md")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="use at most this many tokens of the text (default %(default)s)")
    parser.add_argument("--window", type=int, default=None,
                        help="tokens per forward pass (default and at most: the model's max length)")
    parser.add_argument("--scores", action="store_true",
                        help="also record the full router logits (adds per-token router entropy)")
    parser.add_argument("--no-plots", action="store_true", help="write no figures (no matplotlib needed)")


def run(args) -> int:
    from moe_engine.cli import load_llm
    from moe_engine.study import report
    from moe_engine.perplexity import effective_window, stream_index
    from moe_engine.study.token_classes import classify_stream
    from moe_engine.tokenizer import require_tokenizer

    text_file, out = Path(args.text_file), Path(args.out)
    if not text_file.is_file():
        raise MoeEngineError(f"text file {text_file} not found; pass an existing file to --text-file")
    from moe_engine.cli import check_output_path
    check_output_path(out, folder=True)              # before the model loads and the text runs
    if args.max_tokens < 2:
        raise MoeEngineError(f"--max-tokens {args.max_tokens} is too small; give at least 2")
    text = text_file.read_text(errors="replace")
    if not args.no_plots:
        from moe_engine.study.plots import _figure
        _figure(1, 1)                                    # fail on a missing matplotlib before the work
    llm = load_llm(args)
    ids = require_tokenizer(llm.tokenizer, llm.path).encode(text)[:args.max_tokens]
    if len(ids) < 2:
        raise MoeEngineError(f"{text_file} gives {len(ids)} token(s); give a longer text")
    start = time.perf_counter()
    with llm.trace_routing(scores=args.scores) as trace:
        ppl = llm.perplexity(ids, args.window)
    # Class tokens over the whole text: a window classed alone could start inside a string.
    window = effective_window(llm, args.window)
    trace.set_token_classes(classify_stream(ids, llm.tokenizer)[stream_index(trace, window)])
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    written = [trace.save(out / "trace"), out / "trace.json"]
    if not args.no_plots:
        from moe_engine.study import plots
        written.append(plots.plot_expert_load(trace, out / "expert_load.png", f"Expert load: {llm.path.name}"))
        written.append(plots.plot_coactivation(trace, out / "coactivation.png",
                                               f"Expert co-activation: {llm.path.name}"))
        written.append(plots.plot_class_affinity(trace, out / "class_affinity.png",
                                                 f"Token-class affinity: {llm.path.name}"))
    summary = (f"# Routing summary: {llm.path.name}\n\n"
               f"Text: `{text_file.name}`, {len(ids)} tokens in {seconds:.1f} s; perplexity {ppl:.3f}; "
               f"{trace.num_layers} MoE layers, {trace.num_experts} experts, top-{trace.top_k}.\n\n"
               f"## Load per MoE layer\n\n{report.summary_table(trace)}\n"
               f"## Token classes\n\n{report.class_table(trace)}")
    (out / "summary.md").write_text(summary)
    written.append(out / "summary.md")
    print(summary)
    if not args.quiet:
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Same as `moe-engine routing ARGS` (one-line errors, exit codes of the main CLI)."""
    import sys
    from moe_engine.cli import main as cli_main
    return cli_main(["routing", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
