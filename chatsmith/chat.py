"""`chatsmith chat MODEL`: talk to a model in the terminal, or answer one `--prompt` and exit.

Every prompt is built by the one template renderer (`chatsmith.data.template`), so the model is
spoken to exactly as it was trained. Generation is the engine's (`chatsmith.infer.engine`), which
also turns the new tokens into text; this module keeps the conversation and shows the answer.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.template import render_conversation, stop_token_ids, template_source
from chatsmith.errors import ChatsmithError
from chatsmith.infer.sampling import SamplingParams

PROMPT = "you> "
HELP = """commands:
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (empty TEXT removes it) and forget the conversation
  /help          show this help
  /exit          quit (or Ctrl-D); Ctrl-C stops an answer that is being written
  //TEXT         send a message that starts with '/'"""


class ChatSession:
    """One conversation with a model in an engine: the history, the system prompt, and `reply`.

    `conversation` is exactly what is rendered for the next answer (system message first, when
    set), so a test or a UI can inspect it.
    """

    def __init__(self, engine: Any, params: SamplingParams, *, system: str | None = None,
                 template: str | None = None, kb: Any = None) -> None:
        params.validate()
        tokenizer = engine.tokenizer
        template_source(tokenizer, template)  # fail now, not at the first answer, if there is no template
        self.engine, self.tokenizer, self.params, self.template = engine, tokenizer, params, template
        self.system = system or None
        # End-of-turn ids of the template plus EOS (stop_token_ids includes EOS).
        self.stop_ids = stop_token_ids(tokenizer, template)
        self.conversation = Conversation([])
        self.last_prompt_ids: list[int] = []
        self.dropped_messages = 0  # oldest messages removed so far to fit the context
        self._stream: Any = None   # the answer being generated, while `reply` runs
        # chat --kb: a chatsmith.kb.prompt.Retriever; `sources` are those of the latest answer,
        # carried in the rendered system message only (the conversation keeps the plain turns).
        self.kb = kb
        self.sources: list[Any] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; keep the system prompt."""
        self.conversation = Conversation([Message("system", self.system)] if self.system else [])

    def set_system(self, text: str | None) -> None:
        """Set (or, with None/"", remove) the system prompt and start a new conversation."""
        self.system = text or None
        self.reset()

    def render(self) -> list[int]:
        """Token ids of the conversation so far (with the retrieved sources, if any), ending with
        the assistant header."""
        conversation = self.conversation
        if self.sources:
            from chatsmith.kb.prompt import with_sources

            conversation = Conversation(with_sources(conversation.messages, self.sources))
        return render_conversation(self.tokenizer, conversation, self.template, add_generation_prompt=True).input_ids

    def prompt_ids(self) -> list[int]:
        """`render()`, after dropping the oldest turns until the prompt and an answer fit the context."""
        context = self.engine.slot_tokens   # the model's context (or what the KV budget allows)
        ids = self.render()
        # Room for the answer: max_new_tokens, but never more than a quarter of the context, so a
        # large --max-new-tokens does not erase the whole history.
        reserve = min(self.params.max_new_tokens, context // 4)
        if self.sources:   # the lowest-ranked sources go first, whole, before any turn is dropped
            from chatsmith.kb.prompt import fit_sources

            def render_with(sources: list[Any]) -> list[int]:
                self.sources = sources
                return self.render()

            ids = fit_sources(render_with, self.sources, context - reserve)[0]
        first = 1 if self.system else 0
        msgs = self.conversation.messages
        saved, saved_dropped = list(msgs), self.dropped_messages
        while len(ids) + reserve > context:
            if len(msgs) - first <= 1:
                # The new message alone does not fit: keep the history as it was.
                msgs[:], self.dropped_messages = saved, saved_dropped
                raise ChatsmithError(f"the message is too long: the prompt is {len(ids)} tokens and the model's "
                                     f"context is {context} tokens ({reserve} kept for the answer); shorten it"
                                     + (" or the system prompt" if self.system else ""))
            # Drop the oldest exchange (a user turn and the answers after it) as a whole.
            del msgs[first]
            self.dropped_messages += 1
            while len(msgs) - first > 1 and msgs[first].role != "user":
                del msgs[first]
                self.dropped_messages += 1
            ids = self.render()
        return ids

    def reply(self, text: str, should_stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """Add a user message and yield the answer as text pieces while it is generated.

        Leading whitespace is not shown; the pieces join to the answer (stored stripped). When
        generation ends (also when it is stopped, by `should_stop()` between pieces or by `stop()`,
        or the caller stops iterating) the answer so far becomes the assistant message; an empty
        answer removes the user message instead, so the history keeps alternating user/assistant.
        """
        messages = self.conversation.messages
        messages.append(Message("user", text))
        stream = None
        try:
            self.sources = self.kb.retrieve(text) if self.kb is not None else []
            self.last_prompt_ids = self.prompt_ids()
            stream = self._stream = self.engine.stream(self.last_prompt_ids, self.params, self.stop_ids)
            started = False
            for piece in stream:
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                if piece:
                    yield piece
                if should_stop is not None and should_stop():
                    stream.cancel()
        finally:
            self._stream = None
            answer = stream.request.detok.text.strip() if stream is not None else ""
            if answer:
                # train=False: chat history is context, not a training target. It also lets the
                # renderer skip the per-turn mask bookkeeping, which templates that rewrite past
                # turns (e.g. strip reasoning) would reject.
                messages.append(Message("assistant", answer, train=False))
            elif messages and messages[-1].role == "user":
                messages.pop()

    def stop(self) -> None:
        """Stop the answer being written (safe from a signal handler): it ends after the current step."""
        stream = self._stream
        if stream is not None:
            stream.cancel()


def _read_line(stdin: TextIO, stdout: TextIO) -> str | None:
    """One line of input, or None at end of input (Ctrl-D)."""
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty():
        try:
            import readline  # noqa: F401  (arrow keys and history for input(); absent on Windows)
        except ImportError:
            pass
        try:
            return input(PROMPT)
        except EOFError:
            return None
    stdout.write(PROMPT)
    stdout.flush()
    line = stdin.readline()
    return None if line == "" else line


def _answer(session: ChatSession, text: str, stdout: TextIO, stderr: TextIO) -> None:
    """Stream one answer to stdout; Ctrl-C stops it and the session goes on."""
    stopped = False

    def on_interrupt(signum: int, frame: Any) -> None:
        nonlocal stopped
        stopped = True
        session.stop()

    # A SIGINT handler lets the current step finish and then stops the answer cleanly; only the
    # main thread may install one.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        for piece in session.reply(text, should_stop=lambda: stopped):
            stdout.write(piece)
            stdout.flush()
    except KeyboardInterrupt:  # no handler installed (not the main thread): stop all the same
        stopped = True
    except ChatsmithError as e:
        stderr.write(f"error: {e}\n")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if session.sources:
        from chatsmith.kb.prompt import sources_footer

        stdout.write("\n" + sources_footer(session.sources))
    stdout.write("\n\n")
    stdout.flush()
    if stopped:
        stderr.write("(stopped)\n")


def chat_loop(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO | None = None) -> int:
    """The interactive loop: read a line, run a command or answer it. Returns the exit status."""
    stderr = stderr or sys.stderr
    while True:
        try:
            line = _read_line(stdin, stdout)
        except KeyboardInterrupt:
            stderr.write("\n(use /exit or Ctrl-D to quit)\n")
            continue
        if line is None:
            stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            command, _, argument = text.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                session.reset()
                stderr.write("(conversation cleared)\n")
            elif command == "/system":
                session.set_system(argument.strip())
                stderr.write("(system prompt set; conversation cleared)\n" if session.system
                             else "(system prompt removed; conversation cleared)\n")
            elif command == "/help":
                stderr.write(HELP + "\n")
            else:
                stderr.write(f"unknown command {command}; /help lists the commands\n")
            continue
        if text.startswith("//"):
            text = text[1:]
        dropped = session.dropped_messages
        _answer(session, text, stdout, stderr)
        if session.dropped_messages > dropped:
            stderr.write("(the oldest turns were dropped to fit the model's context)\n")


def run_chat(
    model_spec: str,
    *,
    prompt: str | None,
    system: str | None,
    params: SamplingParams,
    template: str | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    precision: str = "auto",
    kb: str | None = None,
    kb_top_k: int = 5,
    max_memory: str | None = None,
    quantization: str | None = None,
    prefix_cache: bool = True,
    threads: int | None = None,
) -> int:
    """Run `chatsmith chat`. With `prompt`, print only its answer and a newline; else chat.

    `device` None means CUDA when available, else CPU. `precision` is the engine's: auto (int8 for
    Llama-family models on a CPU), int8 or module (the model's own weights). stdin/stdout None mean
    sys.stdin/sys.stdout at call time (not at import time, so redirection by the caller or pytest is
    honoured). `max_memory` (a --max-memory budget) offloads what does not fit to disk; `quantization`
    "8bit"/"4bit" loads with bitsandbytes (CUDA only); both decode in precision "module". `threads`
    fixes torch's thread count (None: torch's own, and the engine's governor may use 1 under load).
    Returns the exit status.
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    params.validate()  # before the slow model load, so a bad flag fails at once
    from chatsmith.models.loading import check_load_options, offload_fast_path, offload_precision

    offload_flag = check_load_options(precision, max_memory, quantization)
    retriever = None
    if kb is not None:   # a missing knowledge base fails now, not after the model load
        from chatsmith.kb.prompt import Retriever

        retriever = Retriever(kb, top_k=kb_top_k)
    import torch

    from chatsmith.models import load_model

    if device is None:
        device = "cuda" if torch.cuda.is_available() else None
    from chatsmith.infer.engine import Engine, resolve_precision

    model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code, device=device,
                                  max_memory=max_memory, quantization=quantization)
    if offload_flag:
        precision, fast_path = offload_precision(precision, offload_flag), offload_fast_path(model)
    else:
        precision, fast_path = resolve_precision(model, precision), True
    # The prefix cache: each turn prefills only the new message, the earlier turns' KV cache stays.
    if threads is not None:
        torch.set_num_threads(threads)
    engine = Engine(model, tokenizer, max_batch_size=1, precision=precision, fast_path=fast_path,
                    prefix_cache=prefix_cache, adaptive_threads=threads is None)
    session = ChatSession(engine, params, system=system, template=template, kb=retriever)
    if prompt is not None:
        for piece in session.reply(prompt):
            stdout.write(piece)
            stdout.flush()
        if session.sources:
            from chatsmith.kb.prompt import sources_footer

            stdout.write("\n" + sources_footer(session.sources))
        stdout.write("\n")
        stdout.flush()
        return 0
    sys.stderr.write(f"chatsmith chat: {model_spec}. /help for commands, /exit or Ctrl-D to quit.\n")
    return chat_loop(session, stdin, stdout, sys.stderr)
