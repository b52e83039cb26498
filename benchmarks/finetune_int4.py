"""What int4 and int8 keep of a fine-tuning: the embedded model (on int4's grid, de-quantized from
its Q4_1 GGUF) fine-tuned with a short full SFT, then served quantized.

Training moves each weight by far less than one step of the 4-bit grid, so int4 rounds most of the
movement back toward the untuned model; int8's grid is 16 times finer. This is why `--precision
auto` picks int4 only for models still on its grid (infer/engine.py resolve_precision).

Measured: mean KL per answer token from the tuned fp32 model, and how often the most likely token
agrees with it, on hh-rlhf answers the fine-tuning never saw, for int8, int4 and the untuned model.

    python benchmarks/finetune_int4.py                          # trains 60 steps (about 4 min here)
    python benchmarks/finetune_int4.py --tuned runs/alpaca/final   # measure a model you trained
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
ALPACA = REPO.parent / "shared" / "data" / "alpaca_50.json"


def train(out: Path, steps: int, lr: float) -> Path:
    from chatsmith.config import SFTConfig
    from chatsmith.train.sft import run_sft

    run = run_sft(SFTConfig(model="smollm2-135m", data=[str(ALPACA)], method="full", max_steps=steps, batch_size=4,
                            lr=lr, max_length=256, eval_split=0, output=str(out)))
    return run / "final"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tuned", default=None, help="a fine-tuned model directory to measure (default: train one)")
    ap.add_argument("--steps", type=int, default=60, help="full SFT steps when training [60]")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate when training [1e-4]")
    ap.add_argument("--texts", type=int, default=40, help="hh-rlhf dialogues to score [40]")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from quant_quality import conversations

    from chatsmith.infer.engine import Engine, resolve_precision
    from chatsmith.infer.int4 import quantize_int4
    from chatsmith.models import load_model

    with tempfile.TemporaryDirectory(prefix="finetune_int4_") as tmp:
        tuned_dir = args.tuned or str(train(Path(tmp) / "run", args.steps, args.lr))
        model, tok = load_model(tuned_dir)
        base, _ = load_model("smollm2-135m")
    drift, step = [], []
    for layer, layer0 in zip(model.model.layers, base.model.layers):
        w, w0 = layer.mlp.down_proj.weight.detach(), layer0.mlp.down_proj.weight.detach()
        drift.append((w - w0).abs().mean().item())
        step.append(quantize_int4(w0, 32, False, torch.float16)[1].abs().mean().item())
    print(f"auto precision for the tuned model: {resolve_precision(model)}")
    print(f"mean weight movement (down_proj) {sum(drift) / len(drift):.2e}, mean 4-bit grid step {sum(step) / len(step):.2e}")
    texts = conversations(tok, args.texts, "hh")
    with torch.no_grad():
        ref = [torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)[n - 1:] for ids, n in texts]

    def score(logps) -> tuple[float, float, int]:
        kl = agree = count = 0
        for lp, lq in zip(ref, logps):
            kl += (lp.exp() * (lp - lq)).sum().item()
            agree += (lq.argmax(-1) == lp.argmax(-1)).sum().item()
            count += lp.shape[0]
        return kl / count, agree / count, count

    rows = []
    for precision in ("int8", "int4"):
        runner = Engine(model, tok, precision=precision, max_batch_size=1, kv_cache_mb=64).runner
        with torch.inference_mode():
            out = [torch.log_softmax(runner.prefill_scored(0, ids, 0, None, len(ids) - 1)[1].double(), -1)[n - 1:]
                   for ids, n in texts]
        rows.append((precision, *score(out)))
    with torch.no_grad():
        rows.append(("untuned model (fp32)", *score(
            [torch.log_softmax(base(torch.tensor([ids])).logits[0, :-1].double(), -1)[n - 1:] for ids, n in texts])))
    print(f"\nagainst the tuned fp32 model, {rows[0][3]} answer tokens of {len(texts)} hh-rlhf dialogues")
    print("| contender | mean KL | top-1 agreement |\n|---|---:|---:|")
    for name, kl, agree, _ in rows:
        print(f"| {name} | {kl:.4f} | {agree:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
