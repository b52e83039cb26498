"""The generation engine: parity with `transformers` generate, batch invariance, sampling, LoRA,
live weights for RL, memory budget, cancellation and streaming. Tiny seeded models only."""

from __future__ import annotations

import threading

import pytest
import torch

from chatsmith.errors import ChatsmithError
from chatsmith.infer.engine import Engine, RequestTooLarge
from chatsmith.infer.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def tiny():
    from chatsmith.models import load_model

    model, tok = load_model("tiny-random-llama")
    return model, tok


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tok = tiny
    texts = ["Hello there, how are you?", "The capital of France is", "1 2 3", "Write a long story about a dragon who"]
    return [tok(t)["input_ids"] for t in texts]


def _tiny_qwen2():
    # q/k/v biases and a different head layout than tiny-random-llama: exercises the fused projections.
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=0,
                      tie_word_embeddings=False)
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases are zero-initialised; make them matter
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return m


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      eos_token_id=0, bos_token_id=0)).eval()


def _hf_greedy(model, prompt, n, eos=None):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_hf_generate_single_and_batched(tiny, prompts):
    model, tok = tiny
    engine = Engine(model, tok)  # module precision: the model's own fp32 weights
    expected = [_hf_greedy(model, p, 16, eos=sorted(engine.stop_default)) for p in prompts]
    batched = engine.generate(prompts, GREEDY)
    assert [c.token_ids for c in batched] == expected
    for p, e in zip(prompts, expected):
        assert engine.generate([p], GREEDY)[0].token_ids == e
    assert all(c.finish_reason == "length" and c.prompt_tokens == len(p) for c, p in zip(batched, prompts))


@pytest.mark.parametrize("make", [_tiny_qwen2, _tiny_gpt2], ids=["qwen2-fast-path", "gpt2-module-runner"])
def test_greedy_equals_hf_generate_other_architectures(make):
    model = make()
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 250, (n,), generator=rng).tolist() for n in (5, 17, 9)]
    engine = Engine(model, max_batch_size=2, prefill_chunk=8)  # 3 prompts over 2 slots, prompts in chunks
    assert type(engine.runner).__name__ == ("LlamaRunner" if make is _tiny_qwen2 else "ModuleRunner")
    got = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12), stop_ids=[])
    assert [c.token_ids for c in got] == [_hf_greedy(model, p, 12, eos=[]) for p in prompts]
    if make is _tiny_qwen2:  # int8 weights (with the q/k/v biases) stay close to fp32
        q8 = Engine(model, precision="int8").generate(prompts, SamplingParams(temperature=0, max_new_tokens=12),
                                                      stop_ids=[])
        for a, b in zip(got, q8):
            assert a.token_ids[:2] == b.token_ids[:2]
            assert a.logprobs[:2] == pytest.approx(b.logprobs[:2], abs=0.05)


def test_stop_token_is_included_and_matches_hf(tiny, prompts):
    model, tok = tiny
    engine = Engine(model, tok)
    free = engine.generate([prompts[0]], GREEDY, stop_ids=[])[0].token_ids
    stop = free[5]
    first = free.index(stop)
    c = engine.generate([prompts[0]], GREEDY, stop_ids=[stop])[0]
    assert c.finish_reason == "stop" and c.token_ids == free[: first + 1] and c.token_ids[-1] == stop
    assert c.token_ids == _hf_greedy(model, prompts[0], 16, eos=stop)
    assert len(c.logprobs) == len(c.token_ids)


def test_logprobs_are_raw_log_softmax(tiny, prompts):
    model, tok = tiny
    p = prompts[1]
    c = Engine(model, tok).generate([p], SamplingParams(temperature=1.3, top_k=5, max_new_tokens=8, seed=3,
                                                        top_logprobs=3))[0]
    with torch.no_grad():
        logp = model(torch.tensor([p + c.token_ids])).logits[0].log_softmax(-1)
    ref = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
    assert c.logprobs == pytest.approx(ref, abs=1e-4)
    top = c.top_logprobs[0]
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    assert top[0][1] == pytest.approx(logp[len(p) - 1].max().item(), abs=1e-4)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_is_batch_invariant_exactly(tiny, prompts, precision):
    model, tok = tiny
    engine = Engine(model, tok, precision=precision, prefill_chunk=4)
    params = SamplingParams(temperature=0.8, max_new_tokens=12, seed=7)
    together = engine.generate(prompts, params)
    for r, p in enumerate(prompts):
        alone = engine.generate([p], SamplingParams(temperature=0.8, max_new_tokens=12, seed=7 + r))[0]
        assert alone.token_ids == together[r].token_ids
        assert alone.logprobs == together[r].logprobs  # bit for bit
    # int8 and int4 stay close to the fp32 model: same first greedy tokens on this model, log-probs close
    # (random weights are off int4's grid; tests/test_int4.py bounds the KL on the real model).
    fp = Engine(model, tok).generate(prompts, GREEDY)
    q = engine.generate(prompts, GREEDY)
    for a, b in zip(fp, q):
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        assert n >= (4 if precision == "int8" else 2)
        assert a.logprobs[:n] == pytest.approx(b.logprobs[:n], abs=0.05 if precision == "int8" else 0.15)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_native_steps_are_built_and_equal_the_python_path(tiny, prompts, precision):
    """The C++ decode and prefill steps (chatsmith/infer/native) are built here and give the Python
    path's logits and KV cache bit for bit: decode single and batched, with rows at different lengths
    in non-adjacent slots; prefill of several sequences' chunks in one pass, one starting mid-prompt."""
    model, tok = tiny
    engine = Engine(model, tok, precision=precision, max_batch_size=6)
    runner = engine.runner
    assert runner.native is not None  # the build works on this machine (compiler, headers, ninja)
    native = runner.native
    with torch.inference_mode():
        for slot, p in zip((0, 2, 5), prompts):
            runner.prefill(slot, p, 0, None)
        cases = [([2], [7], [len(prompts[1])]), ([0, 2, 5], [5, 9, 11], [len(p) for p in prompts[:3]])]
        for slots, tokens, positions in cases:
            runner.native = native
            fast = runner.decode(slots, tokens, positions, [None] * len(slots))
            runner.native = None
            slow = runner.decode(slots, tokens, positions, [None] * len(slots))
            assert torch.equal(fast, slow)
            assert runner.k[0][slots[0], :, positions[0]].abs().sum() > 0  # it wrote the new key
        long = prompts[3]
        for chunks in ([(1, prompts[0], 0), (3, long[:5], 0), (4, prompts[2], 0)], [(3, long[5:], 5), (1, [9, 8], 7)]):
            runner.native = native
            together = runner.prefill_batch(chunks)
            cached = [(runner.k[-1][s, :, : a + len(ids)].clone(), runner.v[0][s, :, : a + len(ids)].clone())
                      for s, ids, a in chunks]
            runner.native = None
            assert runner.prefill_batch(chunks) is None   # no native step: the engine prefills one by one
            for (s, ids, start), logits, (k, v) in zip(chunks, together, cached):
                assert torch.equal(logits, runner.prefill(s, ids, start, None))
                assert torch.equal(runner.k[-1][s, :, : start + len(ids)], k)
                assert torch.equal(runner.v[0][s, :, : start + len(ids)], v)
    runner.native = native
    # and whole generations agree with the Python path, prompts prefilled together or one by one
    params = SamplingParams(temperature=0.8, max_new_tokens=10, seed=3)
    fast = engine.generate(prompts, params)
    runner.native = None
    slow = engine.generate(prompts, params)
    assert [c.token_ids for c in fast] == [c.token_ids for c in slow]
    assert [c.logprobs for c in fast] == [c.logprobs for c in slow]


def test_a_killed_native_build_leaves_no_lock_that_hangs_the_next(tmp_path):
    """torch's extension builder leaves its `lock` file behind when a build is killed, and the next
    build waits for it forever (a server stuck at "loading"). chatsmith removes it under an flock;
    the load runs in a fresh process, with a timeout that fails the test instead of hanging."""
    import subprocess
    import sys

    from chatsmith.infer import native

    assert native.load() is not None   # built (or found) here first
    key = native.source_key()
    stale = native.build_dir() / key / "lock"
    stale.write_text("")                # what a killed build leaves
    code = "from chatsmith.infer import native; print(native.load() is not None)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "True", r.stderr[-2000:]
    assert not stale.exists()


def test_seed_reproducible_and_n_choices_differ(tiny, prompts):
    model, tok = tiny
    engine = Engine(model, tok)
    p = SamplingParams(temperature=1.0, top_p=0.95, min_p=0.01, max_new_tokens=10, seed=11, n=3)
    a = engine.generate([prompts[0]], p)
    b = engine.generate([prompts[0]], p)
    assert len(a) == 3 and [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) == 3
    top1 = engine.generate([prompts[0]], SamplingParams(temperature=1.0, top_k=1, max_new_tokens=10, seed=5))
    assert top1[0].token_ids == engine.generate([prompts[0]], GREEDY)[0].token_ids[:10]


def test_penalties_change_the_output(tiny, prompts):
    model, tok = tiny
    engine = Engine(model, tok)
    plain = engine.generate([prompts[2]], SamplingParams(temperature=0, max_new_tokens=12), stop_ids=[])[0].token_ids
    assert len(set(plain)) < len(plain)  # the greedy tiny model repeats itself
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 5.0}):
        pen = engine.generate([prompts[2]], SamplingParams(temperature=0, max_new_tokens=12, **kw), stop_ids=[])[0]
        assert len(set(pen.token_ids)) > len(set(plain)), kw


def test_stop_strings(tiny, prompts):
    model, tok = tiny
    engine = Engine(model, tok)
    free = engine.generate([prompts[3]], GREEDY, stop_ids=[])[0].token_ids
    text = tok.decode(free, skip_special_tokens=True)
    word = tok.decode(free[6:8], skip_special_tokens=True).strip()
    assert word and word in text
    c = engine.generate([prompts[3]], SamplingParams(temperature=0, max_new_tokens=16, stop=[word]), stop_ids=[])[0]
    assert c.finish_reason == "stop" and c.stop_string == word
    assert word in tok.decode(c.token_ids, skip_special_tokens=True)
    assert word not in tok.decode(c.token_ids[:-1], skip_special_tokens=True)
    with pytest.raises(ChatsmithError, match="tokenizer"):
        Engine(model).generate([prompts[0]], SamplingParams(stop=["x"]))


def test_peft_training_mode_live_weights_and_sync(tiny, prompts):
    from peft import LoraConfig, get_peft_model

    base, tok = tiny
    import copy

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                           target_modules=["q_proj", "v_proj", "down_proj"]))
    model.train()
    modes = {n: m.training for n, m in model.named_modules()}
    engine, q8 = Engine(model, tok), Engine(model, tok, precision="int8")
    before = engine.generate(prompts[:2], GREEDY)
    assert {n: m.training for n, m in model.named_modules()} == modes  # train/eval flags restored
    # LoRA B starts at zero, so the adapter is a no-op: same answers as the base model.
    assert [c.token_ids for c in before] == [c.token_ids for c in Engine(base, tok).generate(prompts[:2], GREEDY)]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    after = engine.generate(prompts[:2], GREEDY)  # module precision reads the live weights
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    model.eval()
    with torch.no_grad():
        expected = [_hf_greedy(model, p, 16, eos=sorted(engine.stop_default)) for p in prompts[:2]]
    model.train()
    assert [c.token_ids for c in after] == expected
    stale = q8.generate(prompts[:2], GREEDY)
    assert [c.token_ids for c in stale] == [c.token_ids for c in Engine(base, tok, precision="int8").generate(
        prompts[:2], GREEDY)]
    q8.sync_weights()
    fresh = q8.generate(prompts[:2], GREEDY)
    assert [c.token_ids[:3] for c in fresh] == [e[:3] for e in expected]


def test_lora_adapters_served_by_name(tiny, prompts, tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model

    base, tok = tiny
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(hash(n) % 1000))
    peft_model.save_pretrained(tmp_path / "ad")
    peft_model.eval()
    expected = Engine(peft_model, tok).generate(prompts[:2], GREEDY)
    engine = Engine(base, tok, adapters={"mine": str(tmp_path / "ad")})
    plain = engine.generate(prompts[:2], GREEDY)
    reqs = [engine.submit(prompts[0], GREEDY, adapter="mine"), engine.submit(prompts[1], GREEDY),
            engine.submit(prompts[1], GREEDY, adapter="mine")]
    with torch.inference_mode():
        while not all(r.finished for r in reqs):
            engine._step()
    assert reqs[0].output == expected[0].token_ids and reqs[2].output == expected[1].token_ids
    assert reqs[1].output == plain[1].token_ids != expected[1].token_ids
    with pytest.raises(ChatsmithError, match="unknown LoRA adapter 'other'"):
        engine.submit(prompts[0], GREEDY, adapter="other")


@pytest.mark.parametrize("precision", ["module", "int8"])
def test_lora_adapter_with_rank_and_alpha_patterns_gets_peft_scales(tiny, prompts, tmp_path, precision):
    """peft scales each module by its own alpha / r when rank_pattern/alpha_pattern override them
    (and alpha / sqrt(r) with rsLoRA): the adapter served by name gives the logits of peft's own model."""
    import copy

    from peft import LoraConfig, get_peft_model

    base, tok = tiny
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 8},
                     alpha_pattern={"down_proj": 32, "q_proj": 2})
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    assert peft_model.base_model.model.model.layers[1].self_attn.q_proj.r["default"] == 8   # the patterns apply
    peft_model.save_pretrained(tmp_path / "ad")
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    from chatsmith.infer.lora import load_lora_adapter

    ad = load_lora_adapter("p", str(tmp_path / "ad"))
    assert ad.weights["layers.1.self_attn.q_proj"][2] == pytest.approx(2 / 8)     # alpha_pattern / rank_pattern
    assert ad.weights["layers.0.self_attn.v_proj"][2] == pytest.approx(8 / 2)     # lora_alpha / rank_pattern
    assert ad.weights["layers.0.mlp.down_proj"][2] == pytest.approx(32 / 4)       # alpha_pattern / r
    served = Engine(base, tok, precision=precision, adapters={"p": str(tmp_path / "ad")})
    reference = Engine(merged, tok, precision="module")   # peft's own numbers, merged, in fp32
    with torch.inference_mode():
        for ids in prompts[:2]:
            with_adapter = served.runner.prefill(0, ids, 0, "p")
            without = served.runner.prefill(1, ids, 0, None)
            expected = reference.runner.prefill(0, ids, 0, None)
            gap = (without - expected).abs().max().item()
            assert gap > 0.1   # the adapter matters: the checks below are not vacuous
            if precision == "module":
                torch.testing.assert_close(with_adapter, expected, atol=1e-4, rtol=0)
            else:   # int8 rounds the base weights; the deltas must still land close to peft's logits
                assert (with_adapter - expected).abs().max().item() < 0.5 * gap


def test_kv_budget_rejects_what_cannot_fit(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch_size=4, kv_cache_mb=0.05)  # 512 bytes/token -> 25 tokens per slot
    assert engine.bytes_per_token == 2 * 2 * 2 * 16 * 4 and engine.slot_tokens == 25
    with pytest.raises(RequestTooLarge, match=r"the prompt has 40 tokens but a sequence can hold at most "
                                              r"25 tokens \(KV cache budget 0.05 MB over 4 slots\)"):
        engine.submit(list(range(1, 41)), GREEDY)
    c = engine.generate([list(range(1, 21))], SamplingParams(temperature=0, max_new_tokens=50), stop_ids=[])[0]
    assert c.finish_reason == "length" and len(c.token_ids) == engine.slot_tokens - 20
    with pytest.raises(ChatsmithError, match="holds only"):
        Engine(model, tok, max_batch_size=16, kv_cache_mb=0.01)
    # A caller that knows its longest sequence (RL rollouts: --max-length) sizes the slots to it.
    sized = Engine(model, tok, max_batch_size=4, max_sequence_tokens=30)
    assert sized.slot_tokens == 30 and sized.runner.slot_tokens == 30 and engine.context > 30
    c = sized.generate([list(range(1, 21))], SamplingParams(temperature=0, max_new_tokens=50), stop_ids=[])[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 10


def test_continuous_batching_streaming_and_cancel(tiny, prompts):
    model, tok = tiny
    engine = Engine(model, tok, max_batch_size=2, prefill_chunk=4)
    streamed: list[int] = []
    finished = threading.Event()
    engine.start()
    try:
        long = engine.submit(prompts[0], SamplingParams(temperature=0, max_new_tokens=100000 // 50), stop_ids=[])
        a = engine.submit(prompts[1], GREEDY, on_token=lambda r, t, lp, text: streamed.append(t),
                          on_finish=lambda r: finished.set())
        b = engine.submit(prompts[2], GREEDY)  # waits for a slot, joins when `a` leaves
        assert a.wait(30).token_ids == streamed and finished.is_set()
        b.wait(30)
        assert not long.finished  # still decoding while the others joined and left
        long.cancel()
        c = long.wait(30)
        assert c.finish_reason == "cancelled" and 0 < len(c.token_ids) < 2000
        assert engine.running == 0 and sorted(engine._free_slots) == [0, 1]
        # results equal the same requests run alone
        alone = Engine(model, tok).generate([prompts[1], prompts[2]], GREEDY)
        assert [a.output, b.output] == [x.token_ids for x in alone]
    finally:
        engine.stop()


def test_bad_requests_are_clear(tiny):
    model, tok = tiny
    engine = Engine(model, tok)
    with pytest.raises(ChatsmithError, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(ChatsmithError, match="outside the vocabulary"):
        engine.submit([10**7], GREEDY)
    with pytest.raises(ChatsmithError, match="'top_p' must be in"):
        engine.submit([1, 2], SamplingParams(top_p=0.0))
    with pytest.raises(ChatsmithError, match="precision"):
        Engine(model, tok, precision="fp8")


def test_json_object_constraint(tiny):
    import json

    from chatsmith.infer.constraints import START, JsonObjectConstraint, feed

    assert feed(START, '{"a": [1, -2.5e3, true, null, {"b": "x\\n"}]}')[0] == "DONE"
    for bad in ('[1]', '{"a" 1}', '{"a": tru', '{"a": 01}', '{a: 1}', '{"a": 1}}'):
        state = feed(START, bad)
        assert state is None or state[0] != "DONE", bad
    model, tok = tiny
    engine = Engine(model, tok, precision="int8")
    for seed, temperature in [(0, 0.0), (1, 1.0), (2, 1.0)]:
        r = engine.submit(tok("JSON please")["input_ids"], SamplingParams(temperature=temperature, max_new_tokens=150,
                                                                           seed=seed),
                          constraint=JsonObjectConstraint(tok))
        with torch.inference_mode():
            while not r.finished:
                engine._step()
        assert r.finish_reason == "stop"
        assert isinstance(json.loads(tok.decode(r.output, skip_special_tokens=True)), dict)


def test_identical_prompts_share_their_prefill(tiny, prompts):
    """The G copies of one prompt (a GRPO group, `n` choices) are prefilled once: the others copy its
    KV cache, and every answer equals the answer generated alone."""
    import dataclasses

    model, _ = tiny
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=5)
    batch = [prompts[0]] * 4 + [prompts[1]] * 2
    for precision in ("module", "int8"):
        engine = Engine(model, max_batch_size=8, precision=precision)
        together = engine.generate(batch, params)
        assert engine.stats["shared_prompt_tokens"] == 3 * len(prompts[0]) + len(prompts[1])
        assert len({tuple(c.token_ids) for c in together[:4]}) > 1   # different draws, one prefill
        for i, c in enumerate(together):
            # Sequence i of a seeded call draws with seed + i.
            alone = engine.generate([batch[i]], dataclasses.replace(params, seed=params.seed + i))[0]
            assert c.token_ids == alone.token_ids
            if precision == "int8":   # int8 kernels are batch-invariant bit for bit (see above)
                assert c.logprobs == alone.logprobs
            else:                     # fp32 matmuls over B rows round differently from 1 row
                assert c.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
