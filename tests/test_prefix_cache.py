"""The engine's prefix cache (`Engine(prefix_cache=True)`, what `serve` and `chat` use): a prompt that
starts like a finished or running sequence prefills only the rest, and answers as a cold prefill does."""

import copy

import httpx
import pytest
import torch

from chatsmith.infer.engine import Engine, common_prefix
from chatsmith.infer.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def tiny():
    from chatsmith.models import load_model

    return load_model("tiny-random-llama")


def _ids(tok, text):
    return tok(text)["input_ids"]


def _cached(engine, fn):
    """Run fn(); the prompt tokens the prefix cache gave during it."""
    before = engine.stats["cached_prompt_tokens"]
    out = fn()
    return out, engine.stats["cached_prompt_tokens"] - before


def _same(a, b, tol=1e-4):
    assert a.token_ids == b.token_ids
    assert a.logprobs == pytest.approx(b.logprobs, abs=tol)


def test_common_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([5], [6]) == 0
    a = list(range(1000))
    assert common_prefix(a, a[:777] + [-1] + a[778:]) == 777


def test_a_repeated_prompt_and_a_next_turn_prefill_only_what_is_new(tiny):
    model, tok = tiny
    p0, p1 = _ids(tok, "Hello there, how are you today?"), _ids(tok, "And what about tomorrow?")
    cold = Engine(model, tok, max_batch_size=2)
    warm = Engine(model, tok, max_batch_size=2, prefix_cache=True)
    assert warm.prefix_cache and not cold.prefix_cache   # off unless asked for
    first, n = _cached(warm, lambda: warm.generate([p0], GREEDY, stop_ids=[])[0])
    assert n == 0
    _same(first, cold.generate([p0], GREEDY, stop_ids=[])[0], tol=0)
    # The same prompt again: the slot kept its last logits too, so nothing runs before the first token.
    again, n = _cached(warm, lambda: warm.generate([p0], GREEDY, stop_ids=[])[0])
    assert n == len(p0)
    _same(again, first, tol=0)
    # The next turn: the earlier prompt, its answer (all but the last token, which was never fed) and more.
    turn = p0 + first.token_ids + p1
    nxt, n = _cached(warm, lambda: warm.generate([turn], GREEDY, stop_ids=[])[0])
    assert n == len(p0) + len(first.token_ids) - 1
    _same(nxt, cold.generate([turn], GREEDY, stop_ids=[])[0])
    # A prompt that stops one token short: the last one of it runs (its logits were never kept).
    short, n = _cached(warm, lambda: warm.generate([p0[:-1]], GREEDY, stop_ids=[])[0])
    assert n == len(p0) - 2   # the slot holding p0 holds it whole
    _same(short, cold.generate([p0[:-1]], GREEDY, stop_ids=[])[0])
    assert cold.stats["cached_prompt_tokens"] == 0


def test_a_running_sequence_lends_its_start(tiny):
    model, tok = tiny
    system = _ids(tok, "You are a careful assistant who answers in full sentences.")
    a, b = system + _ids(tok, " Name a colour."), system + _ids(tok, " Count to three.")
    shared = common_prefix(a, b)
    assert shared >= len(system) - 1
    cold = Engine(model, tok, max_batch_size=2)
    warm = Engine(model, tok, max_batch_size=4, prefix_cache=True)
    long = SamplingParams(temperature=0.0, max_new_tokens=24)
    ra = warm.submit(a, long, stop_ids=[])
    with torch.inference_mode():
        warm._step()
        warm._step()
        assert not ra.finished and ra.cached > len(a)   # decoding
        rb = warm.submit(b, GREEDY, stop_ids=[])
        twin = warm.submit(a, GREEDY, stop_ids=[])        # identical prompt: shared whole, with its logits
        while not (ra.finished and rb.finished and twin.finished):
            warm._step()
    assert rb.reused == shared and twin.reused == len(a)   # twin: nothing prefilled, the logits shared too
    assert warm.stats["shared_prompt_tokens"] == len(a) and warm.stats["cached_prompt_tokens"] == shared
    _same(rb.completion(), cold.generate([b], GREEDY, stop_ids=[])[0])
    _same(twin.completion(), cold.generate([a], GREEDY, stop_ids=[])[0])
    # A new prompt goes to the free slot that holds most of it.
    third = b + _ids(tok, " Then four.")
    best = max(common_prefix(kept[1], third) for kept in warm._kept.values())
    assert best >= len(b) > shared
    r = warm.submit(third, GREEDY, stop_ids=[])
    with torch.inference_mode():
        while not r.finished:
            warm._step()
    assert r.reused == best
    _same(r.completion(), cold.generate([third], GREEDY, stop_ids=[])[0])


def test_what_the_cache_must_not_reuse(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    p0 = _ids(tok, "The capital of France is")
    # Weights that changed: sync_weights forgets what was computed with the old ones.
    q8 = Engine(copy.deepcopy(model), tok, precision="int8", prefix_cache=True)
    q8.generate([p0], GREEDY)
    with torch.no_grad():
        q8.model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    q8.sync_weights()
    after, n = _cached(q8, lambda: q8.generate([p0], GREEDY, stop_ids=[])[0])
    assert n == 0
    _same(after, Engine(q8.model, tok, precision="int8").generate([p0], GREEDY, stop_ids=[])[0], tol=0)
    # A scored prompt (prompt_logprobs, OpenAI's echo) is prefilled whole.
    scored = SamplingParams(temperature=0.0, max_new_tokens=2, prompt_logprobs=1)
    _, n = _cached(q8, lambda: q8.generate([p0], scored)[0])
    assert n == 0
    # Named adapters are kept apart: the base model's cache is not the adapter's.
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp_path / "ad")
    engine = Engine(model, tok, adapters={"mine": str(tmp_path / "ad")}, prefix_cache=True, max_batch_size=1)
    req = engine.submit(p0, GREEDY, stop_ids=[], adapter="mine")
    with torch.inference_mode():
        while not req.finished:
            engine._step()
    plain, n = _cached(engine, lambda: engine.generate([p0], GREEDY, stop_ids=[])[0])
    assert n == 0
    _same(plain, Engine(model, tok).generate([p0], GREEDY, stop_ids=[])[0])
    again = engine.submit(p0, GREEDY, stop_ids=[], adapter="mine")
    with torch.inference_mode():
        while not again.finished:
            engine._step()
    assert again.reused == 0 and again.output == req.output   # the slot held the base model's keys
    # A runner that drops a released slot's cache (any non-Llama model) has no prefix cache.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=128)).eval()
    assert not Engine(gpt2, prefix_cache=True).prefix_cache


def test_openai_usage_reports_cached_tokens(tiny):
    from openai import OpenAI

    from chatsmith.serve.app import ServerState, ServerThread, load_state

    state = ServerState("tiny-random-llama")
    with ServerThread(state) as url:
        load_state(state, "tiny-random-llama", max_concurrency=2, kv_cache_mb=8)
        assert state.load_error is None
        try:
            client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something nice."}]
            first = client.chat.completions.create(model="tiny-random-llama", messages=msgs, max_tokens=4,
                                                   temperature=0)
            second = client.chat.completions.create(model="tiny-random-llama", messages=msgs, max_tokens=4,
                                                    temperature=0)
            assert first.usage.prompt_tokens_details.cached_tokens == 0
            assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens
            assert second.choices[0].message.content == first.choices[0].message.content
            metrics = httpx.get(f"{url}/metrics").text
            line = next(x for x in metrics.splitlines() if x.startswith("chatsmith_prompt_tokens_cached_total"))
            assert float(line.split()[-1]) == second.usage.prompt_tokens
        finally:
            state.engine.stop()


@pytest.mark.slow
def test_reused_prefix_answers_as_well_as_a_cold_prefill_on_the_embedded_model():
    """int8 rounds activations per row, so positions computed with other chunk shapes (or one by one, as
    the first turn's answer was) differ from a cold prefill's by more than float rounding: measured here,
    the second turn's logits differ by up to ~1 in log-prob at some position. What must hold is that the
    reused cache is as good an approximation of the exact model as a cold int8 prefill: each
    continuation's log-probs are compared with the fp32 model's on the same tokens."""
    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation
    from chatsmith.models import load_model

    model, tok = load_model("smollm2-135m")
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    question = "Write a short paragraph about the history of the printing press."
    conv = Conversation([Message("user", question)])
    ids = render_conversation(tok, conv, add_generation_prompt=True).input_ids
    warm = Engine(model, tok, precision="int8", max_batch_size=1, prefix_cache=True)
    cold = Engine(model, tok, precision="int8", max_batch_size=1)
    answer = warm.generate([ids], params)[0]
    conv = Conversation([Message("user", question), Message("assistant", answer.text),
                         Message("user", "Now say it again in one sentence, for a child.")])
    ids2 = render_conversation(tok, conv, add_generation_prompt=True).input_ids
    w, n = _cached(warm, lambda: warm.generate([ids2], params)[0])
    c = cold.generate([ids2], params)[0]
    assert n >= len(ids) + len(answer.token_ids) - 3   # the answer re-tokenises the same, up to its end

    def error(completion):
        seq = torch.tensor([ids2 + completion.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0, len(ids2) - 1: -1].float(), -1)
        exact = logp.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        return (exact - torch.tensor(completion.logprobs)).abs().mean().item()

    e_warm, e_cold = error(w), error(c)
    print(f"mean |log p int8 - log p fp32| over the answer: reused prefix {e_warm:.4f}, cold prefill {e_cold:.4f}")
    assert e_warm <= 1.5 * e_cold + 0.02
