"""The `moe-engine chat` REPL: a multi-turn conversation rendered through the model's chat template,
answers streamed as they are generated, and a few /commands."""

import dataclasses
import sys
import time
import traceback

from moe_engine.cli import on_sigint
from moe_engine.errors import MoeEngineError
from moe_engine.inputs import check_text
from moe_engine.sampling import SamplingParams
from moe_engine.tokenizer import Tokenizer

PROMPT = ">>> "
HELP = """commands:
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt and start over (/system alone clears it)
  /temp X        sampling temperature, 0 = greedy (/temp alone shows it)
  /max N         most tokens per answer (/max alone shows it)
  /stats         speed and token counts of the last answer, and the sampling settings
  /help          this list
  /exit          quit (Ctrl-D at the prompt works too)
Ctrl-C stops an answer and keeps the REPL; the arrow keys edit the line and recall earlier ones."""


def with_system(tokenizer: Tokenizer, system: str, history: list[dict]) -> list[dict]:
    """The messages to render. A template that drops system turns (as the shipped models' does) gets the
    system text in front of the first user turn instead, so /system always has an effect."""
    if not system:
        return history
    messages = [{"role": "system", "content": system}] + history
    try:
        if system in tokenizer.apply_chat_template(messages):
            return messages
    except Exception:  # templates may refuse a system role by raising from inside jinja
        pass
    first = history[0]
    return [{"role": first["role"], "content": f"{system}\n\n{first['content']}"}] + history[1:]


class Chat:
    """One conversation with an LLM: history, sampling settings and the last answer's stats."""

    def __init__(self, llm, params: SamplingParams, out=None, debug: bool = False):
        self.llm, self.params, self.debug = llm, params, debug
        self.out = out or sys.stdout
        self.system = ""
        self.history: list[dict] = []           # alternating user / assistant messages
        self.last: dict = {}

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the history plus the new question, dropping the oldest exchanges while the prompt
        and a full answer would not fit in the model's context."""
        tokenizer = self.llm.tokenizer
        history = self.history + [{"role": "user", "content": question}]
        dropped = 0
        while True:
            ids = tokenizer.encode_chat(with_system(tokenizer, self.system, history))
            if len(ids) + self.params.max_tokens <= self.llm.max_model_len or len(history) <= 1:
                break
            history, dropped = history[2:], dropped + 1
        if dropped:
            self.history = history[:-1]
            self.say(f"(dropped the {dropped} oldest exchange(s) to fit the {self.llm.max_model_len}-token context)")
        return ids

    def ask(self, question: str) -> None:
        """Stream one answer; Ctrl-C stops it, and what was shown so far stays in the history.

        While an answer streams, Ctrl-C only raises a flag that is read between pieces: a KeyboardInterrupt
        raised at an arbitrary point could land in a finalizer, where Python drops it, or halfway through
        an engine step."""
        ids = self.prompt_ids(question)
        stream = self.llm.stream(ids, self.params)
        pieces, first_at, finish = [], None, None
        interrupted = []
        previous = on_sigint(lambda *_: interrupted.append(True))
        start = time.perf_counter()
        try:
            for piece in stream:
                first_at = first_at or time.perf_counter() - start
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
                if interrupted:
                    break
            if interrupted:
                finish = "interrupted (Ctrl-C)"
        except KeyboardInterrupt:       # where no handler could be installed (not the main thread)
            finish = "interrupted (Ctrl-C)"
        finally:
            stream.close()                  # cancels the request and frees its cache blocks
            on_sigint(previous)
        self.say()
        stats = dict(self.llm.last_stats)
        if finish is None:
            output = getattr(self.llm, "last_output", None)
            finish = getattr(output, "finish_reason", None) or "stop"
        else:
            self.say("[stopped]")
        self.last = {**stats, "finish": finish, "first_token_s": first_at, "history": len(self.history) + 2}
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": "".join(pieces)}]

    def stats_text(self) -> str:
        p = self.params
        sampling = (f"sampling: temperature {p.temperature}, top_p {p.top_p}, top_k {p.top_k}, min_p {p.min_p}, "
                    f"repetition_penalty {p.repetition_penalty}, max_tokens {p.max_tokens}, seed {p.seed}")
        if not self.last:
            return "no answer yet\n" + sampling
        s = self.last
        rate = s["generated_tokens"] / s["seconds"] if s["seconds"] > 0 else 0.0
        first = f", first token after {s['first_token_s']:.2f} s" if s["first_token_s"] is not None else ""
        if s.get("draft_tokens"):
            first += f", drafts accepted {s['accepted_tokens']}/{s['draft_tokens']}"
        pool, size = self.llm.engine.blocks, self.llm.block_size
        capacity = (f"; {pool.num_free * size:,} of {pool.num_blocks * size:,} cache slots free now"
                    f"; {pool.prefix_hits} blocks reused from the prefix cache so far")
        return (f"last answer: {s['generated_tokens']} tokens in {s['seconds']:.2f} s ({rate:.1f} tokens/s{first}), "
                f"finish: {s['finish']}\n"
                f"prompt tokens: {s['prompt_tokens']} (history of {s['history']} messages); "
                f"cache tokens: {s['prompt_tokens'] + s['generated_tokens']}{capacity}\n" + sampling)

    def command(self, line: str) -> bool:
        """Run one /command; False means exit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.history, self.last = [], {}
            self.say("(conversation cleared)")
        elif name == "/system":
            self.system, self.history, self.last = arg, [], {}
            self.say(f"(system prompt {'set' if arg else 'cleared'}; conversation cleared)")
        elif name in ("/temp", "/max"):
            field = "temperature" if name == "/temp" else "max_tokens"
            if arg:
                try:
                    value = float(arg) if name == "/temp" else int(arg)
                except ValueError:
                    raise MoeEngineError(f"{name} needs a number, got {arg!r}; e.g. {name} "
                                         f"{'0.7' if name == '/temp' else '256'}") from None
                self.params = dataclasses.replace(self.params, **{field: value})
            self.say(f"({field} {getattr(self.params, field)})")
        elif name == "/stats":
            self.say(self.stats_text())
        else:
            self.say(f"unknown command {name!r}; /help lists the commands")
        return True

    def run(self, read=input) -> int:
        """The read-eval-print loop; returns the exit code (0 on /exit or Ctrl-D)."""
        while True:
            try:
                line = read(PROMPT).strip()
            except KeyboardInterrupt:
                self.say("^C (Ctrl-D or /exit quits)")
                continue
            except EOFError:
                self.say()
                return 0
            try:
                check_text("the line", line)          # bytes that were not UTF-8 (a pipe, another locale)
                if line.startswith("/"):
                    if not self.command(line):
                        return 0
                elif line:
                    self.ask(line)
            except KeyboardInterrupt:
                self.say("^C")
            except MoeEngineError as e:
                self.say(f"error: {e}")
            except Exception as e:
                if self.debug:
                    traceback.print_exc()
                self.say(f"error: {type(e).__name__}: {e}".splitlines()[0])



def enable_line_editing() -> None:
    """Importing readline gives input() line editing and an in-session history (where it exists)."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401
        except ImportError:
            pass


def banner(llm, path: str) -> str:
    template = "its chat template" if llm.tokenizer.chat_template else "a plain 'role: text' transcript"
    return (f"moe-engine chat: {path} ({llm.config.get('model_type')}) on {llm.device.type}, "
            f"{str(llm.dtype).removeprefix('torch.')}; turns go through {template}.\n"
            "Type a message, /help for commands, Ctrl-C to stop an answer, Ctrl-D to quit.")
