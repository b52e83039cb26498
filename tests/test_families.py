"""Every base-model family of models/families.py, proven on a seeded tiny random model of each,
saved to a folder and loaded back through chatsmith (the code path a real checkpoint of that family
takes): the packed training loss equals a plain transformers forward on the same examples, greedy
generation through the engine equals transformers' `generate`, one LoRA SFT step and one DPO step
run through the commands, `export --to hf` writes a directory the server then answers from, freeze
and LoRA find each family's blocks and linear layers, and a base checkpoint without a chat template
gets its family's fallback with an exact loss mask. T5 is refused with a chatsmith error."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import run_cli, trained_segments

from chatsmith.data import Conversation, Message
from chatsmith.errors import ChatsmithError

HIDDEN = 32
# Large enough an initial spread that a wrong mask moves the loss by far more than float rounding
# (at transformers' default 0.02 attention is nearly uniform and cross-example leaks hide).
INIT = 0.3


def _configs(vocab: int, eos: int) -> dict:
    import transformers as T

    ids = dict(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, initializer_range=INIT)
    llama_like = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, **ids)
    return {
        "llama": lambda: T.LlamaConfig(**llama_like),
        # a sliding window shorter than the examples: the window must hold inside each packed span
        "mistral": lambda: T.MistralConfig(sliding_window=16, **llama_like),
        "qwen2": lambda: T.Qwen2Config(tie_word_embeddings=False, **llama_like),
        "gemma2": lambda: T.Gemma2Config(head_dim=8, sliding_window=16, **llama_like),
        "gemma3_text": lambda: T.Gemma3TextConfig(head_dim=8, sliding_window=16, **llama_like),
        "phi3": lambda: T.Phi3Config(**llama_like),
        "gpt2": lambda: T.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=512, **ids),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=512,
                                            tie_word_embeddings=False, **ids),
        "gptj": lambda: T.GPTJConfig(n_embd=HIDDEN, n_layer=2, n_head=4, rotary_dim=4, n_positions=512, **ids),
        "bloom": lambda: T.BloomConfig(hidden_size=HIDDEN, n_layer=2, n_head=4, **ids),
        "opt": lambda: T.OPTConfig(hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                   word_embed_proj_dim=HIDDEN, max_position_embeddings=512, **ids),
        "gpt_bigcode": lambda: T.GPTBigCodeConfig(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=512,
                                                  multi_query=True, **ids),
        "glm": lambda: T.GlmConfig(head_dim=8, **llama_like),
        "rwkv": lambda: T.RwkvConfig(hidden_size=HIDDEN, num_hidden_layers=2, attention_hidden_size=HIDDEN,
                                     intermediate_size=64, context_length=512, **ids),
    }


NAMES = list(_configs(1, 0))

CONVS = [
    Conversation([Message("user", "Hi there, who are you?"), Message("assistant", "I am a tiny model.")]),
    Conversation([Message("user", "2+2?"), Message("assistant", "4"), Message("user", "and 3+3?"),
                  Message("assistant", "six")]),
    Conversation([Message("system", "Be brief."), Message("user", "Say hello"), Message("assistant", "Hello!")]),
]


@pytest.fixture(scope="module")
def byte_tokenizer():
    """One token per byte, EOS <|endoftext|>, and no chat template (a base checkpoint's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, byte_tokenizer):
    """Each family as a saved folder (safetensors + tokenizer), as a downloaded checkpoint would be."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for name, make in _configs(len(byte_tokenizer), byte_tokenizer.eos_token_id).items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make())
        dirs[name] = root / name
        model.save_pretrained(dirs[name], safe_serialization=True)
        byte_tokenizer.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def loaded(family_dirs):
    """name -> (model, tokenizer) loaded by chatsmith from the folder."""
    from chatsmith.models import load_model

    return {name: load_model(str(d)) for name, d in family_dirs.items()}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-data")
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": m.role, "content": m.content} for m in c.messages]}) + "\n"
                           for c in CONVS))
    pairs = root / "pairs.json"
    pairs.write_text(json.dumps([{"prompt": "Say hello", "chosen": "Hello!", "rejected": "Go away."},
                                 {"prompt": "2+2?", "chosen": "4", "rejected": "5"}]))
    return sft, pairs


def test_the_table_covers_every_family_tested_here():
    from chatsmith.models.families import FAMILIES, family_of

    for name in NAMES:
        assert family_of(name) is not None, name
    assert {f.model_types[0] for f in FAMILIES} == set(NAMES) | {"t5"}   # every family is tested here
    for f in FAMILIES:
        assert f.packing in ("segment", "positions", "per-example", "padded")
        assert f.packing == "segment" or f.packing_reason, f"{f.name}: say why packing is {f.packing}"
        assert not f.int8 or f.model_types[0] in ("llama", "mistral", "qwen2")


@pytest.mark.parametrize("name", NAMES)
def test_packed_loss_equals_plain_forward(name, loaded):
    """The SFT loss on one packed row (chatsmith's render, collate and attention) equals the token
    mean over assistant tokens of a plain transformers forward of each example alone; the family's
    fallback template (none of these tokenizers has one) trains exactly the answers and EOS."""
    from chatsmith.data.packing import collate_packed
    from chatsmith.data.template import FALLBACK_TEMPLATES, render_conversation
    from chatsmith.models.attention import disable_segment_attention, enable_segment_attention
    from chatsmith.models.families import family_of
    from chatsmith.train.sft import sft_loss

    model, tok = loaded[name]
    assert tok.chat_template == FALLBACK_TEMPLATES[family_of(model).fallback_template][0]
    exs = [render_conversation(tok, c) for c in CONVS]
    lead = " " if family_of(model).fallback_template == "vicuna" else ""   # "ASSISTANT: answer"
    assert trained_segments(tok, exs[1]) == [f"{lead}4<|endoftext|>", f"{lead}six<|endoftext|>"]
    with torch.no_grad():
        total, n = 0.0, 0
        for ex in exs:
            ids = torch.tensor([ex.input_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            keep = torch.tensor(ex.loss_mask[1:], dtype=torch.bool)
            total += float(torch.nn.functional.cross_entropy(logits[keep], ids[0, 1:][keep], reduction="sum"))
            n += int(keep.sum())
        batch = collate_packed(exs)
        enable_segment_attention(model)
        try:
            loss, _ = sft_loss(model, batch)
        finally:
            disable_segment_attention(model)
    assert batch["n_targets"] == n
    assert float(loss) / n == pytest.approx(total / n, abs=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_engine_equals_generate(name, loaded):
    """Three prompts over two slots, prefilled in chunks: the engine's greedy tokens are transformers'."""
    from chatsmith.data.template import render_conversation
    from chatsmith.infer.engine import Engine
    from chatsmith.infer.sampling import SamplingParams

    model, tok = loaded[name]
    prompts = [render_conversation(tok, Conversation(c.messages[:-1]), add_generation_prompt=True).input_ids
               for c in CONVS]
    engine = Engine(model, tok, max_batch_size=2, prefill_chunk=8)
    got = [c.token_ids for c in engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6),
                                                stop_ids=[])]
    expected = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=6, do_sample=False, eos_token_id=None,
                               pad_token_id=tok.pad_token_id)[0, len(p):].tolist() for p in prompts]
    assert got == expected


@pytest.mark.parametrize("name", NAMES)
def test_freeze_and_lora_find_the_family_layers(name, loaded):
    """--method freeze trains the last block (and the final norm) only; LoRA's all-linear adapts every
    linear layer of the blocks and never the LM head or the embeddings, tied or untied; DoRA's
    magnitude vectors get gradients."""
    import copy

    from chatsmith.config import SFTConfig
    from chatsmith.models.adapters import prepare_trainable
    from chatsmith.models.families import final_norm, transformer_blocks

    model = copy.deepcopy(loaded[name][0])
    prepare_trainable(model, SFTConfig(method="freeze", freeze_trainable_layers=1))
    blocks = transformer_blocks(model)
    assert len(blocks) == 2
    assert all(p.requires_grad for p in blocks[1].parameters())
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert final_norm(model) is not None and all(p.requires_grad for p in final_norm(model).parameters())
    assert not model.get_input_embeddings().weight.requires_grad

    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(loaded[name][0])
    linear = {n for n, m in transformer_blocks(model).named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    peft_model = prepare_trainable(model, SFTConfig(method="lora"))
    adapted = {n for n, m in transformer_blocks(peft_model.get_base_model()).named_modules() if hasattr(m, "lora_A")}
    assert adapted == linear and linear
    assert not hasattr(peft_model.get_base_model().get_output_embeddings(), "lora_A")
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    dora = prepare_trainable(copy.deepcopy(loaded[name][0]), SFTConfig(method="dora"))
    dora.train()   # as the training loop runs it (RWKV in eval mode updates its state in place)
    dora(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    magnitudes = [p.grad for n, p in dora.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all(g is not None and torch.isfinite(g).all() for g in magnitudes)


@pytest.mark.parametrize("name", NAMES)
def test_one_lora_sft_step_and_one_dpo_step(name, loaded, data_files):
    """LoRA on the family, then one SFT step on a packed row (the loss falls) and one DPO step on the
    pairs packed with their shared prompt (the reference is the adapter switched off); the shared
    prompt copy gives the same log-probs as one copy per answer."""
    import copy

    from chatsmith.config import DPOConfig, SFTConfig
    from chatsmith.data.packing import collate_packed, collate_preferences
    from chatsmith.data.preference import encode_rankings, read_preferences
    from chatsmith.data.template import render_conversation
    from chatsmith.models.adapters import prepare_trainable
    from chatsmith.models.attention import enable_segment_attention
    from chatsmith.train.dpo import preference_loss, sequence_logps
    from chatsmith.train.sft import sft_loss

    model, tok = copy.deepcopy(loaded[name][0]), loaded[name][1]
    model = prepare_trainable(model, SFTConfig(method="lora", lora_dropout=0.0))
    share = enable_segment_attention(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = collate_packed([render_conversation(tok, c) for c in CONVS])
    before, _ = sft_loss(model, batch)
    (before / batch["n_targets"]).backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        after, _ = sft_loss(model, batch)
    assert float(after) < float(before)

    examples, _ = encode_rankings(tok, read_preferences(str(data_files[1])).records, None, 96)
    pairs = collate_preferences(examples, share_prefix=share)
    loss, metrics = preference_loss(model, pairs, DPOConfig(loss="dpo", beta=0.1))
    assert torch.isfinite(loss) and float(loss) != pytest.approx(2 * 0.6931, abs=1e-4)   # policy != reference
    loss.backward()
    opt.step()
    if share:
        with torch.no_grad():
            torch.testing.assert_close(sequence_logps(model, pairs),
                                       sequence_logps(model, collate_preferences(examples)), atol=1e-4, rtol=1e-5)


def test_sft_and_dpo_commands_on_a_family_that_runs_examples_one_by_one(family_dirs, data_files, tmp_path,
                                                                        monkeypatch, capsys):
    """`chatsmith sft` and `chatsmith dpo` (LoRA, one step each) on BLOOM, whose packed rows run
    example by example: the commands train, save and the saved model loads as a plain BLOOM."""
    from chatsmith.models import load_model

    sft, pairs = data_files
    common = ["--method", "lora", "--max-steps", "1", "--batch-size", "2", "--max-length", "160", "--eval-split", "0"]
    for stage, data in (("sft", sft), ("dpo", pairs)):
        run_cli([stage, "--model", family_dirs["bloom"], "--data", data, "--output", tmp_path / stage, *common],
                tmp_path, monkeypatch, capsys)
        assert json.loads((tmp_path / stage / "summary.json").read_text())["steps"] == 1
    model, _ = load_model(str(tmp_path / "dpo"))
    assert type(model).__name__ == "BloomForCausalLM" and "forward" not in model.__dict__


@pytest.mark.parametrize("name", NAMES)
def test_export_hf_then_serve(name, family_dirs, tmp_path, caplog):
    """`export --to hf` writes a folder that loads (its chat template now its own), and the server
    answers a chat completion from it, streamed and not; --precision int8 on a family without the
    int8 decode step falls back to the module path with a log line."""
    from fastapi.testclient import TestClient

    from chatsmith.export import export_model
    from chatsmith.models.families import family_of
    from chatsmith.serve.app import ServerState, create_app, load_state

    out = tmp_path / "hf"
    export_model(str(family_dirs[name]), "hf", out, verify=False, progress=False)
    assert json.loads((out / "tokenizer_config.json").read_text()).get("chat_template") or (
        out / "chat_template.jinja").is_file()
    state = ServerState(name)
    int8 = family_of(name).int8   # the int8 runner itself is tested in test_engine.py
    with caplog.at_level(logging.WARNING):
        load_state(state, str(out), precision="module" if int8 else "int8", max_concurrency=2, kv_cache_mb=None)
    assert state.load_error is None, state.load_error
    assert ("native quantized decode step covers Llama-family" in caplog.text) != int8
    try:
        with TestClient(create_app(state)) as client:
            body = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
            r = client.post("/v1/chat/completions", json={**body, "stream": True})
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    finally:
        state.engine.stop()


def test_gguf_export_says_which_families_it_writes(family_dirs, tmp_path):
    """Families llama.cpp runs but chatsmith's writer does not map get a clear error, not a broken file."""
    from chatsmith.export import export_model
    from chatsmith.models.families import FAMILIES

    for f in FAMILIES:
        if f.gguf or f.model_types[0] not in family_dirs:
            continue
        with pytest.raises(ChatsmithError, match="does not support .*convert_hf_to_gguf"):
            export_model(str(family_dirs[f.model_types[0]]), "gguf", tmp_path / "x.gguf", verify=False,
                         progress=False)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, byte_tokenizer):
    """A tiny seeded T5 saved to a folder (no chat template: it gets the T5 family's fallback)."""
    from transformers import T5Config, T5ForConditionalGeneration

    d = tmp_path_factory.mktemp("t5") / "t5"
    eos = byte_tokenizer.eos_token_id
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=len(byte_tokenizer), d_model=32, d_ff=64, num_layers=2,
                                        num_heads=4, d_kv=8, eos_token_id=eos, pad_token_id=eos,
                                        decoder_start_token_id=eos, initializer_factor=3.0)).save_pretrained(d)
    byte_tokenizer.save_pretrained(d)
    return d


def test_t5_loss_is_on_the_answer_and_the_engine_generates_as_transformers(t5_dir):
    """T5: each trained assistant turn is an example with the conversation before it in the encoder
    and the answer + EOS in the decoder; the padded batch's loss equals T5's own loss on each example
    alone, and the engine (streaming, batching, chunked prompts; int8 falls back with a log line)
    generates transformers' greedy tokens."""
    from chatsmith.data.template import render_conversation
    from chatsmith.infer.engine import Engine
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.models import load_model
    from chatsmith.models.seq2seq import collate_seq2seq, render_seq2seq, seq2seq_loss

    model, tok = load_model(str(t5_dir))
    assert type(model).__name__ == "T5ForConditionalGeneration"
    exs = render_seq2seq(tok, CONVS[1], None, 96)
    assert [tok.decode(e.labels) for e in exs] == ["4<|endoftext|>", "six<|endoftext|>"]
    assert tok.decode(exs[1].input_ids).endswith("and 3+3?\n\n### Response:\n")
    batch = collate_seq2seq(exs + render_seq2seq(tok, CONVS[0], None, 96), tok.pad_token_id,
                            model.config.decoder_start_token_id)
    with torch.no_grad():
        loss, _ = seq2seq_loss(model, batch)
        alone = sum(float(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss)
                    * len(e.labels) for e in exs + render_seq2seq(tok, CONVS[0], None, 96))
    assert float(loss) == pytest.approx(alone, rel=1e-5)

    prompts = [render_conversation(tok, Conversation(c.messages[:-1]), add_generation_prompt=True).input_ids
               for c in CONVS]
    engine = Engine(model, tok, max_batch_size=2, prefill_chunk=8, precision="int8")
    assert engine.precision == "module" and type(engine.runner).__name__ == "Seq2SeqRunner"
    got = [c.token_ids for c in engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6),
                                                stop_ids=[])]
    expected = [model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False,
                               eos_token_id=None)[0, 1:].tolist() for p in prompts]
    assert got == expected
    streamed = "".join(engine.stream(prompts[0], SamplingParams(temperature=0.0, max_new_tokens=6), stop_ids=[]))
    assert streamed == tok.decode(expected[0])


def test_t5_sft_then_serve_and_export(t5_dir, data_files, tmp_path, monkeypatch, capsys):
    """`chatsmith sft --method lora` on the T5 folder, then the server answers from the run (streamed
    and not) and `export --to hf` writes it; `chatsmith dpo` on T5 is a chatsmith error naming the
    model type (exit status 2, no traceback), and `export --to gguf` says it does not write T5."""
    from fastapi.testclient import TestClient

    from chatsmith.cli import main
    from chatsmith.export import export_model
    from chatsmith.serve.app import ServerState, create_app, load_state

    sft, pairs = data_files
    common = ["--max-steps", "1", "--batch-size", "2", "--max-length", "96", "--eval-split", "0"]
    run_cli(["sft", "--model", t5_dir, "--data", sft, "--method", "lora", "--output", tmp_path / "sft", *common],
            tmp_path, monkeypatch, capsys)
    assert json.loads((tmp_path / "sft" / "summary.json").read_text())["steps"] == 1
    state = ServerState("t5")
    load_state(state, str(tmp_path / "sft"), max_concurrency=2, kv_cache_mb=None)
    assert state.load_error is None, state.load_error
    try:
        with TestClient(create_app(state)) as client:
            body = {"model": "t5", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
            r = client.post("/v1/chat/completions", json={**body, "stream": True})
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    finally:
        state.engine.stop()
    export_model(str(tmp_path / "sft"), "hf", tmp_path / "hf", verify=False, progress=False)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    with pytest.raises(ChatsmithError, match="does not support T5ForConditionalGeneration"):
        export_model(str(t5_dir), "gguf", tmp_path / "t5.gguf", verify=False, progress=False)
    assert main(["dpo", "--model", str(t5_dir), "--data", str(pairs), "--method", "lora",
                 "--output", str(tmp_path / "dpo"), *common]) == 2
    err = capsys.readouterr().err
    assert "model_type 't5'" in err and "Traceback" not in err


@pytest.mark.parametrize("name", NAMES)
def test_reward_model_scores_packed_as_one_by_one(name, family_dirs, data_files):
    """`chatsmith rm`'s model (the backbone with a scalar head) on each family: the scores of a packed
    batch (answers sharing their prompt copy where the family allows) equal each answer scored alone.
    RWKV has no sequence-classification model in transformers: a chatsmith error says so."""
    from chatsmith.data.packing import collate_preferences
    from chatsmith.data.preference import encode_rankings, read_preferences
    from chatsmith.models.attention import enable_segment_attention
    from chatsmith.models.reward import load_backbone_with_head, sequence_scores

    if name == "rwkv":
        with pytest.raises(ChatsmithError, match="model_type 'rwkv'.*no sequence-classification"):
            load_backbone_with_head(str(family_dirs[name]))
        return
    torch.manual_seed(0)
    model, tok = load_backbone_with_head(str(family_dirs[name]))
    model.eval()
    examples, _ = encode_rankings(tok, read_preferences(str(data_files[1])).records, None, 96)
    with torch.no_grad():
        alone = torch.cat([sequence_scores(model, collate_preferences([ex])) for ex in examples
                           for ex in [type(ex)([a], [0.0]) for a in ex.answers]])
        share = enable_segment_attention(model)
        packed = sequence_scores(model, collate_preferences(examples, share_prefix=share))
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_rl_rollout_logprobs_match_the_trainers_packed_row(name, loaded):
    """PPO/GRPO on each family: the engine samples a group of two answers per prompt (seeded), and the
    trainer's packed row (completion_logprobs, the critic's hidden states included; and GRPO's row
    with each prompt once where the family allows) gives the engine's log-probs."""
    from chatsmith.data.prompts import Prompt
    from chatsmith.data.template import render_conversation
    from chatsmith.infer.engine import Engine
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.models.attention import disable_segment_attention, enable_segment_attention
    from chatsmith.train.losses import token_logprobs
    from chatsmith.train.rl_batches import RLBatchSpec, collate_episodes
    from chatsmith.train.rollout import completion_logprobs, generate_episodes

    model, tok = loaded[name]
    prompts = [Prompt(render_conversation(tok, Conversation(c.messages[:-1]), add_generation_prompt=True).input_ids,
                      c.messages[-2].content, {}) for c in CONVS[:2]]
    engine = Engine(model, tok, max_batch_size=4)
    episodes = generate_episodes(engine, prompts, group_size=2, stop_ids=set(),
                                 params=SamplingParams(temperature=1.0, max_new_tokens=5, seed=3))
    share = enable_segment_attention(model)
    try:
        lps, hidden = completion_logprobs(model, episodes, with_hidden=True)
        for e, lp, h in zip(episodes, lps, hidden):
            assert lp == pytest.approx(e.logprobs, abs=1e-4) and h.shape[0] == len(e.completion_ids)
        if share:
            for e in episodes:
                e.advantages = [0.0] * len(e.completion_ids)
            b = collate_episodes(episodes, RLBatchSpec(share_prompts=True))
            with torch.no_grad():
                out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False,
                            logits_to_keep=b["target_positions"], segment_bounds=b["segment_bounds"])
            assert token_logprobs(out.logits[0], b["targets"]).tolist() == pytest.approx(
                [x for lp in lps for x in lp], abs=1e-4)
    finally:
        disable_segment_attention(model)
