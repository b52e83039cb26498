"""`chatsmith serve` as the model endpoint of EleutherAI's lm-evaluation-harness (issue 12), and the
prompt log-probs behind it.

- The engine's prompt log-probs (OpenAI's `echo` with `logprobs`) equal a transformers forward pass,
  across prefill chunks, with prefix sharing, through the generic runner too, and in int8 within
  its quantization error.
- Over HTTP: `echo` + `logprobs` (+ `max_tokens: 0`) gives the prompt tokens' log-probs (the first
  null) then the generated ones, which are unchanged by the echo.
- The real harness, offline, with a local task: a multiple-choice task through `local-completions`
  (token-id batches and the remote tokenizer, then text prompts and a local HF tokenizer), whose
  per-choice log-likelihoods and accuracy must equal what a transformers forward of the same model
  gives; and a generation task through `local-chat-completions`, whose exact-match must equal the
  one computed from transformers' greedy `generate`.

The model is a tiny random Llama built here (seeded, untied embeddings, a wider initialisation than
the default so that choices and greedy tokens are separated by clear margins, not float noise).
"""

from __future__ import annotations

import json
import os

import httpx
import pytest

from chatsmith.serve.app import ServerState, ServerThread, load_state

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
NAME = "tiny-eval-llama"

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Rome", "Berlin"]),
    ("Which animal barks?", ["dog", "cat", "cow", "fish"]),
    ("How many legs does a spider have?", ["eight", "six", "four", "ten"]),
    ("What colour is the sky?", ["blue", "green", "red", "yellow"]),
    ("Which planet is largest?", ["Jupiter", "Mars", "Venus", "Earth"]),
    ("What do bees make?", ["honey", "milk", "silk", "wax"]),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A seeded 2-layer Llama with the embedded tokenizer and its chat template, saved as an HF directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from chatsmith.models.loading import tiny_random_dir

    tok = AutoTokenizer.from_pretrained(str(tiny_random_dir()))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, initializer_range=0.1, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("model") / NAME
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf(model_dir):
    """The same model through transformers alone: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    """`chatsmith serve` of the model in its own fp32 weights (`--precision module`), so that its
    numbers are a transformers forward's up to float rounding."""
    state = ServerState(NAME)
    with ServerThread(state) as url:
        load_state(state, str(model_dir), precision="module", max_concurrency=4, kv_cache_mb=8)
        assert state.load_error is None, state.load_error
        yield url, state
        state.engine.stop()


def _hf_logprobs(model, ids: list[int]):
    """log p(ids[i] | ids[:i]) for i >= 1 from one transformers forward [len(ids) - 1], and the
    log-softmax rows [len(ids), V]."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logp


# ---- prompt log-probs in the engine ------------------------------------------------------------------------


# int8 (the serving default on a CPU) is within its quantization error of fp32 (0.11 at most here, on
# log-probs that vary by several nats from token to token: a misaligned row would be off by nats).
@pytest.mark.parametrize("precision,atol,fast", [("module", 1e-4, True), ("int8", 0.25, True),
                                                ("module", 1e-4, False)], ids=["module", "int8", "generic-runner"])
def test_engine_prompt_logprobs_equal_a_transformers_forward(hf, precision, atol, fast):
    """Prefill in chunks of 5 (so the log-probs cross chunk borders), two choices of one prompt (the
    second takes the first's KV cache and log-probs: prefix sharing) and a score-only request. (Rows
    decoded in one batch may differ from one row alone in the last bits in fp32, see infer/runners.py,
    so generation with and without scoring is compared one row at a time.)"""
    import torch

    from chatsmith.infer.engine import Engine
    from chatsmith.infer.sampling import SamplingParams

    model, tok = hf
    ids = tok("The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun.")["input_ids"]
    assert len(ids) > 12
    expected, logp = _hf_logprobs(model, ids)
    engine = Engine(model, tok, precision=precision, prefill_chunk=5, max_batch_size=4, kv_cache_mb=4,
                    fast_path=fast)
    a, = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=3, prompt_logprobs=3))
    plain, = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=3))
    b, c = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=3, prompt_logprobs=3, n=2))
    scored, = engine.generate([ids], SamplingParams(max_new_tokens=0, prompt_logprobs=0))

    assert a.prompt_logprobs[0] is None and a.prompt_top_logprobs[0] == [] and len(a.prompt_logprobs) == len(ids)
    torch.testing.assert_close(torch.tensor(a.prompt_logprobs[1:]), expected, atol=atol, rtol=0)
    for i in range(1, len(ids)):   # the top 3 at each position: transformers' top 3 (module: same order)
        top_ids = [t for t, _ in a.prompt_top_logprobs[i]]
        ref = logp[i - 1].topk(3)
        torch.testing.assert_close(torch.tensor([v for _, v in a.prompt_top_logprobs[i]]), ref.values, atol=atol,
                                   rtol=0)
        if precision == "module":
            assert top_ids == ref.indices.tolist()
    assert engine.stats.get("shared_prompt_tokens", 0) >= (len(ids) if fast else 0)   # the generic runner cannot share
    for x in (b, c):
        assert x.prompt_logprobs == a.prompt_logprobs and x.prompt_top_logprobs == a.prompt_top_logprobs
    # Scoring changes nothing that is generated; a score-only request generates nothing.
    # (Same tokens; their log-probs may differ in the last bits: scoring asks the generic runner for
    # logits at every prompt position, a matmul of another shape, whose fp32 rounding can differ.)
    assert a.token_ids == plain.token_ids
    torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(plain.logprobs), atol=1e-5, rtol=0)
    assert scored.token_ids == [] and scored.finish_reason == "length"
    assert scored.prompt_logprobs == a.prompt_logprobs and scored.prompt_top_logprobs == [[]] * len(ids)


# ---- echo over HTTP --------------------------------------------------------------------------------------


def test_echo_logprobs_over_http_equal_a_transformers_forward(server, hf):
    url, state = server
    model, tok = hf
    ids = tok("Once upon a time, in a land far away, there lived a small dragon.")["input_ids"]
    body = {"model": NAME, "prompt": ids, "temperature": 0, "max_tokens": 3}
    plain = httpx.post(f"{url}/v1/completions", json={**body, "logprobs": 2}, timeout=60).json()["choices"][0]
    echoed = httpx.post(f"{url}/v1/completions", json={**body, "logprobs": 2, "echo": True}, timeout=60).json()
    choice = echoed["choices"][0]
    lp = choice["logprobs"]
    generated = plain["logprobs"]
    n = len(ids)
    expected, logp = _hf_logprobs(model, ids)

    # The prompt first: its tokens' text, the first log-prob and alternatives null, then transformers' numbers.
    assert lp["tokens"][:n] == [tok.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:n], expected.tolist())) < 1e-4
    for i in range(1, n):
        ref = logp[i - 1].topk(2)
        got = lp["top_logprobs"][i]
        assert list(got) == [tok.decode([t]) for t in ref.indices.tolist()]
        assert max(abs(a - b) for a, b in zip(got.values(), ref.values.tolist())) < 1e-4
    # Then the generated tokens, exactly as without echo; the text is the prompt's then the answer's.
    assert lp["tokens"][n:] == generated["tokens"] and lp["token_logprobs"][n:] == generated["token_logprobs"]
    assert lp["top_logprobs"][n:] == generated["top_logprobs"]
    assert choice["text"] == tok.decode(ids) + plain["text"]
    assert lp["text_offset"][n] == len(tok.decode(ids)) and lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
    # A scored prompt is prefilled whole: nothing comes from the prefix cache.
    assert echoed["usage"] == {"prompt_tokens": n, "completion_tokens": 3, "total_tokens": n + 3,
                               "prompt_tokens_details": {"cached_tokens": 0}}

    # max_tokens 0: the prompt scored, nothing generated (what lm-eval's loglikelihood needs, minus one token).
    only = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 0, "logprobs": 2, "echo": True},
                      timeout=60).json()
    c = only["choices"][0]
    assert c["text"] == tok.decode(ids) and c["finish_reason"] == "length"
    assert c["logprobs"]["token_logprobs"] == lp["token_logprobs"][:n] and c["logprobs"]["tokens"] == lp["tokens"][:n]
    assert only["usage"]["completion_tokens"] == 0
    # A text prompt is echoed as sent and scored as its tokens.
    text = "Once upon a time, in a land far away"
    t = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": text, "max_tokens": 0, "echo": True,
                                                    "logprobs": 0}, timeout=60).json()["choices"][0]
    ref, _ = _hf_logprobs(model, tok(text)["input_ids"])
    assert t["text"] == text and t["logprobs"]["top_logprobs"] is None
    assert max(abs(a - b) for a, b in zip(t["logprobs"]["token_logprobs"][1:], ref.tolist())) < 1e-4


# ---- the harness ------------------------------------------------------------------------------------------


def _task(tmp_path, name: str, rows: list[dict], config: str) -> None:
    """A local task: rows as JSON lines and a YAML reading them through the datasets `json` builder."""
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {tmp_path / 'datasets'}\ntest_split: test\n" + config)


def _evaluate(tmp_path, task: str, model: str, model_args: dict, **kw) -> dict:
    """lm_eval.simple_evaluate on the local task (only the tasks in tmp_path are indexed: indexing
    the harness's thousands of built-in YAML files took 10 s a run), per-sample results logged. The
    harness seeds Python's, numpy's and torch's global generators; they are restored afterwards so
    that the tests run after this one see what they would have seen without it."""
    import random

    import lm_eval
    import numpy as np
    import torch
    from lm_eval.tasks import TaskManager

    saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], log_samples=True,
                                       task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                       bootstrap_iters=0, **kw)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])


def _choice_loglikelihoods(model, tok, context: str, choices: list[str]) -> list[float]:
    """log p(" " + choice | context) from one transformers forward per choice, the continuation's
    tokens split off the whole string's tokens as the harness does (TemplateLM._encode_pair)."""
    out = []
    for choice in choices:
        whole = tok(context + " " + choice)["input_ids"]
        n_context = len(tok(context)["input_ids"])
        lps, _ = _hf_logprobs(model, whole)
        out.append(float(lps[n_context - 1:].sum()))
    return out


def test_harness_multiple_choice_through_local_completions(server, hf, tmp_path, model_dir):
    """Log-likelihood scoring with `echo` and `logprobs`: every choice's log-likelihood and the
    accuracy equal transformers' on the same model. Gold is the model's own best choice, which is
    not always the first, so a server whose scores were all equal (the harness then picks the first
    choice, the bug of issue 12) or misaligned would lose accuracy."""
    import numpy as np

    url, _ = server
    model, tok = hf
    rows, expected = [], []
    for question, choices in QUESTIONS:
        context = f"Question: {question}\nAnswer:"
        lls = _choice_loglikelihoods(model, tok, context, choices)
        ranked = sorted(lls)
        assert ranked[-1] - ranked[-2] > 1e-3   # a clear winner: float rounding cannot change it
        rows.append({"question": context, "choices": choices, "label": int(np.argmax(lls))})
        expected.append(lls)
    assert len({r["label"] for r in rows}) > 1 and any(r["label"] != 0 for r in rows)
    _task(tmp_path, "chatsmith_mc", rows, "output_type: multiple_choice\ndoc_to_text: question\n"
          "doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")

    runs = {
        # The harness's defaults: token-id prompts in batches (a list of lists), tokenized through the
        # server (it finds /tokenizer_info, so tokenizer_backend "auto" becomes "remote").
        "token ids, remote tokenizer, batches of 5": (
            {"model": NAME, "base_url": f"{url}/v1/completions", "max_retries": 1}, 5),
        # Text prompts, one per request, tokenized by a local Hugging Face tokenizer.
        "text prompts, local tokenizer": (
            {"model": NAME, "base_url": f"{url}/v1/completions", "tokenized_requests": False,
             "tokenizer_backend": "huggingface", "tokenizer": str(model_dir), "max_retries": 1}, 1),
    }
    for what, (args, batch) in runs.items():
        out = _evaluate(tmp_path, "chatsmith_mc", "local-completions", args, batch_size=batch)
        samples = sorted(out["samples"]["chatsmith_mc"], key=lambda s: s["doc_id"])
        got = [[float(r[0][0]) for r in s["resps"]] for s in samples]
        assert np.allclose(got, expected, atol=1e-3), (what, got, expected)
        assert out["results"]["chatsmith_mc"]["acc,none"] == 1.0, what


def test_harness_generation_through_local_chat_completions(server, hf, tmp_path):
    """Greedy answers through the chat route: exact match is 1 on the docs whose target is
    transformers' greedy answer to the chat-rendered question and 0 on the others."""
    import torch

    url, _ = server
    model, tok = hf
    max_tokens, stop = 6, "Question:"
    rows, answers = [], []
    for i, (question, _) in enumerate(QUESTIONS[:4]):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
        answer = tok.decode(out[0, len(ids):], skip_special_tokens=True).split(stop)[0]
        answers.append(answer)
        rows.append({"question": question, "answer": answer if i % 2 == 0 else answer + " (not it)"})
    assert len(set(answers)) == len(answers)   # distinct answers: a mix-up between docs would show
    _task(tmp_path, "chatsmith_gen", rows, "output_type: generate_until\ndoc_to_text: question\n"
          f"doc_to_target: answer\ngeneration_kwargs:\n  until: ['{stop}']\n  max_gen_toks: {max_tokens}\n"
          "  do_sample: false\n  temperature: 0\nmetric_list:\n  - metric: exact_match\n")
    out = _evaluate(tmp_path, "chatsmith_gen", "local-chat-completions",
                    {"model": NAME, "base_url": f"{url}/v1/chat/completions", "max_retries": 1},
                    apply_chat_template=True)
    samples = sorted(out["samples"]["chatsmith_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == answers
    assert out["results"]["chatsmith_gen"]["exact_match,none"] == 0.5
