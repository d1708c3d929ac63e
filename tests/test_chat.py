"""``moss-rlhf chat``: the loop's behaviour (history, /reset, /exit, EOF, streaming writes), then the real command
driven through a pseudo-terminal like a person at a keyboard."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from moss_rlhf.assistant import Assistant
from moss_rlhf.chat import ChatConfig, chat_loop


class Recorder:
    """A stand-in for stdout that remembers every write (so streaming is visible as many small writes)."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.writes)


def scripted(lines: list[str]):
    queue = list(lines)

    def read(prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read


@pytest.fixture(scope="module")
def assistant(tiny_model_dir) -> Assistant:
    return Assistant.from_pretrained(str(tiny_model_dir), device="cpu")


def test_history_reset_and_exit(assistant):
    out = Recorder()
    cfg = ChatConfig(model="m", system="be brief", max_new_tokens=6, temperature=1.0, seed=0)
    history = chat_loop(assistant, cfg, scripted(["hello", "", "/reset", "again", "/nonsense", "/exit", "never read"]),
                        out)
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "again"
    assert "(conversation reset)" in out.text and "unknown command /nonsense" in out.text
    reply_writes = out.writes[:out.writes.index("(conversation reset)\n")]
    assert len(reply_writes) >= 3  # the first reply arrived in pieces, then its newline


def test_a_message_beyond_the_context_is_refused_and_the_session_goes_on(assistant):
    out = Recorder()
    history = chat_loop(assistant, ChatConfig(model="m", max_new_tokens=4, seed=1),
                        scripted(["where " * 600, "hi", "/exit"]), out)
    assert [m["content"] for m in history if m["role"] == "user"] == ["hi"]
    assert "(that does not fit: the conversation would be" in out.text and "reads 512 with 4" in out.text


def test_end_of_input_exits_cleanly(assistant):
    out = Recorder()
    history = chat_loop(assistant, ChatConfig(model="m", max_new_tokens=4, seed=1), scripted(["hi"]), out)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert out.writes[-1] == "\n"


def test_same_seed_same_conversation(assistant):
    cfg = ChatConfig(model="m", max_new_tokens=8, temperature=1.0, seed=5)
    first = chat_loop(assistant, cfg, scripted(["hi", "more"]), Recorder())
    second = chat_loop(assistant, cfg, scripted(["hi", "more"]), Recorder())
    assert first == second


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    buffer = b""
    deadline = time.monotonic() + timeout
    while marker not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {marker!r}; got {buffer!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            buffer += chunk
    return buffer


def _drain(fd: int, timeout: float = 5.0) -> bytes:
    """Whatever the child wrote before closing its terminal."""
    buffer = b""
    while select.select([fd], [], [], timeout)[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        buffer += chunk
    return buffer


@pytest.mark.slow
def test_terminal_session_through_a_pty(tiny_model_dir):
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "moss_rlhf.cli", "chat", str(tiny_model_dir), "--device", "cpu", "--seed", "0",
         "--max-new-tokens", "12", "--temperature", "1.0"],
        stdin=follower, stdout=follower, stderr=follower, close_fds=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "TERM": "dumb"})
    os.close(follower)
    try:
        banner = _read_until(leader, b">>> ", 120)
        assert b"/reset" in banner and b"/exit" in banner
        os.write(leader, "hello 你好\n".encode())
        reply = _read_until(leader, b">>> ", 60)
        reply.decode("utf-8")  # whole characters only: streaming never cut a UTF-8 sequence
        assert "hello 你好".encode() in reply  # the terminal echoes the line
        os.write(leader, b"/reset\n")
        assert b"(conversation reset)" in _read_until(leader, b">>> ", 30)
        os.write(leader, b"/exit\n")
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)


@pytest.mark.slow
def test_ctrl_d_ends_the_session(tiny_model_dir):
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "moss_rlhf.cli", "chat", str(tiny_model_dir), "--device", "cpu"],
                               stdin=follower, stdout=follower, stderr=follower, close_fds=True,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "TERM": "dumb"})
    os.close(follower)
    try:
        _read_until(leader, b">>> ", 120)
        os.write(leader, b"\x04")  # Ctrl-D at an empty line: end of input
        assert process.wait(timeout=30) == 0
        assert b"Traceback" not in _drain(leader)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
