"""`chatsmith plan`: parameter counts against chatsmith's own preparation of real models (peft for
adapters), the meta-device activation probe against a real forward, sharding, advice, speed and the
command line, and the whole estimate against the measured peak RSS of real runs of the embedded model
(benchmarks/plan_memory.py's code, each run in its own process)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from chatsmith.errors import ChatsmithError
from chatsmith.planner import (
    activation_bytes,
    estimate,
    micro_batch_segments,
    micro_batch_tokens,
    model_shape,
    read_config,
    trainable_params,
)


def _configs():
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    return {
        "llama": LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        "qwen2": Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        "gpt2": GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    }


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", ["full", "freeze", "lora", "dora"])
def test_trainable_counts_equal_chatsmiths_own_preparation(kind, method):
    """The meta-device count equals what chatsmith's prepare_trainable (peft for adapters) trains."""
    from transformers import AutoModelForCausalLM

    from chatsmith.models.adapters import prepare_trainable, trainable_parameters

    config = _configs()[kind]
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(config)
    shape = model_shape(config)
    assert shape.params == sum(p.numel() for p in real.parameters())
    cfg = SimpleNamespace(method=method, freeze_trainable_layers=1, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                          lora_targets="all-linear", gradient_checkpointing=False)
    prepared = prepare_trainable(real, cfg)
    planned = trainable_params(shape_model(config), method, lora_r=4, freeze_layers=1)
    assert planned == trainable_parameters(prepared)[0]


def shape_model(config):
    from chatsmith.planner import _meta_model

    return _meta_model(config)


@pytest.mark.parametrize("method,layout", [("full", "one"), ("lora", "one"), ("lora", "dpo"), ("full", "grpo")])
def test_meta_probe_equals_a_real_forward(method, layout):
    """The activations the probe counts on the meta device are the bytes autograd keeps in a real
    forward of the same model on this CPU (saved tensors, parameters excluded), fused attention; for
    DPO and GRPO rows the answers continue one shared copy of their prompt (masked attention)."""
    from transformers import AutoModelForCausalLM

    from chatsmith.models.adapters import prepare_trainable
    from chatsmith.models.attention import enable_segment_attention
    from chatsmith.train.losses import token_logprobs

    config = _configs()["llama"]
    if layout == "one":
        tokens, trained, bounds = 96, 40, [(0, 96)]
    else:
        shape = dict(seq_len=40, batch=2, group_size=3, max_new_tokens=12)
        tokens, trained = micro_batch_tokens(layout, **shape)
        bounds = micro_batch_segments(layout, **shape)
    positions = torch.cat([torch.arange(b[3] - b[2] if len(b) == 4 else 0, b[1] - b[0] + (b[3] - b[2] if len(b) == 4
                                        else 0)) for b in bounds])
    assert bounds[-1][1] == tokens == len(positions)
    selected = layout != "one"   # dpo and grpo read log-probs through token_logprobs
    probe, per_block = activation_bytes(shape_model(config), tokens, method=method, trained_tokens=trained, lora_r=4,
                                        segments=bounds, selected_logprobs=selected)
    torch.manual_seed(0)
    real = prepare_trainable(AutoModelForCausalLM.from_config(config),
                             SimpleNamespace(method=method, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                             lora_targets="all-linear", gradient_checkpointing=False))
    enable_segment_attention(real)
    params = {id(p) for p in real.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            kept[id(base)] = base.numel() * base.element_size()
        return t

    ids = torch.randint(0, 320, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = real(input_ids=ids, position_ids=positions[None], use_cache=False,
                   segment_bounds=bounds, logits_to_keep=torch.arange(tokens - trained, tokens))
        logits = out.logits[0]
        if selected:
            token_logprobs(logits, torch.randint(0, 320, (trained,)))
        else:
            torch.log_softmax(logits.float(), -1)
    measured = sum(kept.values())
    assert measured > 0 and abs(probe - measured) / measured < 0.02, (probe, measured)
    assert 0 < per_block * config.num_hidden_layers < probe


def test_micro_batch_tokens_follow_the_collators():
    assert micro_batch_tokens("sft", seq_len=100, batch=3) == (300, 150)
    assert micro_batch_tokens("dpo", seq_len=100, batch=2) == (2 * 150, 2 * 100)     # the prompt is in the row once
    assert micro_batch_tokens("grpo", seq_len=40, batch=2, group_size=4, max_new_tokens=10) == (2 * 80, 80)
    assert micro_batch_segments("sft", seq_len=100, batch=2) == [(0, 100), (100, 200)]
    assert micro_batch_segments("dpo", seq_len=100, batch=1) == [(0, 50), (50, 100, 0, 50), (100, 150, 0, 50)]
    assert micro_batch_segments("grpo", seq_len=40, batch=1, group_size=2, max_new_tokens=10) == [
        (0, 40), (40, 50, 0, 40), (50, 60, 0, 40)]


def test_dpo_collator_builds_the_planned_segments():
    """collate_preferences with a shared prompt gives the row micro_batch_segments plans."""
    from chatsmith.data.packing import collate_preferences
    from chatsmith.data.preference import PreferenceExample
    from chatsmith.data.template import Rendered

    prompt, answer = [1] * 50, 50
    answers = [Rendered(prompt + [k] * answer, [0] * 50 + [1] * answer) for k in (2, 3)]
    batch = collate_preferences([PreferenceExample(answers, [1.0, 0.0])], share_prefix=True)
    assert batch["segment_bounds"] == micro_batch_segments("dpo", seq_len=100, batch=1)


def test_sharding_advice_and_speed():
    """ZeRO-3 divides weights, gradients and optimizer by the GPU count; ZeRO-2 only the last two; a plan
    that does not fit says what to change; the speed estimate follows FLOP/s and bandwidth."""
    from transformers import LlamaConfig

    big = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)   # Llama-3-8B's shape
    one = estimate("llama-8b", method="full", gpu="A100-40GB", seq_len=512, batch=1, config=big)
    assert 7.9e9 < one.components["weights"] / 2 < 8.1e9          # 8.0B parameters in bf16
    assert not one.fits and any("lora" in a for a in one.advice) and any("zero3" in a or "fsdp" in a
                                                                          for a in one.advice)
    z3 = estimate("llama-8b", method="full", gpu="A100-40GB", seq_len=512, batch=1, gpus=8, strategy="zero3", config=big)
    z2 = estimate("llama-8b", method="full", gpu="A100-40GB", seq_len=512, batch=1, gpus=8, strategy="zero2", config=big)
    assert z3.components["weights"] == pytest.approx(one.components["weights"] / 8)
    assert z2.components["weights"] == one.components["weights"]
    assert z2.components["optimizer"] == pytest.approx(one.components["optimizer"] / 8)
    assert z3.fits and z3.total < z2.total < one.total
    lora = estimate("llama-8b", method="lora", gpu="T4", seq_len=512, batch=1, config=big)
    qlora = estimate("llama-8b", method="qlora", gpu="T4", seq_len=512, batch=1, config=big)
    assert qlora.components["weights"] < lora.components["weights"] / 2.5   # embeddings and norms stay bf16
    assert qlora.fits and not lora.fits and any("qlora" in a for a in lora.advice)
    h100 = estimate("llama-8b", method="lora", gpu="H100-80GB", seq_len=512, batch=1, config=big)
    assert h100.decode_tokens_per_s / lora.decode_tokens_per_s == pytest.approx(3350 / 320)
    assert h100.train_tokens_per_s == pytest.approx(0.4 * 989e12 / (4 * one.components["weights"] / 2))
    ckpt = estimate("llama-8b", method="lora", gpu="H100-80GB", seq_len=512, batch=1, config=big,
                    gradient_checkpointing=True)
    assert ckpt.components["activations"] < h100.components["activations"] / 3


def test_errors_name_the_choices():
    with pytest.raises(ChatsmithError, match="qlora needs a CUDA GPU"):
        estimate("x", method="qlora", config=_configs()["llama"])
    with pytest.raises(ChatsmithError, match="choose from"):
        estimate("x", stage="pretrain", config=_configs()["llama"])


def test_gguf_config_is_read_without_weights():
    from chatsmith.models.registry import embedded_gguf_path
    from chatsmith.planner import _gguf_config

    c = _gguf_config(embedded_gguf_path())
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("llama", 30, 576, 49152)
    assert read_config("smollm2-135m").hidden_size == 576


def test_cli_plan_json(capsys):
    from chatsmith.cli import main

    assert main(["plan", "--model", "tiny-random-llama", "--method", "full", "--seq-len", "64", "--batch", "2",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["device"] == "CPU" and plan["fits"] and plan["components"]["optimizer"] == 2 * plan["components"]["gradients"]


@pytest.mark.slow
def test_estimate_within_20_percent_of_real_runs():
    """sft lora, sft full, dpo lora and grpo lora of the embedded model, each a real chatsmith run (one
    optimizer step, model saved) in its own process forked after the imports: the estimate against the
    run's peak RSS over its post-import baseline, within the issue's 20%. Measured in three runs here:
    sft lora 0.91-0.93, sft full 0.94-0.95, dpo lora 0.89-0.90, grpo lora 0.89-0.90 (docs/plan.md).
    Small shapes keep it inside the test budget; the weights dominate there, so it checks the weights,
    the adapter, gradients, optimizer state and the activations' order of magnitude. Later steps of a
    run peak 10-15% higher than the first (glibc keeps freed heap blocks resident; docs/plan.md)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_memory.py"
    spec = importlib.util.spec_from_file_location("plan_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.compare(list(bench.CASES), seq_len=96, batch=1, steps=1, group_size=2, max_new_tokens=8, workers=2)
    ratios = {r["case"]: round(r["ratio"], 3) for r in rows}
    print("estimate / measured:", ratios)
    assert set(ratios) == {"sft-lora", "sft-full", "dpo-lora", "grpo-lora"}
    assert all(0.8 <= r <= 1.2 for r in ratios.values()), ratios
    full = next(r for r in rows if r["case"] == "sft-full")
    lora = next(r for r in rows if r["case"] == "sft-lora")
    assert full["measured_gib"] > lora["measured_gib"] + 1.0   # AdamW's two fp32 moments and the gradients are real
