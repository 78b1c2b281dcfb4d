"""`moe-engine chat` driven as a user would, through a pseudo-terminal: turns, /commands, Ctrl-C, Ctrl-D."""

import json
import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "\n>>> "
ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[=>])")

pytestmark = pytest.mark.skipif(not hasattr(pty, "fork"), reason="needs a POSIX pseudo-terminal")


class Terminal:
    """A child process on a pty: type into it, read its screen output as plain text."""

    def __init__(self, argv: list[str], env: dict):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:                       # the child: becomes the command, the pty its terminal
            try:
                # As from a terminal: a test run started in the background (SIGINT ignored, which the
                # child would inherit) must not make Ctrl-C a no-op for the REPL.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.chdir(ROOT)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.seen = ""                          # everything read so far, cleaned
        self.pos = 0                            # how far read_until has consumed

    def read_until(self, marker: str, timeout: float = 60) -> str:
        """Text from the last marker up to the next `marker` (consumed)."""
        deadline = time.monotonic() + timeout
        while (at := self.seen.find(marker, self.pos)) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"no {marker!r} within {timeout} s; the screen so far:\n{self.seen[-3000:]}")
        text, self.pos = self.seen[self.pos:at], at + len(marker)
        return text

    def wait_for_output(self, timeout: float = 60) -> None:
        """Until something new appears after what was consumed."""
        deadline = time.monotonic() + timeout
        while not self.seen[self.pos:].strip():
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(f"no output within {timeout} s; the screen so far:\n{self.seen[-3000:]}")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:                         # the child closed the terminal
            return False
        self.seen += ESCAPES.sub("", data.decode("utf-8", "replace")).replace("\r", "")
        return bool(data)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def ask(self, line: str) -> str:
        """Type a line, return what was printed in answer (the echoed line left out)."""
        self.send(line + "\n")
        shown = self.read_until(PROMPT)
        _, _, answer = shown.partition(line)
        return answer.removeprefix("\n")

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            self._read(0.1)
        raise AssertionError(f"the REPL did not exit; the screen so far:\n{self.seen[-3000:]}")

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _stats(term: Terminal) -> dict:
    text = term.ask("/stats")
    found = re.search(r"prompt tokens: (\d+) \(history of (\d+) messages\); cache tokens: (\d+); "
                      r"([\d,]+) of ([\d,]+) cache slots free now", text)
    assert found, text
    prompt, history, cache, free, slots = (int(g.replace(",", "")) for g in found.groups())
    finish = re.search(r"finish: (.*)", text).group(1)
    return {"prompt": prompt, "history": history, "cache": cache, "free": free, "slots": slots,
            "finish": finish, "text": text}


@pytest.fixture
def chat():
    exe = Path(sys.executable).with_name("moe-engine")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "moe_engine"]
    argv += ["chat", "--model", "weights/tiny-mixtral", "--device", "cpu", "--dtype", "float32", "--quiet",
             "--max-tokens", "16"]
    env = {"OMP_NUM_THREADS": "1", **os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}   # see test_cli
    term = Terminal(argv, env)
    try:
        yield term
    finally:
        term.kill()


def test_chat_session(chat):
    banner = chat.read_until(PROMPT)
    assert "moe-engine chat" in banner and "Traceback" not in banner

    # Two turns: the second prompt carries the first exchange.
    first = chat.ask("write a function that adds two numbers")
    assert first.strip()
    second = chat.ask("now multiply them")
    assert second.strip()
    with_history = _stats(chat)
    assert with_history["history"] == 4
    assert with_history["cache"] == with_history["prompt"] + 16

    # The same question with no history gets a shorter prompt and, greedy as it is, another answer.
    assert "conversation cleared" in chat.ask("/reset")
    alone = chat.ask("now multiply them")
    fresh = _stats(chat)
    assert fresh["history"] == 2 and fresh["prompt"] < with_history["prompt"]
    assert alone != second

    # /temp sets the temperature; a bad value is refused with the allowed range, and the REPL goes on.
    assert "temperature 0.7" in chat.ask("/temp 0.7")
    refused = chat.ask("/temp -1")
    assert "error: bad sampling value temperature" in refused and ">= 0" in refused
    assert "temperature 0.7" in _stats(chat)["text"]

    # Ctrl-C during a long answer stops it (its cache freed) and returns to the prompt.
    chat.ask("/temp 0")
    assert "max_tokens 900" in chat.ask("/max 900")
    chat.send("write a long program with many classes\n")
    chat.read_until("many classes")
    chat.wait_for_output()
    chat.send("\x03")
    stopped = chat.read_until(PROMPT)
    assert "[stopped]" in stopped and "Traceback" not in stopped
    after = _stats(chat)
    assert after["finish"].startswith("interrupted")
    assert after["free"] == after["slots"]
    assert 0 < after["cache"] - after["prompt"] < 900

    # Ctrl-C at the prompt does not exit; the REPL still answers. (The pause lets readline start
    # waiting for keys: a SIGINT that lands before it does goes unnoticed until the next key.)
    time.sleep(0.5)
    chat.send("\x03")
    chat.read_until(PROMPT)
    assert "max_tokens 8" in chat.ask("/max 8")
    assert "error" not in chat.ask("hello")

    # Ctrl-D at the prompt exits cleanly.
    chat.send("\x04")
    assert chat.exit_code() == 0
    assert "Traceback" not in chat.seen


@pytest.mark.parametrize("model", ["weights/tiny-mixtral", "weights/tiny-deepseek"])
def test_chat_prompt_tokens(model):
    """The template's BOS/EOS text becomes one BOS id at the start and the EOS id after each answer."""
    from moe_engine.cli.repl import with_system
    from moe_engine.tokenizer import load_tokenizer
    path = ROOT / model
    tokenizer = load_tokenizer(path, json.loads((path / "config.json").read_text()))
    history = [{"role": "user", "content": "add two numbers"},
               {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
               {"role": "user", "content": "now multiply them"}]
    ids = tokenizer.encode_chat(with_system(tokenizer, "you write python", history))
    eos = next(iter(tokenizer.eos_ids))
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
    assert ids.count(eos) == 1
    text = tokenizer.decode(ids)
    assert "you write python" in text and "return a + b" in text and "now multiply them" in text
    # A single turn tokenizes exactly as the rendered text would on its own.
    one = [{"role": "user", "content": "hi"}]
    assert tokenizer.encode_chat(one) == tokenizer.encode("# hi\n")
