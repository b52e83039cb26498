"""Code infill over real HTTP: a tiny seeded Llama whose tokenizer has StarCoder's FIM tokens answers
`/v1/completions` with `suffix` and llama.cpp's `/infill` from the prefix-suffix-middle prompt; a
model without FIM tokens gets a 400 that says so."""

from __future__ import annotations

import copy

import httpx
import pytest

from chatsmith.serve.app import ServerState, ServerThread, load_state

PREFIX, SUFFIX = "def add(a, b):\n    c = ", "\n    return c\n"


@pytest.fixture(scope="module")
def fim_server(tmp_path_factory, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<fim_prefix>", "<fim_middle>", "<fim_suffix>"]})
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    path = tmp_path_factory.mktemp("fim") / "tiny-fim"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    state = ServerState("tiny-fim")
    with ServerThread(state) as url:
        load_state(state, str(path), precision="module", max_concurrency=2, kv_cache_mb=2, max_queue=4)
        assert state.load_error is None
        yield url, state
        state.engine.stop()


def test_suffix_and_infill_answer_from_the_fim_prompt(fim_server):
    url, state = fim_server
    tok = state.tokenizer
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]   # noqa: E731
    pre, suf, mid = tok.convert_tokens_to_ids(["<fim_prefix>", "<fim_suffix>", "<fim_middle>"])
    psm = [pre] + enc(PREFIX) + [suf] + enc(SUFFIX) + [mid]
    kw = {"max_tokens": 8, "temperature": 0}
    filled = httpx.post(f"{url}/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX, **kw}).json()
    same = httpx.post(f"{url}/v1/completions", json={"prompt": psm, **kw}).json()
    # the answer is the model's continuation of exactly the prefix-suffix-middle prompt
    assert filled["usage"]["prompt_tokens"] == len(psm) and filled["choices"][0]["text"] == same["choices"][0]["text"]
    r = httpx.post(f"{url}/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "a",
                                          "n_predict": 8, "temperature": 0}).json()
    started = httpx.post(f"{url}/v1/completions", json={"prompt": psm + enc("a"), **kw}).json()
    assert r["content"] == started["choices"][0]["text"] and r["tokens_evaluated"] == len(psm) + len(enc("a"))
    assert r["tokens_predicted"] == 8 and r["stop_type"] == "limit"
    bad = httpx.post(f"{url}/infill", json={"input_prefix": "x", "input_extra": [{"filename": "a.py", "text": "y"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input_extra"


def test_a_model_without_fim_tokens_refuses_suffix(tmp_path):
    state = ServerState("tiny-random-llama")
    with ServerThread(state) as url:
        load_state(state, "tiny-random-llama", precision="module", max_concurrency=1, kv_cache_mb=1, max_queue=2)
        for route, body, param in [("/v1/completions", {"prompt": PREFIX, "suffix": SUFFIX}, "suffix"),
                                   ("/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX}, "input_prefix")]:
            r = httpx.post(f"{url}{route}", json=body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == param and "no fill-in-the-middle tokens" in err["message"]
        state.engine.stop()
