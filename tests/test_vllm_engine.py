"""The vLLM engine (chatsmith/infer/vllm_engine.py) up to the vLLM boundary.

vLLM needs a CUDA GPU and cannot run on the CPU machines these tests run on, so the `vllm` package
here is tests/fixtures/fake_vllm: vLLM's API surface that chatsmith uses (LLM, its llm_engine step
loop, SamplingParams, TokensPrompt, RequestOutput, LoRARequest, apply_model/load_weights), generating
with chatsmith's built-in engine over a model built from the config chatsmith hands it. So these
tests check the translation both ways (what vLLM is asked, how its answers become chatsmith's), the
weight pushes and the server/RL wiring; not vLLM's numerics. Everything else is real: tiny seeded
models, the built-in engine to compare with, a real HTTP server and the official openai client.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatsmith.errors import ChatsmithError
from chatsmith.infer.engine import Engine
from chatsmith.infer.sampling import SamplingParams

FAKE = Path(__file__).parent / "fixtures" / "fake_vllm"
MODEL = "tiny-random-llama"


def _forget_vllm() -> None:
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def vllm():
    """The stand-in vllm package on sys.path for this module's tests (removed afterwards)."""
    _forget_vllm()
    sys.path.insert(0, str(FAKE))
    import vllm

    yield vllm
    sys.path.remove(str(FAKE))
    _forget_vllm()


@pytest.fixture(scope="module")
def tiny():
    from chatsmith.models import load_model

    return load_model(MODEL)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny):
    """A PEFT LoRA adapter for tiny-random-llama with non-zero weights (so it changes the answers)."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny[0]), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("lora") / "mine"
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def engines(vllm, tiny, adapter_dir):
    """(VllmEngine, the built-in Engine) over the same tiny model, both serving adapter 'mine'."""
    from chatsmith.infer.vllm_engine import VllmEngine

    model, tok = tiny
    return (VllmEngine(model, tok, max_batch_size=8, adapters={"mine": adapter_dir}),
            Engine(model, tok, precision="module", adapters={"mine": adapter_dir}))


@pytest.fixture(scope="module")
def prompts(tiny):
    tok = tiny[1]
    return [tok(t)["input_ids"] for t in ("Hello there, how are you?", "The capital of France is", "1 2 3")]


def test_importing_chatsmith_does_not_import_vllm():
    code = ("import importlib.util, sys, chatsmith.cli, chatsmith.infer.vllm_engine\n"
            "assert 'vllm' not in sys.modules, 'vllm imported'\n"
            "assert importlib.util.find_spec('vllm')  # importable here: the modules above chose not to\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(FAKE), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]


def test_missing_vllm_is_a_clear_error(monkeypatch, tmp_path, capsys):
    from chatsmith.cli import main
    from chatsmith.infer.vllm_engine import VllmEngine

    monkeypatch.setitem(sys.modules, "vllm", None)   # what `import vllm` meets when it is not installed
    with pytest.raises(ChatsmithError, match=r"pip install 'chatsmith\[vllm\]'\) on a CUDA machine"):
        VllmEngine(torch.nn.Linear(2, 2))
    # RL fails before anything loads or is written; the server before it listens.
    out = tmp_path / "run"
    assert main(["grpo", "--model", MODEL, "--data", "builtin:arithmetic", "--reward", "exact_answer",
                 "--rollout-engine", "vllm", "--output", str(out)]) == 2
    assert "chatsmith[vllm]" in capsys.readouterr().err and not out.exists()
    assert main(["serve", MODEL, "--engine", "vllm", "--port", "1"]) == 2
    assert "chatsmith[vllm]" in capsys.readouterr().err


def test_no_cuda_is_a_clear_error(vllm, tiny, monkeypatch):
    from vllm.platforms import current_platform

    from chatsmith.infer.vllm_engine import VllmEngine

    monkeypatch.setattr(current_platform, "device_type", "")   # vLLM found no GPU
    n = len(vllm.LLM.instances)
    with pytest.raises(ChatsmithError, match="CUDA .*GPU and vLLM found none.*--engine builtin"):
        VllmEngine(*tiny)
    assert len(vllm.LLM.instances) == n   # refused before vLLM was asked for anything


def test_greedy_and_seeded_samples_equal_the_builtin_engine(vllm, engines, prompts):
    ve, be = engines
    llm = ve.llm
    assert llm.kwargs["load_format"] == "dummy" and llm.kwargs["max_model_len"] == ve.slot_tokens == be.slot_tokens
    assert llm.kwargs["enable_lora"] and llm.kwargs["max_num_seqs"] == 8 and llm.kwargs["max_lora_rank"] == 8
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    ours, theirs = ve.generate(prompts, greedy), be.generate(prompts, greedy)
    # vLLM started from random (dummy) weights: equal ids mean the module's weights were pushed, once.
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert llm.model.loads == ve.weight_pushes == 1 and llm.prefix_cache_resets == 1
    for a, b in zip(ours, theirs):
        assert a.finish_reason == b.finish_reason == "length" and a.text == b.text and a.prompt_tokens == b.prompt_tokens
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
    sent = llm.requests[-len(prompts):]
    assert [r["prompt"]["prompt_token_ids"] for r in sent] == prompts
    p = sent[0]["params"]
    assert (p.temperature, p.max_tokens, p.n, p.logprobs, p.seed, p.ignore_eos) == (0.0, 16, 1, 0, None, True)
    assert p.stop_token_ids == sorted(be.stop_default) and p.stop == [] and not p.detokenize

    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1,
                             presence_penalty=0.5, frequency_penalty=0.25, seed=11, n=3, top_logprobs=2,
                             max_new_tokens=9)
    ours, theirs = ve.generate(prompts, sampled, seed_offset=100), be.generate(prompts, sampled, seed_offset=100)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert len({tuple(c.token_ids) for c in ours[:3]}) > 1   # n answers of a prompt differ (seed + r)
    # (the fake batches 8 sequences at a time, the built-in engine 16: the last float bits may differ)
    assert [[[t for t, _ in top] for top in c.top_logprobs] for c in ours] == [
        [[t for t, _ in top] for top in c.top_logprobs] for c in theirs]
    torch.testing.assert_close(torch.tensor([[lp for top in c.top_logprobs for _, lp in top] for c in ours]),
                               torch.tensor([[lp for top in c.top_logprobs for _, lp in top] for c in theirs]),
                               rtol=0, atol=1e-5)
    sent = llm.requests[-9:]
    assert [r["params"].seed for r in sent] == [111 + r for r in range(9)] and all(r["params"].n == 1 for r in sent)
    p = sent[0]["params"]
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
            p.max_tokens, p.logprobs) == (0.8, 0.9, 40, 0.05, 1.1, 0.5, 0.25, 9, 2)
    assert llm.model.loads == 1   # the weights did not change: no second push


def test_stop_strings_stop_ids_max_tokens_and_prompt_scoring(engines, prompts):
    ve, be = engines
    llm = ve.llm
    params = SamplingParams(temperature=1.0, top_p=1.0, seed=5, max_new_tokens=24)
    free = be.generate(prompts[:1], params, stop_ids=[])[0]
    # A stop id met at the 6th token; a stop string from the middle of the free-running text.
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    a, b = ve.generate(prompts[:1], params, stop_ids=[stop_id])[0], be.generate(prompts[:1], params, stop_ids=[stop_id])[0]
    assert a.finish_reason == b.finish_reason == "stop" and a.token_ids == b.token_ids == free.token_ids[:first + 1]
    assert llm.requests[-1]["params"].stop_token_ids == [stop_id]

    text = free.text.strip()
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), free.text
    with_stop = SamplingParams(temperature=1.0, top_p=1.0, seed=5, max_new_tokens=24, stop=[stop])
    a, b = ve.generate(prompts[:1], with_stop, stop_ids=[])[0], be.generate(prompts[:1], with_stop, stop_ids=[])[0]
    assert (a.finish_reason, a.stop_string, a.text, a.token_ids) == ("stop", stop, b.text, b.token_ids)
    assert stop not in a.text and len(a.token_ids) < len(free.token_ids)
    sent = llm.requests[-1]["params"]
    assert sent.stop == [stop] and sent.detokenize and not sent.include_stop_str_in_output

    a = ve.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=3), stop_ids=[])[0]
    assert a.finish_reason == "length" and len(a.token_ids) == 3

    score = SamplingParams(temperature=0, max_new_tokens=0, prompt_logprobs=2)
    a, b = ve.generate(prompts[1:2], score)[0], be.generate(prompts[1:2], score)[0]
    assert a.token_ids == [] and a.finish_reason == "length" and llm.requests[-1]["params"].max_tokens == 1
    assert a.prompt_logprobs[0] is None and len(a.prompt_logprobs) == len(prompts[1])
    torch.testing.assert_close(torch.tensor(a.prompt_logprobs[1:]), torch.tensor(b.prompt_logprobs[1:]), rtol=0, atol=1e-5)
    assert [[t for t, _ in top] for top in a.prompt_top_logprobs] == [[t for t, _ in top] for top in b.prompt_top_logprobs]


def test_lora_adapter_goes_as_a_lora_request(vllm, engines, prompts, adapter_dir):
    from vllm.lora.request import LoRARequest

    ve, be = engines
    params = SamplingParams(temperature=0, max_new_tokens=8)
    ours = ve.submit(prompts[0], params, adapter="mine")
    while not ours.finished:
        ve.step_once()
    theirs = be.stream(prompts[0], params, adapter="mine")
    "".join(theirs)
    assert ve.llm.requests[-1]["lora_request"] == LoRARequest("mine", 1, str(Path(adapter_dir).resolve()))
    assert ours.output == theirs.request.output
    assert ours.output != ve.generate([prompts[0]], params)[0].token_ids   # the adapter changes the answer
    assert ve.llm.requests[-1]["lora_request"] is None
    with pytest.raises(ChatsmithError, match="unknown LoRA adapter 'other'; this engine serves mine"):
        ve.submit(prompts[0], params, adapter="other")
    with pytest.raises(ChatsmithError, match="--engine builtin"):
        ve.submit(prompts[0], params, constraint=object())


def test_stream_in_a_background_thread_and_cancel(engines, prompts):
    ve, be = engines
    params = SamplingParams(temperature=1.0, seed=2, max_new_tokens=12)
    ve.start()
    try:
        stream = ve.stream(prompts[2], params)
        pieces = list(stream)
        assert "".join(pieces) == stream.completion().text == be.generate([prompts[2]], params)[0].text
        long = ve.submit(prompts[2], SamplingParams(temperature=1.0, seed=3, max_new_tokens=200),
                         on_token=lambda req, *_: req.cancel() if len(req.output) == 2 else None)
        done = long.wait(timeout=30)
        assert done.finish_reason == "cancelled" and len(done.token_ids) < 200
        assert ve.llm.aborted[-1] == f"cs{long.id}"
    finally:
        ve.stop()
    assert ve.running == ve.waiting == 0


def test_server_with_engine_vllm_answers_the_openai_client(vllm, tiny):
    import httpx
    from openai import OpenAI

    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation
    from chatsmith.serve.app import ServerState, ServerThread, load_state

    state = ServerState(MODEL)
    with ServerThread(state) as url:
        load_state(state, MODEL, max_concurrency=4, max_queue=8, engine="vllm")
        assert state.load_error is None and type(state.engine).__name__ == "VllmEngine"
        assert httpx.get(f"{url}/health").status_code == 200
        try:
            client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            msgs = [{"role": "user", "content": "Tell me something."}]
            r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=1.0, seed=5,
                                               logprobs=True)
            ids = render_conversation(state.tokenizer, Conversation([Message("user", "Tell me something.")]),
                                      add_generation_prompt=True).input_ids
            expected = Engine(*tiny).generate([ids], SamplingParams(temperature=1.0, top_p=1.0, seed=5,
                                                                    max_new_tokens=12))[0]
            assert r.choices[0].message.content == expected.text and r.usage.completion_tokens == len(expected.token_ids)
            assert r.usage.prompt_tokens == len(ids) and r.choices[0].finish_reason == expected.finish_reason
            chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=1.0,
                                                         seed=5, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
            tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
            bad = httpx.post(f"{url}/v1/chat/completions", json={"messages": msgs, "tools": tools,
                                                                 "tool_choice": "required"})
            assert bad.status_code == 400 and "--engine builtin" in bad.json()["error"]["message"]
        finally:
            state.engine.stop()


def test_grpo_rollouts_through_vllm_push_the_policy_once_per_rollout(vllm, tmp_path):
    """GRPO with a LoRA policy and the vLLM engine: weights go to vLLM once per rollout (not per
    optimizer step), merged; afterwards vLLM's weights equal the merged policy's and its rollout
    log-probs equal the trainer's."""
    from test_grpo import bandit_prompts, rl_cfg, tiny_vocab_model

    from chatsmith.infer.vllm_engine import VllmEngine, vllm_weight_name
    from chatsmith.models.adapters import prepare_trainable
    from chatsmith.models.attention import enable_segment_attention
    from chatsmith.train.grpo import grpo_trainer
    from chatsmith.train.rl_batches import Episode
    from chatsmith.train.rollout import completion_logprobs

    cfg = rl_cfg(tmp_path, method="lora", lora_r=4, lora_alpha=8, lr=5e-2, max_steps=4, num_minibatches=2,
                 batch_size=2, group_size=4)
    policy = prepare_trainable(tiny_vocab_model(), cfg)
    assert enable_segment_attention(policy)   # the trainer's packed forward, as in `chatsmith grpo`
    engine = VllmEngine(policy, None, max_batch_size=16, max_sequence_tokens=cfg.max_length)
    assert engine.llm.kwargs["skip_tokenizer_init"]

    def score(episodes):
        for i, e in enumerate(episodes):
            e.reward = float(i % 3)
        return {}

    trainer, source = grpo_trainer(cfg, policy, None, engine, bandit_prompts(4), steps=cfg.max_steps, score=score,
                                   run=tmp_path, stop_ids=set())
    trainer.fit()
    assert source.rollouts == 2 and engine.weight_pushes == engine.llm.model.loads == 2   # 4 steps, 2 rollouts
    base = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ids = [p.ids for p in bandit_prompts(3)]
    after = engine.generate(ids, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=1), stop_ids=set())
    assert engine.weight_pushes == 3   # the last steps changed the weights: pushed before generating

    served = dict(engine.llm.model.hf.named_parameters())
    policy.merge_adapter()
    merged = {vllm_weight_name(n): p.detach().clone() for n, p in policy.named_parameters() if vllm_weight_name(n)}
    policy.unmerge_adapter()
    assert set(merged) == set(served)
    moved = 0.0
    for name, w in merged.items():   # (1e-6: merging again after the last unmerge rounds in float32)
        torch.testing.assert_close(served[name], w, rtol=0, atol=1e-6, msg=name)
        moved = max(moved, float((w - base[next(k for k in base if vllm_weight_name(k) == name)]).abs().max()))
    assert moved > 1e-3   # non-vacuous: the LoRA update is in the pushed weights
    for n, p in policy.named_parameters():   # merging for the push left the policy as it was
        torch.testing.assert_close(p, base[n], rtol=0, atol=1e-6)
    eps = [Episode(p, c.token_ids, c.logprobs, {}) for p, c in zip(ids, after)]
    trainer_lp, _ = completion_logprobs(trainer.unwrapped(), eps)
    for c, lp in zip(after, trainer_lp):
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(lp), atol=2e-4, rtol=1e-4)


def test_prepare_rl_builds_the_vllm_rollout_engine(vllm, tmp_path):
    from test_grpo import rl_cfg

    from chatsmith.train.rl import prepare_rl

    cfg = rl_cfg(tmp_path, model=MODEL, data=["builtin:arithmetic"], reward=["last_number"], max_length=96,
                 max_new_tokens=12, generation_batch_size=8, eval_prompts=4, rollout_engine="vllm")
    setup = prepare_rl(cfg, need_reference=False)
    kw = setup.engine.llm.kwargs
    assert type(setup.engine).__name__ == "VllmEngine" and setup.engine.slot_tokens == 96
    assert (kw["max_model_len"], kw["max_num_seqs"], kw["gpu_memory_utilization"]) == (96, 8, 0.3)
    ours = setup.evaluate(samples=4)
    assert ours["eval_prompts"] == 4 and setup.engine.weight_pushes == 1
    from chatsmith.eval.rewards import evaluate_rewards

    theirs = evaluate_rewards(Engine(setup.model, setup.tokenizer), setup.rewards, setup.held,
                              max_new_tokens=cfg.max_new_tokens, stop_ids=setup.stops, samples=4)
    assert ours == theirs
