"""Vocabulary surgery on a model and its byte-level BPE tokenizer.

extend: learn N new tokens from a corpus by continuing BPE training where the tokenizer's merges
stop (count adjacent token pairs inside the corpus's pre-tokenized words, merge the most frequent,
repeat), as Chinese-LLaMA-Alpaca grew LLaMA's vocabulary for Chinese. The new merges rank after every
old one, so any text tokenizes exactly as before except where a new merge applies, and it still
decodes to itself; llama.cpp reads the result as ordinary BPE (tokens + merges). Each new embedding
(and LM-head row) starts at the mean of the rows of the tokens it replaces, so the extended model
predicts roughly what the old one did from the first step.

prune: keep the tokens a corpus uses, the special tokens, the 256 byte symbols (every text stays
encodable) and every token a kept token is merged from; keep the merges among kept tokens, renumber,
and slice the embedding and LM head (as Firefly cut BLOOM's vocabulary). On the corpus the pruned
tokenizer gives the same tokens as the original (a merge that fired there produced a kept token from
kept tokens, and the merges removed never fired), so the pruned model's logits on corpus text are
the original's restricted to the kept tokens.
"""

from __future__ import annotations

import heapq
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError

log = logging.getLogger(__name__)

VOCAB_FILE = "chatsmith_vocab.json"   # beside a surgically changed model: which rows are new (sft trains them)


@dataclass
class VocabResult:
    """What one surgery did."""

    output: str
    old_size: int
    new_size: int
    new_tokens: list[str]
    stats: dict[str, Any]


# --- corpus ---------------------------------------------------------------------------------------

def read_corpus(files: list[str]) -> list[str]:
    """Texts from plain files (.txt, .md, code: the whole file) or chat datasets (every message)."""
    from chatsmith.data.formats import read_conversations

    texts: list[str] = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise ChatsmithError(f"--corpus {f}: no such file")
        if p.suffix in (".json", ".jsonl", ".csv", ".parquet"):
            texts += [m.content for c in read_conversations(str(p)).conversations for m in c.messages]
        else:
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
    if not any(t.strip() for t in texts):
        raise ChatsmithError(f"--corpus {' '.join(files)} holds no text")
    return texts


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    from chatsmith.export.vocab_meta import tokenizer_kind

    if tokenizer_kind(tokenizer) != "gpt2":
        raise ChatsmithError("vocabulary surgery needs a byte-level BPE tokenizer (GPT-2 style: SmolLM, Llama 3, "
                             "Qwen2); this one is SentencePiece-style")
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _merges(tj: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in tj["model"]["merges"]]


def _words(tokenizer: Any, texts: list[str]) -> Counter:
    """Pre-tokenized words (byte-level strings) with their counts; special tokens are not words."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    specials = sorted(set(getattr(tokenizer, "all_special_tokens", [])), key=len, reverse=True)
    counts: Counter = Counter()
    for text in texts:
        for s in specials:
            text = text.replace(s, " ")
        counts.update(w for w, _ in pre.pre_tokenize_str(text))
    return counts


# --- extend ---------------------------------------------------------------------------------------

def _digits_stay_single(vocab: dict[str, int]) -> bool:
    """Whether the tokenizer was trained with digits split one by one (SmolLM, Llama 3 splits runs of
    three, Qwen2 one by one): no token of two or more characters holds a digit. llama.cpp's pre-tokenizer
    for such a model isolates each digit, so a learned token must not join a digit to anything."""
    return not any(len(t) > 1 and any(c in "0123456789" for c in t) for t in vocab)


def learn_merges(tokenizer: Any, texts: list[str], n_new: int) -> list[tuple[str, str]]:
    """Up to `n_new` merges that continue the tokenizer's BPE training on `texts`, each creating a new
    token, most frequent pair first (ties broken by the pair, so the result is deterministic)."""
    model = tokenizer.backend_tokenizer.model
    vocab = tokenizer.get_vocab()
    single_digits = _digits_stay_single(vocab)
    counts = _words(tokenizer, texts)
    words = [[t.value for t in model.tokenize(w)] for w in counts]
    freq = list(counts.values())
    pair_count: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, toks in enumerate(words):
        for pair in zip(toks, toks[1:]):
            pair_count[pair] += freq[i]
            where[pair].add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    taken = set(vocab)
    while heap and len(merges) < n_new:
        c, pair = heapq.heappop(heap)
        if -c != pair_count.get(pair, 0) or -c < 2:
            if -c >= 2 and pair_count.get(pair, 0) >= 2:
                heapq.heappush(heap, (-pair_count[pair], pair))   # stale entry: requeue at its true count
            continue
        new = pair[0] + pair[1]
        if single_digits and any(c in "0123456789" for c in new):
            pair_count.pop(pair, None)
            continue
        if new in taken:   # already a token (reached by other merges): not new, and no merge needed
            pair_count.pop(pair, None)
            continue
        merges.append(pair)
        taken.add(new)
        for i in list(where.pop(pair, ())):
            toks = words[i]
            for p in zip(toks, toks[1:]):
                pair_count[p] -= freq[i]
            merged: list[str] = []
            j = 0
            while j < len(toks):
                if j + 1 < len(toks) and (toks[j], toks[j + 1]) == pair:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(toks[j])
                    j += 1
            words[i] = merged
            for p in zip(merged, merged[1:]):
                pair_count[p] += freq[i]
                where[p].add(i)
                heapq.heappush(heap, (-pair_count[p], p))
        pair_count.pop(pair, None)
    return merges


def _save_tokenizer(tokenizer: Any, tj: dict[str, Any], output: Path) -> Any:
    """Save `tokenizer` with `tj` as its tokenizer.json and load it back. The llama.cpp pre-tokenizer
    name is recorded in tokenizer_config.json: the split rules did not change, but the ids on llama.cpp's
    check text did, so the hash that names them no longer can (GGUF export reads the record)."""
    from transformers import AutoTokenizer

    from chatsmith.export.vocab_meta import PRE_TOKENIZER_KEY, pre_tokenizer_name

    try:
        pre = pre_tokenizer_name(tokenizer)
    except ChatsmithError:
        pre = None   # unknown already: GGUF export will refuse it as it would the source
    tokenizer.save_pretrained(output)
    (output / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    cfg_path = output / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("added_tokens_decoder", None)   # tokenizer.json's added_tokens hold the (renumbered) ids
    if pre:
        cfg[PRE_TOKENIZER_KEY] = pre
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return AutoTokenizer.from_pretrained(output)


def _finish(model: Any, tokenizer: Any, output: Path, meta: dict[str, Any]) -> None:
    from chatsmith.models.loading import _eot_generation_config

    model.config.vocab_size = model.get_input_embeddings().weight.shape[0]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(tokenizer, name)
        setattr(model.config, name, tid)
    _eot_generation_config(model, tokenizer)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    (output / VOCAB_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))


def extend_vocab(model_spec: str, corpus: list[str], add: int, output: str | Path,
                 heldout_fraction: float = 0.1) -> VocabResult:
    """Add up to `add` tokens learned from `corpus` to MODEL's tokenizer and embeddings; save to
    `output`. The last `heldout_fraction` of the corpus texts is left out of learning and used to
    report how many fewer tokens the extended tokenizer needs."""
    import torch

    from chatsmith.models import load_model

    if add < 1:
        raise ChatsmithError("--add must be at least 1")
    output = Path(output)
    model, tok = load_model(model_spec, dtype=torch.float32)
    tj = _tokenizer_json(tok)
    texts = read_corpus(corpus)
    cut = max(1, int(len(texts) * (1 - heldout_fraction))) if len(texts) > 1 else 1
    learn, heldout = texts[:cut], texts[cut:] or texts[-1:]
    merges = learn_merges(tok, learn, add)
    if not merges:
        raise ChatsmithError("the corpus has no token pair that occurs twice: nothing to learn")
    old_len = len(tok)
    vocab = tj["model"]["vocab"]
    next_id = max(max(vocab.values()), max(tok.get_vocab().values())) + 1
    new_tokens = []
    for a, b in merges:
        vocab[a + b] = next_id
        new_tokens.append(a + b)
        next_id += 1
    tj["model"]["merges"] = [[a, b] for a, b in _merges(tj)] + [[a, b] for a, b in merges]
    output.mkdir(parents=True, exist_ok=True)
    new_tok = _save_tokenizer(tok, tj, output)
    ids = [vocab[t] for t in new_tokens]

    # New rows: the mean of the rows of the tokens each new token replaces.
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone() if model.get_output_embeddings() is not None else None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    model.resize_token_embeddings(next_id, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight if old_head is not None else None
    with torch.no_grad():
        for t, i in zip(new_tokens, ids):
            parts = [p.value for p in tok.backend_tokenizer.model.tokenize(t)]
            part_ids = [tok.convert_tokens_to_ids(p) for p in parts]
            emb[i] = old_emb[part_ids].mean(0)
            if head is not None and not tied:
                head[i] = old_head[part_ids].mean(0)
    before = sum(len(tok.encode(t, add_special_tokens=False)) for t in heldout)
    after = sum(len(new_tok.encode(t, add_special_tokens=False)) for t in heldout)
    stats = {"heldout_texts": len(heldout), "heldout_tokens_before": before, "heldout_tokens_after": after,
             "fewer_tokens": 1 - after / max(1, before)}
    _finish(model, new_tok, output, {"operation": "extend", "source": model_spec, "new_token_ids": ids,
                                     "stats": stats})
    return VocabResult(str(output), old_len, len(new_tok), [new_tok.convert_tokens_to_string([t]) for t in new_tokens],
                       stats)


# --- prune ----------------------------------------------------------------------------------------

def _byte_symbols() -> set[str]:
    """The 256 one-character strings byte-level BPE maps bytes to (GPT-2's bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c) for c in cs}


def kept_tokens(tokenizer: Any, texts: list[str]) -> set[int]:
    """Ids to keep: those the texts use, the special and added tokens, the byte symbols, and the
    tokens every kept token can be merged from (closed under the merges)."""
    tj = _tokenizer_json(tokenizer)
    vocab = tokenizer.get_vocab()
    keep = {i for t in texts for i in tokenizer.encode(t, add_special_tokens=False)}
    keep |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    keep |= {vocab[s] for s in _byte_symbols() if s in vocab}
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is not None:
            keep.add(getattr(tokenizer, name))
    made_from: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for a, b in _merges(tj):
        made_from[a + b].append((a, b))
    inverse = {i: t for t, i in vocab.items()}
    stack = [inverse[i] for i in keep if i in inverse]
    while stack:
        t = stack.pop()
        for a, b in made_from.get(t, ()):
            for part in (a, b):
                if part in vocab and vocab[part] not in keep:
                    keep.add(vocab[part])
                    stack.append(part)
    return keep


def prune_vocab(model_spec: str, corpus: list[str], output: str | Path) -> VocabResult:
    """Keep only the tokens `corpus` needs (see the module docstring); save to `output`."""
    import torch

    from chatsmith.models import load_model

    output = Path(output)
    model, tok = load_model(model_spec, dtype=torch.float32)
    tj = _tokenizer_json(tok)
    texts = read_corpus(corpus)
    keep = sorted(kept_tokens(tok, texts))
    old_to_new = {old: new for new, old in enumerate(keep)}
    inverse = {i: t for t, i in tok.get_vocab().items()}
    added_ids = {int(i) for i in getattr(tok, "added_tokens_decoder", {})}
    tj["model"]["vocab"] = {inverse[i]: old_to_new[i] for i in keep if i not in added_ids or inverse[i] in tj["model"]["vocab"]}
    kept_text = {inverse[i] for i in keep}
    tj["model"]["merges"] = [[a, b] for a, b in _merges(tj) if a in kept_text and b in kept_text and a + b in kept_text]
    for added in tj.get("added_tokens", []):
        added["id"] = old_to_new[added["id"]]
    _remap_post_processor(tj.get("post_processor"), old_to_new)
    output.mkdir(parents=True, exist_ok=True)
    new_tok = _save_tokenizer(tok, tj, output)

    index = torch.tensor(keep)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    emb = model.get_input_embeddings()
    new_emb = torch.nn.Embedding(len(keep), emb.weight.shape[1], padding_idx=None)
    with torch.no_grad():
        new_emb.weight.copy_(emb.weight[index])
    model.set_input_embeddings(new_emb)
    head = model.get_output_embeddings()
    if head is not None:
        new_head = torch.nn.Linear(head.in_features, len(keep), bias=head.bias is not None)
        with torch.no_grad():
            new_head.weight.copy_(head.weight[index])
            if head.bias is not None:
                new_head.bias.copy_(head.bias[index])
        model.set_output_embeddings(new_head)
        if tied:
            model.tie_weights()
    stats = {"corpus_texts": len(texts), "kept": len(keep), "removed": len(inverse) - len(keep)}
    _finish(model, new_tok, output, {"operation": "prune", "source": model_spec, "kept_old_ids": keep,
                                     "new_token_ids": [], "stats": stats})
    return VocabResult(str(output), len(tok), len(new_tok), [], stats)


def _remap_post_processor(node: Any, old_to_new: dict[int, int]) -> None:
    """Special-token ids inside a TemplateProcessing/RobertaProcessing post-processor."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ids" and isinstance(value, list) and all(isinstance(v, int) for v in value):
                node[key] = [old_to_new[v] for v in value]
            elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                value[1] = old_to_new[value[1]]
            else:
                _remap_post_processor(value, old_to_new)
    elif isinstance(node, list):
        for v in node:
            _remap_post_processor(v, old_to_new)
