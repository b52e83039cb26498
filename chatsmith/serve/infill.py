"""Code infill (fill-in-the-middle) for models whose tokenizer has FIM tokens.

A FIM model (StarCoder/SantaCoder, Qwen2.5-Coder, CodeLlama) was trained on documents cut into
prefix, suffix and middle and reordered as prefix-suffix-middle ("PSM", Bavarian et al. 2022,
"Efficient Training of Language Models to Fill in the Middle"): the prompt is
`<fim_prefix>PREFIX<fim_suffix>SUFFIX<fim_middle>` and the model writes the middle. Used by
`/v1/completions` with `suffix` (OpenAI's field) and by the native `/infill` route (llama.cpp's:
`input_prefix`, `input_suffix`, and `prompt` as the start of the middle). A tokenizer without FIM
tokens (the embedded SmolLM2's has none) gets a 400 that says so, never an answer that ignores
the suffix.
"""

from __future__ import annotations

from typing import Any

from chatsmith.serve.schemas import APIError

# (prefix, suffix, middle) token strings of the model families that have them
FIM_TOKEN_SETS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),          # StarCoder, SantaCoder, StarCoder2
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),    # Qwen2.5-Coder
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),                            # CodeLlama
    ("<PRE>", "<SUF>", "<MID>"),
)


def fim_token_ids(tokenizer: Any) -> tuple[int, int, int] | None:
    """The (prefix, suffix, middle) token ids of the tokenizer's FIM tokens, or None without them."""
    vocab = tokenizer.get_vocab()
    for names in FIM_TOKEN_SETS:
        if all(n in vocab for n in names):
            return vocab[names[0]], vocab[names[1]], vocab[names[2]]
    return None


def infill_ids(state: Any, prefix: str, suffix: str, middle: str = "", field: str = "suffix") -> list[int]:
    """PSM prompt ids: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle (with the BOS
    when the tokenizer adds one); APIError(400) naming `field` when the model has no FIM tokens."""
    tok = state.tokenizer
    fim = fim_token_ids(tok)
    if fim is None:
        raise APIError(400, f"field '{field}': this model's tokenizer has no fill-in-the-middle tokens "
                       f"({', '.join(FIM_TOKEN_SETS[0])} or another family's), so it cannot fill in code between a "
                       "prefix and a suffix; serve a FIM-trained code model (StarCoder, Qwen2.5-Coder, CodeLlama)",
                       param=field, code="fim_unsupported")
    pre, suf, mid = fim
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"] if text else []   # noqa: E731
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) else []
    return bos + [pre] + enc(prefix) + [suf] + enc(suffix) + [mid] + enc(middle)


def llama_cpp_answer(answer: dict[str, Any], prompt_tokens: int, stop_word: str | None) -> dict[str, Any]:
    """An OpenAI text completion (one choice) in the shape of llama.cpp's /infill answer
    (`stop_word`: the stop string that ended it, if one did)."""
    choice = answer["choices"][0]
    text = choice["text"]
    stop_type = "limit" if choice["finish_reason"] == "length" else "word" if stop_word else "eos"
    return {"content": text, "model": answer["model"], "tokens_predicted": answer["usage"]["completion_tokens"],
            "tokens_evaluated": prompt_tokens, "stop": True, "stop_type": stop_type, "truncated": False}
