"""The tokenizer as llama.cpp reads it from a GGUF file: token strings, token types, merges or
scores, the special ids, and `tokenizer.ggml.pre`, the name of the pre-tokenizer llama.cpp must use.

llama.cpp cannot run a tokenizer.json's pre-tokenizer; it has one hand-written regex set per name.
Its converter names the pre-tokenizer by hashing the token ids a tokenizer gives for a fixed text
(CHECK_TEXT below; the same text and the same hash: sha256 of str(list of ids)) and looking the hash
up in a table. An unknown hash means llama.cpp would fall back to a default pre-tokenizer and
silently tokenize differently (ggml-org/llama.cpp #8649, #9927), so we refuse it unless told.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

from chatsmith.errors import ChatsmithError

# The text llama.cpp's convert_hf_to_gguf.py encodes to identify a BPE pre-tokenizer (whitespace
# runs, emoji with a zero-width joiner, digit runs, Khmer, Chinese, Cyrillic, quotes, contractions).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(tokenizer.encode(CHECK_TEXT))) -> llama.cpp's pre-tokenizer name, for the families
# chatsmith exports (values from llama.cpp's converter table; a reference model for each).
KNOWN_PRE_TOKENIZERS: dict[str, tuple[str, str]] = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": ("smollm", "HuggingFaceTB/SmolLM-135M"),
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": ("llama-bpe", "meta-llama/Meta-Llama-3-8B"),
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": ("smaug-bpe", "abacusai/Smaug-Llama-3-70B-Instruct"),
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": ("qwen2", "Qwen/Qwen1.5-7B"),
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": ("qwen2", "Qwen/Qwen3-Embedding-0.6B"),
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": ("deepseek-r1-qwen", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": ("tekken", "mistralai/Mistral-Nemo-Base-2407"),
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": ("gpt-2", "openai-community/gpt2"),
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": ("starcoder", "bigcode/starcoder2-3b"),
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": ("phi-2", "microsoft/phi-2"),
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": ("deepseek-llm", "deepseek-ai/deepseek-llm-7b-base"),
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": ("deepseek-coder", "deepseek-ai/deepseek-coder-6.7b-base"),
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": ("deepseek-v3", "deepseek-ai/DeepSeek-V3"),
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": ("falcon3", "tiiuae/Falcon3-7B-Base"),
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": ("falcon", "tiiuae/falcon-7b"),
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": ("gpt-4o", "Xenova/gpt-4o"),
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": ("llama4", "meta-llama/Llama-4-Scout-17B-16E-Instruct"),
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": ("pixtral", "mistral-community/pixtral-12b"),
}

# A tokenizer_config.json key: the llama.cpp pre-tokenizer of a tokenizer whose vocabulary chatsmith
# changed (`chatsmith vocab`), which the hash can no longer name.
PRE_TOKENIZER_KEY = "chatsmith_gguf_pre"

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def pre_tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the ids the tokenizer gives for CHECK_TEXT, as llama.cpp's converter computes it."""
    ids = tokenizer.encode(CHECK_TEXT)
    return sha256(str(list(ids)).encode()).hexdigest()


def pre_tokenizer_name(tokenizer: Any, override: str | None = None) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, or a ChatsmithError for an unknown one."""
    h = pre_tokenizer_hash(tokenizer)
    if h in KNOWN_PRE_TOKENIZERS:
        name = KNOWN_PRE_TOKENIZERS[h][0]
        if override and override != name:
            import logging

            logging.getLogger(__name__).warning(
                "--pre-tokenizer %s overrides the recognised pre-tokenizer %s (hash %s)", override, name, h)
            return override
        return name
    recorded = (getattr(tokenizer, "init_kwargs", None) or {}).get(PRE_TOKENIZER_KEY)
    if recorded and not override:
        return recorded   # `chatsmith vocab` changed the vocabulary, not the split rules
    if override:
        import logging

        logging.getLogger(__name__).warning(
            "\n*** the BPE pre-tokenizer (hash %s) is not in chatsmith's table; writing '%s' as you asked. "
            "If that name is wrong, llama.cpp will split text differently from training. ***", h, override)
        return override
    known = ", ".join(sorted({n for n, _ in KNOWN_PRE_TOKENIZERS.values()}))
    raise ChatsmithError(
        f"the tokenizer's pre-tokenizer is not recognised (hash {h} of its ids on llama.cpp's check text). "
        "llama.cpp would fall back to a default pre-tokenizer and tokenize differently from training "
        "(ggml-org/llama.cpp #8649). If you know which llama.cpp pre-tokenizer matches it, pass "
        f"--pre-tokenizer NAME (known here: {known}); otherwise export --to hf")


@dataclass
class GGUFVocab:
    """Everything `tokenizer.ggml.*` holds."""

    model: str                       # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)   # bos, eos, unk, pad, eot
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ChatsmithError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend; GGUF export "
                             "needs a tokenizer.json-based tokenizer")
    return json.loads(backend.to_str())


def _components(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not node:
        return []
    subs = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders")
    return [c for s in subs for c in _components(s)] if subs else [node]


def tokenizer_kind(tokenizer: Any) -> str:
    """'gpt2' for byte-level BPE, 'llama' for SentencePiece-style BPE with byte fallback."""
    tj = _tokenizer_json(tokenizer)
    model = tj.get("model", {})
    kinds = {c.get("type") for c in _components(tj.get("pre_tokenizer"))}
    if model.get("type") == "BPE" and "ByteLevel" in kinds:
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise ChatsmithError(
        f"this tokenizer ({model.get('type')} model, pre-tokenizers {sorted(k for k in kinds if k) or 'none'}) is "
        "neither byte-level BPE nor SentencePiece-style BPE with byte fallback, the two chatsmith writes to "
        "GGUF; export --to hf and use llama.cpp's converter")


def _added(tokenizer: Any) -> dict[int, Any]:
    return {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}


def _looks_special(text: str) -> bool:
    # As llama.cpp's converter: some models ship control tokens not marked special.
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _merge_strings(merges: list[Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _adds(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS/EOS around a text by itself (asked, not read from a config)."""
    ids = tokenizer.encode("a")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos is not None and len(ids) > 1 and ids[0] == bos), (eos is not None and len(ids) > 1 and ids[-1] == eos)


def gguf_vocab(tokenizer: Any, vocab_size: int, end_of_turn_id: int | None, pre_override: str | None = None) -> GGUFVocab:
    """The tokenizer in llama.cpp's terms; `vocab_size` is the model's (rows of the embedding), rows
    beyond the tokenizer become unused [PADi] tokens as llama.cpp's converter writes them."""
    kind = tokenizer_kind(tokenizer)
    tj = _tokenizer_json(tokenizer)
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = _added(tokenizer)
    for i, t in added.items():
        vocab[str(t)] = i
    if max(vocab.values()) >= vocab_size:
        raise ChatsmithError(f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding has only "
                             f"{vocab_size} rows; resize the embeddings (the vocab commands do) before exporting")
    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] | None = [] if kind == "llama" else None
    merges = _merge_strings(tj["model"].get("merges", []))
    # SentencePiece-style scores: llama.cpp's SPM tokenizer merges the pair whose result scores highest,
    # so a token's score falls with the rank of the first merge that makes it.
    rank: dict[str, float] = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), float(len(merges) - r))
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            if scores is not None:
                scores.append(-1000.0)
            continue
        text = reverse[i]
        if i in added:
            tok = added[i]   # stored as written: llama.cpp matches added tokens on the raw text
            types.append(CONTROL if getattr(tok, "special", False) or _looks_special(text) else USER_DEFINED)
            if scores is not None:
                scores.append(-1000.0)
        elif kind == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(BYTE)
            scores.append(0.0)   # type: ignore[union-attr]
        else:
            types.append(NORMAL)
            if scores is not None:
                scores.append(rank.get(text, 0.0))
        tokens.append(text)
    if kind == "llama":
        unk = tokenizer.unk_token_id
        if unk is not None and unk < len(types):
            types[unk] = UNKNOWN
    special: dict[str, int] = {}
    for name, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                      ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id), ("eot", end_of_turn_id)):
        if tid is not None:
            special[name] = int(tid)
    add_bos, add_eos = _adds(tokenizer)
    prefix = getattr(tokenizer, "add_prefix_space", None)
    if kind == "llama":   # SentencePiece: a leading "▁" before the first word, from the normalizer or Metaspace
        prefix = any(c.get("type") == "Prepend" and c.get("prepend") == "\u2581" for c in _components(tj.get("normalizer"))) \
            or any(c.get("type") == "Metaspace" and (c.get("prepend_scheme") in ("first", "always") or c.get("add_prefix_space"))
                   for c in _components(tj.get("pre_tokenizer")))
    pre = pre_tokenizer_name(tokenizer, pre_override) if kind == "gpt2" else "default"
    return GGUFVocab(model=kind, pre=pre, tokens=tokens, types=types, merges=merges if kind == "gpt2" else [],
                     scores=scores, special_ids=special, add_bos=add_bos, add_eos=add_eos,
                     add_space_prefix=prefix if isinstance(prefix, bool) else None)
