"""Sampling and KV-cached generation: hand-worked logits, parity with HF, stop conditions."""

from __future__ import annotations

import math

import pytest
import torch

from chatsmith.errors import ChatsmithError
from chatsmith.infer import SamplingParams, next_token, next_token_probs
from chatsmith.infer.engine import Engine

VOCAB = 97
PROMPT = [5, 17, 42, 8, 63, 3, 77]


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


# --- next_token / next_token_probs against hand-worked numbers -------------------------------


def test_repetition_penalty_hand_worked():
    # CTRL/HF: a seen token's positive logit is divided by the penalty, a negative one multiplied.
    # logits [3, 2, -1, 0.5], history {0, 2} (0 twice: penalised once), penalty 2
    #   -> [1.5, 2, -2, 0.5]: token 1 now wins, token 2 falls further.
    logits = torch.tensor([3.0, 2.0, -1.0, 0.5])
    history = torch.tensor([0, 2, 0])
    params = greedy(repetition_penalty=2.0)
    assert next_token(logits, greedy(), history, None) == 0
    assert next_token(logits, params, history, None) == 1
    # With temperature 1 the distribution is softmax([1.5, 2, -2, 0.5]).
    probs = next_token_probs(logits, SamplingParams(temperature=1.0, top_p=1.0, repetition_penalty=2.0), history)
    expected = torch.softmax(torch.tensor([1.5, 2.0, -2.0, 0.5]), -1)
    torch.testing.assert_close(probs, expected)
    assert torch.equal(logits, torch.tensor([3.0, 2.0, -1.0, 0.5])), "next_token must not modify its input"


def test_top_p_hand_worked():
    # p = [0.5, 0.3, 0.15, 0.05], top_p 0.7: mass before each token is 0, 0.5, 0.8, 0.95, so the
    # first two are kept (0 and 0.5 < 0.7) -> renormalised [0.625, 0.375, 0, 0].
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    probs = next_token_probs(logits, SamplingParams(temperature=1.0, top_p=0.7), torch.tensor([]))
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # top_p 0.5 keeps only the first token: 0.5 of mass is already reached before the second.
    probs = next_token_probs(logits, SamplingParams(temperature=1.0, top_p=0.5), torch.tensor([]))
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_min_p_hand_worked():
    # p = [0.5, 0.3, 0.15, 0.05], min_p 0.25: threshold 0.25 * 0.5 = 0.125 drops only 0.05
    # -> [0.5, 0.3, 0.15] / 0.95.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    probs = next_token_probs(logits, SamplingParams(temperature=1.0, top_p=1.0, min_p=0.25), torch.tensor([]))
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


def test_temperature_and_top_k_hand_worked():
    # logits [2, 1, 0], temperature 0.5 -> [4, 2, 0]; top_k 2 drops token 2 -> softmax([4, 2]).
    logits = torch.tensor([2.0, 1.0, 0.0])
    probs = next_token_probs(logits, SamplingParams(temperature=0.5, top_p=1.0, top_k=2), torch.tensor([]))
    e = math.exp(2.0)
    torch.testing.assert_close(probs, torch.tensor([e / (e + 1), 1 / (e + 1), 0.0]))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.3, top_p=0.5, top_k=20, repetition_penalty=1.3),
    SamplingParams(temperature=0.9, top_p=1.0, min_p=0.05, repetition_penalty=0.8),
    SamplingParams(temperature=1.0, top_p=0.95, top_k=5, min_p=0.1),
])
def test_probs_match_hf_logits_processors(params):
    # Parity: the same processors, in the same order, as transformers' generate().
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(VOCAB, generator=g) * 3
    history = torch.randint(0, VOCAB, (30,), generator=g)
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(params.repetition_penalty),
                                 TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        procs.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        procs.append(MinPLogitsWarper(params.min_p))
    expected = procs(history[None], logits[None].clone())[0].softmax(-1)
    torch.testing.assert_close(next_token_probs(logits, params, history), expected)


@pytest.mark.parametrize("field,value,allowed", [
    ("temperature", -0.1, ">= 0"),
    ("temperature", float("nan"), ">= 0"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_k", -1, ">= 0"),
    ("top_k", 2.5, ">= 0"),
    ("min_p", 1.1, "[0, 1]"),
    ("repetition_penalty", 0.0, "> 0"),
    ("max_new_tokens", 0, ">= 1"),
    ("seed", -1, "[0, 2**64)"),
])
def test_validate_names_field_and_range(field, value, allowed):
    params = SamplingParams(**{field: value})
    with pytest.raises(ChatsmithError) as err:
        params.validate()
    assert f"'{field}'" in str(err.value) and allowed in str(err.value)


def test_validate_accepts_defaults_and_edges():
    SamplingParams().validate()
    SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=1.0, seed=0).validate()


def test_sampling_params_importable_without_torch():
    import subprocess
    import sys

    code = "import sys, chatsmith.infer; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- the engine, seen as one generator (chat, eval) -----------------------------------------------


def engine_for(model) -> Engine:
    return Engine(model, None, max_batch_size=2, precision="module")


def generate(model, prompt, params, stop_ids) -> list[int]:
    """The new ids of one sequence, stop id excluded (the engine keeps it as the last token)."""
    c = engine_for(model).generate([prompt], params, stop_ids=stop_ids)[0]
    return c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids


def hf(model, prompt, new, **kw) -> list[int]:
    return model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=new, min_new_tokens=new, **kw)[0, len(prompt):].tolist()


def test_greedy_matches_hf_generate(model):
    assert generate(model, PROMPT, greedy(max_new_tokens=24), set()) == hf(model, PROMPT, 24)


def test_greedy_with_repetition_penalty_matches_hf_generate(model):
    assert generate(model, PROMPT, greedy(max_new_tokens=24, repetition_penalty=1.5), set()) == \
        hf(model, PROMPT, 24, repetition_penalty=1.5)


def test_presence_and_frequency_penalties_hand_worked():
    # OpenAI: logit -= count * frequency + presence, over generated tokens only.
    # logits [3, 2, 1], generated {0: 2, 2: 1}, frequency 0.5, presence 0.25 -> [1.75, 2, 0.25]
    from chatsmith.infer.sampling import apply_penalties

    logits = torch.tensor([3.0, 2.0, 1.0])
    p = greedy(presence_penalty=0.25, frequency_penalty=0.5)
    torch.testing.assert_close(apply_penalties(logits, p, torch.tensor([]), {0: 2, 2: 1}),
                               torch.tensor([1.75, 2.0, 0.25]))
    assert next_token(logits, p, torch.tensor([]), None, {0: 2, 2: 1}) == 1
    assert torch.equal(logits, torch.tensor([3.0, 2.0, 1.0])), "penalties must not modify the input"


def test_tiny_temperatures_are_greedy_not_overflow():
    # 5 / 1e-40 overflows float32: such a temperature must act as 0, not produce NaN probabilities.
    logits = torch.tensor([5.0, 4.0, -3.0])
    for t in (1e-40, 1e-30, 1e-6):
        p = SamplingParams(temperature=t)
        p.validate()
        assert p.greedy and next_token(logits, p, torch.tensor([]), torch.Generator().manual_seed(0)) == 0
        assert torch.equal(next_token_probs(logits, p, torch.tensor([])), torch.tensor([1.0, 0.0, 0.0]))


def test_stream_does_not_hold_inference_mode_across_yield(model):
    stream = engine_for(model).stream(PROMPT, greedy(max_new_tokens=3))
    it = iter(stream)
    assert stream.request.output == []   # nothing runs before the first piece is asked for
    with pytest.raises(StopIteration):   # no tokenizer: no text, but the request runs to its end
        next(it)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert len(stream.request.output) == 3 and stream.request.finish_reason == "length"


def test_closing_a_stream_early_cancels_and_frees_the_slot(model):
    from chatsmith.models import load_tokenizer

    tok = load_tokenizer("tiny-random-llama")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)).eval()
    engine = Engine(m, tok, max_batch_size=1, precision="module")
    stream = engine.stream(tok("Hello")["input_ids"], greedy(max_new_tokens=40), stop_ids=[])
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(stream.request.output) >= 5:
            break
    stream_iter_closed = stream.request.finish_reason
    assert stream_iter_closed == "cancelled" and 5 <= len(stream.request.output) < 40
    assert engine.running == 0 and engine.waiting == 0   # the slot is free for the next request
    assert "".join(pieces) == stream.request.detok.text[: len("".join(pieces))]


def test_seed_reproducible_and_different_seeds_differ(model):
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=30, seed=1234)
    a = generate(model, PROMPT, params, stop_ids=set())
    b = generate(model, PROMPT, params, stop_ids=set())
    c = generate(model, PROMPT, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=30, seed=4321), set())
    assert len(a) == 30
    assert a == b
    assert a != c  # 30 draws over ~97 near-uniform tokens: a collision has probability ~0


def test_top_k_1_equals_greedy(model):
    sampled = generate(model, PROMPT, SamplingParams(temperature=1.5, top_k=1, max_new_tokens=20, seed=7), set())
    assert sampled == generate(model, PROMPT, greedy(max_new_tokens=20), set())


def test_stops_at_stop_id(model):
    full = generate(model, PROMPT, greedy(max_new_tokens=20), set())
    stop = full[5]
    cut = full.index(stop)  # the first occurrence ends generation
    c = engine_for(model).generate([PROMPT], greedy(max_new_tokens=20), stop_ids={stop})[0]
    assert c.finish_reason == "stop" and c.token_ids == full[:cut + 1]   # the stop id is the last token
    assert generate(model, PROMPT, greedy(max_new_tokens=20), [stop, 10_000]) == full[:cut]


def test_max_new_tokens_respected(model):
    assert len(generate(model, PROMPT, greedy(max_new_tokens=1), set())) == 1
    assert len(generate(model, PROMPT, SamplingParams(max_new_tokens=9, seed=0), set())) == 9


def test_context_length_caps_generation(model):
    limit = model.config.max_position_embeddings  # 256
    prompt = [1] * (limit - 4)
    c = engine_for(model).generate([prompt], greedy(max_new_tokens=50), stop_ids=set())[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 4   # prompt + answer fill the context
    with pytest.raises(ChatsmithError, match="context length"):
        generate(model, [1] * limit, greedy(), set())


def test_empty_prompt_and_bad_params_rejected(model):
    with pytest.raises(ChatsmithError, match="empty"):
        generate(model, [], greedy(), set())
    with pytest.raises(ChatsmithError, match="top_p"):
        generate(model, PROMPT, SamplingParams(top_p=0), set())
