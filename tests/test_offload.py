"""--max-memory (accelerate disk offload) and --load-in-8bit/--load-in-4bit for chat and serve, on a
seeded 4-layer Llama built here: budgets parse or fail naming the flag, layers really go to disk, greedy
answers equal the model loaded whole (engine, `chatsmith chat`, `chatsmith serve` over HTTP), and a budget
below what must stay in memory fails with the smallest one that works."""

from __future__ import annotations

import gc
import io
from pathlib import Path

import httpx
import pytest

from chatsmith.errors import ChatsmithError
from chatsmith.models.loading import (
    check_offload_room,
    format_size,
    load_model,
    parse_max_memory,
    plan_offload,
)

PROMPTS = ["Who are you?", "Name three colours."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> str:
    """A seeded 4-layer Llama (embedded tokenizer and template), saved as safetensors. A wide init
    (std 0.3) makes its greedy answers vary from token to token, so a wrong layer would show."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("offload") / "tiny4"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def budget(model_dir) -> str:
    """A --max-memory value that keeps the embeddings, the reserve for one layer and two more layers in
    memory, so the other two decoder layers and the final norm go to disk."""
    plan = plan_offload(model_dir, "1GiB")
    layer = plan.resident_bytes - _embedding_bytes(model_dir)
    return f"{plan.resident_bytes + 2 * layer + layer // 2}B"


def _embedding_bytes(model_dir: str) -> int:
    """Bytes of the (tied) fp32 embedding matrix."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return config.vocab_size * config.hidden_size * 4


@pytest.fixture(scope="module")
def reference(model_dir) -> list[str]:
    """Greedy answers of the model loaded whole, through `chatsmith chat --precision module`."""
    from chatsmith.chat import run_chat
    from chatsmith.infer.sampling import SamplingParams

    answers = []
    for prompt in PROMPTS:
        out = io.StringIO()
        assert run_chat(model_dir, prompt=prompt, system=None, params=SamplingParams(temperature=0, max_new_tokens=12),
                        precision="module", stdout=out) == 0
        answers.append(out.getvalue().strip())
    assert len(set(answers)) == 2 and all(len(a.split()) > 2 for a in answers), answers
    return answers


@pytest.mark.parametrize("text, expected", [
    ("2GiB", {"": 2 * 2**30}),
    ("500MB", {"": 500 * 10**6}),
    ("1.5gb", {"": 1_500_000_000}),
    ("0=20GiB,cpu=30GiB", {0: 20 * 2**30, "cpu": 30 * 2**30}),
    (" cpu = 512MiB ", {"cpu": 512 * 2**20}),
])
def test_budgets_parse(text, expected):
    assert parse_max_memory(text) == expected


@pytest.mark.parametrize("text, words", [
    ("2 gigs", "is not a size with a unit"),
    ("2", "is not a size with a unit"),
    ("0MB", "must be more than 0 bytes"),
    ("-1GB", "is not a size with a unit"),
    ("gpu=1GiB", "unknown device 'gpu'"),
    ("cpu=1GiB,cpu=2GiB", "given twice"),
    ("=1GiB", "is not DEVICE=SIZE"),
    ("cpu=lots", "'lots' is not a size"),
])
def test_bad_budgets_name_the_flag(text, words):
    with pytest.raises(ChatsmithError, match="--max-memory") as err:
        parse_max_memory(text)
    assert words in str(err.value)


def test_budget_for_a_missing_gpu_is_refused(model_dir):
    import torch

    missing = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ChatsmithError, match=f"names GPU {missing}, but this machine has {missing} CUDA GPU"):
        plan_offload(model_dir, f"{missing}=1GiB,cpu=1GiB")


def test_offload_puts_layers_on_disk_and_greedy_answers_are_unchanged(model_dir, budget):
    import torch

    from chatsmith.infer.engine import Engine
    from chatsmith.infer.runners import ModuleRunner
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.models.loading import offload_fast_path

    whole, tok = load_model(model_dir)
    model, _ = load_model(model_dir, max_memory=budget)
    device_map = model.hf_device_map
    assert device_map["model.embed_tokens"] == "cpu" and device_map["model.layers.0"] == "cpu"
    assert device_map["model.layers.3"] == "disk"
    assert sorted(set(device_map.values())) == ["cpu", "disk"]
    on_disk = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert any(n.startswith("model.layers.3.") for n in on_disk)
    assert not any(n.startswith("model.embed_tokens.") for n in on_disk)
    folder = Path(model.chatsmith_offload.offload_folder)
    assert folder.is_dir() and not any(folder.iterdir())   # safetensors are read in place: nothing written
    assert not offload_fast_path(model)

    params = SamplingParams(temperature=0, max_new_tokens=16)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for p in PROMPTS]
    expected = Engine(whole, tok, max_batch_size=2, precision="module").generate(prompts, params)
    engine = Engine(model, tok, max_batch_size=2, precision="module", fast_path=False)
    assert isinstance(engine.runner, ModuleRunner)
    got = engine.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert len(set(got[0].token_ids)) > 3
    torch.testing.assert_close(torch.tensor(got[0].logprobs), torch.tensor(expected[0].logprobs), atol=1e-4, rtol=0)
    del model, engine, got
    gc.collect()
    assert not folder.exists()   # the offload folder goes with the model


def test_budget_too_small_names_budget_size_and_smallest(model_dir):
    plan = plan_offload(model_dir, f"{_embedding_bytes(model_dir) * 10}B")
    assert plan.device_map == {"": "cpu"} and not plan.offloaded   # it all fits: no hooks, the fast path may run
    smallest = plan.resident_bytes
    assert plan_offload(model_dir, f"{smallest}B").device_map["model.embed_tokens"] == "cpu"   # exactly enough
    with pytest.raises(ChatsmithError) as err:
        plan_offload(model_dir, f"{smallest - 1}B")
    message = str(err.value)
    assert f"--max-memory {smallest - 1}B is too small even with disk offload" in message
    assert f"{format_size(plan.model_bytes)} of weights" in message
    assert f"smallest budget that works is {format_size(smallest)}" in message


def test_no_room_on_disk_for_resaved_weights(tmp_path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    check_offload_room(free // 2, tmp_path, free)
    with pytest.raises(ChatsmithError, match=f"must be written to {tmp_path} for disk offload") as err:
        check_offload_room(free + 2**30, tmp_path, free)
    assert format_size(free) in str(err.value)


def test_chat_cli_with_max_memory_answers_as_the_whole_model(model_dir, budget, reference, capsys):
    from chatsmith.cli import main

    assert main(["chat", model_dir, "--max-memory", budget, "--temperature", "0", "--max-new-tokens", "12",
                 "--prompt", PROMPTS[0]]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == reference[0]
    assert main(["chat", model_dir, "--max-memory", "1KB", "--prompt", "x"]) == 2
    assert "too small even with disk offload" in capsys.readouterr().err
    assert main(["chat", model_dir, "--max-memory", budget, "--precision", "int8", "--prompt", "x"]) == 2
    assert "--precision int8 does not combine with --max-memory" in capsys.readouterr().err
    assert main(["serve", model_dir, "--max-memory", "lots"]) == 2
    assert "--max-memory: 'lots' is not a size" in capsys.readouterr().err


def test_serve_with_max_memory_over_http(model_dir, budget, reference):
    from chatsmith.serve.app import ServerState, ServerThread, load_state

    state = ServerState("tiny4")
    with ServerThread(state) as url:
        load_state(state, model_dir, max_memory=budget, max_concurrency=2, kv_cache_mb=2, max_queue=4)
        assert state.load_error is None
        assert state.engine.precision == "module" and "disk" in state.engine.model.hf_device_map.values()
        assert type(state.engine.runner).__name__ == "ModuleRunner"   # the plain forward, through accelerate's hooks
        try:
            answers = [httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 12,
            }).json()["choices"][0]["message"]["content"] for p in PROMPTS]
        finally:
            state.engine.stop()
    assert [a.strip() for a in answers] == reference


def test_bitsandbytes_flags(model_dir, budget, capsys):
    import torch

    from chatsmith.cli import main

    assert main(["chat", model_dir, "--load-in-8bit", "--max-memory", budget, "--prompt", "x"]) == 2
    assert "--max-memory and --load-in-8bit do not combine" in capsys.readouterr().err
    if torch.cuda.is_available():   # a GPU machine: the flags load and answer
        assert main(["chat", model_dir, "--load-in-8bit", "--max-new-tokens", "4", "--prompt", "x"]) == 0
        assert main(["chat", model_dir, "--load-in-4bit", "--max-new-tokens", "4", "--prompt", "x"]) == 0
        return
    for command, flag in (("chat", "--load-in-8bit"), ("chat", "--load-in-4bit"), ("serve", "--load-in-4bit")):
        args = [command, model_dir, flag] + (["--prompt", "x"] if command == "chat" else [])
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{flag} needs a CUDA GPU: bitsandbytes' {flag[-4]}-bit kernels do not run" in err
