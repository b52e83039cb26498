"""chatsmith vocab extend|prune on a code corpus (Python's own standard library, real text that ships
with every interpreter): round trips of text, fewer tokens on held-out code after extension, pruned
logits equal to the original's restricted to the kept tokens, new rows trained by LoRA, and the
extended model through GGUF export and llama.cpp."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import run_cli, shared_file

from chatsmith.export import export_model
from chatsmith.export.llamacpp import LlamaCpp
from chatsmith.export.verify import VERIFY_TEXT
from chatsmith.models import load_model

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """The first 40 modules of the standard library (about 1.2 MB of Python); `extend` learns from the
    first 34 and measures on the last 6 (--heldout 0.15), code it never saw."""
    files = sorted(str(p) for p in STDLIB.glob("*.py"))[:40]
    assert len(files) == 40
    return files


@pytest.fixture(scope="module")
def extended(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vocab") / "ext"
    from chatsmith.cli import main

    assert main(["vocab", "extend", "--model", "tiny-random-llama", "--corpus", *corpus, "--add", "500",
                 "--output", str(out), "--heldout", "0.15"]) == 0
    return out


def test_extend_learns_tokens_that_shorten_heldout_code(extended, corpus):
    meta = json.loads((extended / "chatsmith_vocab.json").read_text())
    base, base_tok = load_model("tiny-random-llama", dtype=torch.float32)
    model, tok = load_model(str(extended), dtype=torch.float32)
    ids = meta["new_token_ids"]
    assert len(ids) == 500 and len(tok) == len(base_tok) + 500 and model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.chatsmith_new_token_ids == ids   # what `chatsmith sft` trains under LoRA
    texts = [Path(f).read_text() for f in corpus[34:]]
    before = sum(len(base_tok.encode(t, add_special_tokens=False)) for t in texts)
    after = sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)
    assert meta["stats"]["heldout_tokens_before"] == before and meta["stats"]["heldout_tokens_after"] == after
    # SmolLM2's vocabulary already knows Python well: the gain on unseen modules is real but small
    # (measured 1.2% with 1000 tokens from 60 modules; a language the tokenizer was not trained on gains far more)
    assert after < before, (before, after)
    heldout = texts[-1]
    # every text still decodes to itself: code, prose in other scripts, digits, whitespace
    for text in (heldout, VERIFY_TEXT, "x = [1, 22, 333]\n\tif a  and b:\n\t\treturn None  # 🦙"):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # a new token starts at the mean of the rows of the tokens it replaces
    t = tok.convert_ids_to_tokens(ids[0])
    parts = base_tok.convert_tokens_to_ids([p.value for p in base_tok.backend_tokenizer.model.tokenize(t)])
    emb, old = model.get_input_embeddings().weight, base.get_input_embeddings().weight
    torch.testing.assert_close(emb[ids[0]], old[parts].mean(0))
    torch.testing.assert_close(emb[: len(base_tok)], old)   # old rows untouched
    # no learned token joins a digit to anything: this tokenizer (SmolLM2's) splits digits one by one
    assert not any(any(c.isdigit() for c in tok.convert_ids_to_tokens(i)) for i in ids)


def test_extended_model_trains_its_new_rows_under_lora(extended, corpus, tmp_path, monkeypatch, capsys):
    code = "\n\n".join(Path(f).read_text() for f in corpus[:8]).split("\n\n")
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Write some Python."},
                                                     {"role": "assistant", "content": c}]}) + "\n"
                            for c in code[:40] if c.strip()))
    run_cli(["sft", "--model", extended, "--data", data, "--method", "lora", "--lora-r", "4", "--max-steps", "3",
             "--lr", "0.05", "--max-length", "128", "--output", tmp_path / "run"], tmp_path, monkeypatch, capsys)
    ids = json.loads((extended / "chatsmith_vocab.json").read_text())["new_token_ids"]
    before, _ = load_model(str(extended), dtype=torch.float32)
    after, _ = load_model(str(tmp_path / "run"), dtype=torch.float32)
    w0, w1 = before.get_input_embeddings().weight, after.get_input_embeddings().weight
    changed = (w1[ids] - w0[ids]).abs().sum(-1) > 0
    assert changed.any()   # the new rows the data used moved
    old = [i for i in range(len(w0)) if i not in set(ids)]
    torch.testing.assert_close(w1[old], w0[old])   # old rows stay frozen under LoRA


def test_extended_model_survives_gguf_export_and_llamacpp(extended, corpus, tmp_path):
    result = export_model(str(extended), "gguf", tmp_path / "ext.gguf", quant="f32")
    assert result.verify["problems"] == [] and result.verify["checks"]["tokenizer"]["equal"]
    _, tok = load_model(str(extended))
    heldout = Path(corpus[-1]).read_text()[:4000]
    with LlamaCpp(tmp_path / "ext.gguf") as lc:   # llama.cpp applies the new merges as transformers does
        assert lc.tokenize(heldout) == tok.encode(heldout, add_special_tokens=False)


def test_prune_keeps_logits_and_round_trips(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pruned"
    run_cli(["vocab", "prune", "--model", "tiny-random-llama", "--corpus", *corpus[:2], "--output", out],
            tmp_path, monkeypatch, capsys)
    meta = json.loads((out / "chatsmith_vocab.json").read_text())
    keep = meta["kept_old_ids"]
    base, base_tok = load_model("tiny-random-llama", dtype=torch.float32)
    model, tok = load_model(str(out), dtype=torch.float32)
    assert len(tok) == len(keep) < len(base_tok) // 5   # measured: 49152 -> ~3500
    text = Path(corpus[0]).read_text()[:6000]
    old_ids, new_ids = base_tok.encode(text, add_special_tokens=False), tok.encode(text, add_special_tokens=False)
    assert [keep[i] for i in new_ids] == old_ids   # the same tokens, renumbered
    with torch.no_grad():
        want = base(torch.tensor([old_ids[:256]])).logits[0][:, keep]
        got = model(torch.tensor([new_ids[:256]])).logits[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for t in (text, VERIFY_TEXT):   # text the corpus never had still encodes (byte symbols) and decodes back
        assert tok.decode(tok.encode(t, add_special_tokens=False)) == t
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_start|>") == keep.index(1)


def test_prune_to_a_chat_dataset(tmp_path, monkeypatch, capsys):
    """A chat dataset is a corpus too (every message's text): cut to what 50 Alpaca records use, the
    tokenizer still gives their text the original's tokens."""
    data = shared_file("alpaca_50.json")
    run_cli(["vocab", "prune", "--model", "tiny-random-llama", "--corpus", data, "--output", tmp_path / "p"], tmp_path,
            monkeypatch, capsys)
    keep = json.loads((tmp_path / "p" / "chatsmith_vocab.json").read_text())["kept_old_ids"]
    _, base_tok = load_model("tiny-random-llama")
    _, tok = load_model(str(tmp_path / "p"))
    record = json.loads(data.read_text())[0]
    text = record["instruction"] + "\n" + record["output"]
    assert [keep[i] for i in tok.encode(text, add_special_tokens=False)] == base_tok.encode(text, add_special_tokens=False)
    assert len(tok) < 8000
