"""The terminal chat: streaming detokenisation, history handling, commands, --prompt mode."""

from __future__ import annotations

import io
import signal

import pytest
import torch

import chatsmith.chat as chat
from chatsmith.chat import ChatSession, chat_loop, run_chat
from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.template import FALLBACK_TEMPLATES, render_conversation
from chatsmith.errors import ChatsmithError
from chatsmith.infer import SamplingParams
from chatsmith.infer.engine import Engine

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level tokenizer with no merges (one token per UTF-8 byte) and a ChatML template:
    every non-ASCII character is split over tokens, which the engine's detokenizer must handle."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = FALLBACK_TEMPLATES["chatml"][0]
    return fast


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    # Zero the output rows of the special tokens: their logit is 0 while the max of 256 random
    # byte logits is positive, so greedy answers never end early and every test answer is 6 tokens.
    with torch.no_grad():
        model.lm_head.weight[256:] = 0
    return model


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def engine_for(model, tokenizer) -> Engine:
    """The chat's engine, in the model's own precision (exact: answers equal HF generate's)."""
    return Engine(model, tokenizer, max_batch_size=1, precision="module")


def hf_greedy_answer(model, tokenizer, text: str, n: int, system: str | None = None) -> str:
    """The reference: transformers' own generate on the same rendered prompt, decoded and stripped."""
    msgs = ([Message("system", system)] if system else []) + [Message("user", text)]
    ids = render_conversation(tokenizer, Conversation(msgs), add_generation_prompt=True).input_ids
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


# --- ChatSession --------------------------------------------------------------------------------


def test_reply_streams_and_records_history(model, tokenizer):
    session = ChatSession(engine_for(model, tokenizer), GREEDY)
    pieces = list(session.reply("Hello"))
    answer = session.conversation.messages[-1]
    assert [m.role for m in session.conversation.messages] == ["user", "assistant"]
    assert "".join(pieces).strip() == answer.content == hf_greedy_answer(model, tokenizer, "Hello", 6)
    assert len(pieces) > 1   # streamed piece by piece (random bytes: invalid UTF-8 shows as U+FFFD)
    assert answer.train is False
    expected = render_conversation(tokenizer, Conversation([Message("user", "Hello")]), add_generation_prompt=True)
    assert session.last_prompt_ids == expected.input_ids

    list(session.reply("And then?"))
    second = decode(tokenizer, session.last_prompt_ids)
    assert second.startswith(decode(tokenizer, expected.input_ids))  # the first exchange is in the prompt
    assert answer.content in second and second.endswith("And then?<|im_end|>\n<|im_start|>assistant\n")


def test_reply_with_same_seed_is_reproducible(model, tokenizer):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    a = "".join(ChatSession(engine_for(model, tokenizer), params).reply("Hi"))
    b = "".join(ChatSession(engine_for(model, tokenizer), params).reply("Hi"))
    assert a == b


def test_old_turns_dropped_to_fit_context(model, tokenizer, monkeypatch):
    monkeypatch.setattr(model.config, "max_position_embeddings", 160)  # reserve: min(6, 40) tokens
    session = ChatSession(engine_for(model, tokenizer), GREEDY, system="Be brief.")
    assert session.engine.slot_tokens == 160
    for q in ("first question " * 2, "second question " * 2, "third question " * 2):
        list(session.reply(q.strip()))
    messages = session.conversation.messages
    assert session.dropped_messages > 0
    assert messages[0] == Message("system", "Be brief.")
    assert messages[1].role == "user" and messages[-2].content == "third question third question"
    assert len(session.last_prompt_ids) + 6 <= 160
    before = list(messages)
    with pytest.raises(ChatsmithError, match="too long"):
        list(session.reply("x" * 200))
    assert session.conversation.messages == before, "a message that cannot fit leaves the history as it was"


def test_model_without_template_fails_at_start(model, tokenizer):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    with pytest.raises(ChatsmithError, match="--template"):
        ChatSession(engine_for(model, bare), GREEDY)
    ChatSession(engine_for(model, bare), GREEDY, template="chatml")  # a named template is enough


# --- the interactive loop -----------------------------------------------------------------------


def recording_session(model, tokenizer, **kw) -> tuple[ChatSession, list[str]]:
    """A session that records the text of every prompt it renders."""
    session = ChatSession(engine_for(model, tokenizer), GREEDY, **kw)
    prompts: list[str] = []
    render = session.render

    def spy() -> list[int]:
        ids = render()
        prompts.append(decode(tokenizer, ids))
        return ids

    session.render = spy  # type: ignore[method-assign]
    return session, prompts


def test_interactive_commands_and_history(model, tokenizer):
    session, prompts = recording_session(model, tokenizer)
    stdin = io.StringIO("/system You are terse.\nHello there\n/reset\nSecond question\n\n/help\n/bogus\n"
                        "//slash message\n/exit\nnever read\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    assert chat_loop(session, stdin, stdout, stderr) == 0

    assert len(prompts) == 3
    assert "<|im_start|>system\nYou are terse.<|im_end|>" in prompts[0] and "Hello there" in prompts[0]
    # /reset forgot the first exchange but kept the system prompt.
    assert "You are terse." in prompts[1] and "Second question" in prompts[1] and "Hello there" not in prompts[1]
    # '//' sends a message that starts with '/', with the history of the second exchange.
    assert "Second question" in prompts[2] and prompts[2].endswith("/slash message<|im_end|>\n<|im_start|>assistant\n")
    roles = [m.role for m in session.conversation.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert stdin.read() == "never read\n"  # /exit returned before reading the last line
    assert all(m.content != "never read" for m in session.conversation.messages)

    out = stdout.getvalue()
    assert out.count("you> ") == 9  # one prompt per line read, /exit included
    for m in session.conversation.messages[2::2]:
        assert m.content in out  # answers are streamed to stdout
    err = stderr.getvalue()
    assert "system prompt set" in err and "conversation cleared" in err
    assert "/reset" in err and "unknown command /bogus" in err


def test_interactive_eof_and_system_removal(model, tokenizer):
    session = ChatSession(engine_for(model, tokenizer), GREEDY, system="S")
    stderr = io.StringIO()
    assert chat_loop(session, io.StringIO("/system\n"), io.StringIO(), stderr) == 0  # EOF, no /exit
    assert session.system is None and session.conversation.messages == []
    assert "system prompt removed" in stderr.getvalue()


def test_ctrl_c_stops_answer_and_keeps_session(model, tokenizer):
    session = ChatSession(engine_for(model, tokenizer), SamplingParams(temperature=0.0, max_new_tokens=50))
    calls = []

    def interrupt_on_third_step(module, args, output):   # the final norm runs once per engine step
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)

    handler_before = signal.getsignal(signal.SIGINT)
    hook = model.model.norm.register_forward_hook(interrupt_on_third_step)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        status = chat_loop(session, io.StringIO("long answer please\nnext\n"), stdout, stderr)
    finally:
        hook.remove()
    assert status == 0
    assert "(stopped)" in stderr.getvalue()
    first_answer = session.conversation.messages[1]
    assert first_answer.role == "assistant"
    # Stopped after the third token: the handler only cancels, the step under way still shows its token.
    assert first_answer.content == hf_greedy_answer(model, tokenizer, "long answer please", 3)
    # The session went on: the second message was answered in full, with the first in its prompt.
    assert [m.role for m in session.conversation.messages] == ["user", "assistant"] * 2
    assert signal.getsignal(signal.SIGINT) is handler_before  # the chat's handler was removed


# --- run_chat -----------------------------------------------------------------------------------


@pytest.fixture
def fake_load(model, tokenizer, monkeypatch):
    loads = []

    def load_model(spec, **kw):
        loads.append((spec, kw))
        return model, tokenizer

    monkeypatch.setattr("chatsmith.models.load_model", load_model)
    return loads


def test_run_chat_prompt_prints_only_the_answer(fake_load, model, tokenizer, capsys):
    stdout = io.StringIO()
    assert run_chat("tiny", prompt="Hello", system="Be brief.", params=GREEDY, stdout=stdout, precision="module") == 0
    assert stdout.getvalue() == hf_greedy_answer(model, tokenizer, "Hello", 6, system="Be brief.") + "\n"
    assert capsys.readouterr().err == ""  # no header in --prompt mode
    assert fake_load[0][0] == "tiny" and fake_load[0][1]["trust_remote_code"] is False


def test_run_chat_interactive_shows_header_on_stderr(fake_load, capsys):
    stdout = io.StringIO()
    assert run_chat("tiny", prompt=None, system=None, params=GREEDY, stdin=io.StringIO("hi\n/exit\n"),
                    stdout=stdout) == 0
    err = capsys.readouterr().err
    assert "tiny" in err and "/exit" in err
    assert "tiny" not in stdout.getvalue() and stdout.getvalue().startswith("you> ")


def test_run_chat_rejects_bad_params_before_loading(fake_load):
    with pytest.raises(ChatsmithError, match="temperature"):
        run_chat("tiny", prompt="x", system=None, params=SamplingParams(temperature=-1))
    assert fake_load == []


# --- the embedded model -------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_knows_who_wrote_hamlet():
    """The embedded model through the default chat path (precision auto: int4 for it) answers a simple
    factual question. (Not "the capital of France": the fp32 model's first token is a near-tie there,
    'The' -1.883 against 'L' -1.965, and int4 picks 'L' and wanders off while int8 happened to keep
    'The'; over the 80 Vicuna-bench questions int4's greedy answers equal fp32's 48 times, int8's 11.)"""
    stdout = io.StringIO()
    status = run_chat("smollm2-135m", prompt="Who wrote Hamlet?", system=None,
                      params=SamplingParams(temperature=0.0, max_new_tokens=40), stdout=stdout)
    assert status == 0
    assert "Shakespeare" in stdout.getvalue()
    assert stdout.getvalue().endswith("\n") and not stdout.getvalue().startswith((" ", "\n"))


@pytest.mark.slow
def test_embedded_model_interactive_session(monkeypatch):
    sessions: list[ChatSession] = []

    class Recording(ChatSession):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.prompts: list[str] = []
            sessions.append(self)

        def render(self) -> list[int]:
            ids = super().render()
            self.prompts.append(self.tokenizer.decode(ids))
            return ids

    monkeypatch.setattr(chat, "ChatSession", Recording)
    stdin = io.StringIO("/system You are a geography teacher.\nWhat is the capital of France?\n/reset\n"
                        "And of Italy?\n/exit\n")
    stdout = io.StringIO()
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    assert run_chat("smollm2-135m", prompt=None, system=None, params=params, stdin=stdin, stdout=stdout) == 0
    (session,) = sessions
    assert len(session.prompts) == 2
    assert "You are a geography teacher." in session.prompts[0] and "France" in session.prompts[0]
    assert "You are a geography teacher." in session.prompts[1]
    assert "France" not in session.prompts[1] and "Italy" in session.prompts[1]
    messages = session.conversation.messages
    assert [m.role for m in messages] == ["system", "user", "assistant"]
    assert messages[2].content and messages[2].content in stdout.getvalue()
