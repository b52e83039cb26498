"""The one entry point. Each subcommand is a thin call into a module (heavy imports happen there)."""

from __future__ import annotations

import argparse
import os
import sys

from chatsmith import __version__
from chatsmith.errors import ChatsmithError

EXAMPLES = {
    "main": """examples:
  chatsmith quickstart                                   teach the embedded model a new identity
  chatsmith models                                       list the builtin model aliases
  chatsmith data stats data.json --model smollm2-135m    records, turns, token lengths
  chatsmith sft --data alpaca.json --output runs/mine    LoRA fine-tuning of the embedded model
  chatsmith chat runs/mine                               talk to the result
""",
    "sft": """examples:
  chatsmith sft --data alpaca.json --output runs/a                      LoRA r=16 on all linear layers
  chatsmith sft --data a.json b.jsonl:0.3 --method dora --epochs 2      two files, b is 30%% of the mix
  chatsmith sft --config recipes/sft_lora.yaml --lr 1e-4                 YAML config, a flag overrides it
  chatsmith sft --data chat.json --method freeze --freeze-trainable-layers 4
  chatsmith sft --data d.csv --columns prompt=question,response=answer   CSV with a column mapping
  chatsmith sft ... --save-every 50   then after a crash:  chatsmith sft ... --resume
""",
    "chat": """examples:
  chatsmith chat smollm2-135m
  chatsmith chat runs/mine --temperature 0 --prompt "Who are you?"
  chatsmith chat model.gguf --system "You answer in French." --max-new-tokens 100
in the chat: /reset clears the history, /system TEXT sets the system prompt, /exit leaves.
""",
    "data": """examples:
  chatsmith data stats ../shared/data/alpaca_50.json --model smollm2-135m --max-length 512
  chatsmith data convert sharegpt.json out.jsonl --to messages
""",
}


def _parser() -> argparse.ArgumentParser:
    from chatsmith.config import SFTConfig, add_dataclass_arguments

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="chatsmith", description="Build your own ChatGPT-style assistant from an open model.",
                                epilog=EXAMPLES["main"], formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"chatsmith {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("models", help="list the builtin model aliases", formatter_class=fmt)

    d = sub.add_parser("data", help="inspect and convert datasets", epilog=EXAMPLES["data"], formatter_class=fmt)
    dsub = d.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    st = dsub.add_parser("stats", help="records, turns, roles, token-length percentiles", epilog=EXAMPLES["data"], formatter_class=fmt)
    st.add_argument("file")
    st.add_argument("--model", default=None, help="count tokens with this model's tokenizer and template")
    st.add_argument("--max-length", type=int, default=1024, help="report how many examples exceed this")
    st.add_argument("--format", default=None, help="force a format instead of detecting it")
    st.add_argument("--template", default=None, help="chat template (default: the model's own)")
    st.add_argument("--columns", default=None, help="column mapping, e.g. prompt=question,response=answer")
    st.add_argument("--skip-bad", action="store_true", help="drop malformed records and count them")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cv = dsub.add_parser("convert", help="convert a dataset to another format", epilog=EXAMPLES["data"], formatter_class=fmt)
    cv.add_argument("input")
    cv.add_argument("output", help=".json writes a JSON list, .jsonl JSON lines")
    cv.add_argument("--to", required=True, choices=["messages", "alpaca", "sharegpt"])
    cv.add_argument("--format", default=None, help="force the input format")
    cv.add_argument("--columns", default=None, help="column mapping for CSV/Parquet/JSONL input")
    cv.add_argument("--skip-bad", action="store_true")

    s = sub.add_parser("sft", help="supervised fine-tuning (full, freeze, LoRA, DoRA, QLoRA, prompt, prefix, adapter)",
                       epilog=EXAMPLES["sft"], formatter_class=fmt)
    s.add_argument("--config", default=None, help="YAML file of SFT settings; flags override it")
    add_dataclass_arguments(s, SFTConfig)

    c = sub.add_parser("chat", help="streaming chat in the terminal", epilog=EXAMPLES["chat"], formatter_class=fmt)
    c.add_argument("model", help="alias, HF directory, run directory, adapter directory, .gguf file or hub id")
    c.add_argument("--prompt", default=None, help="answer this once, print the answer and exit")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default 0.7)")
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--top-k", type=int, default=0, help="0 = off")
    c.add_argument("--min-p", type=float, default=0.0)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--template", default=None, help="chat template (default: the model's own)")
    c.add_argument("--trust-remote-code", action="store_true")

    q = sub.add_parser("quickstart", help="teach the embedded model a new identity and show before/after",
                       formatter_class=fmt)
    q.add_argument("--name", default="Smithy", help="the assistant's new name")
    q.add_argument("--maker", default="the chatsmith project", help="who made it")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--output", default="runs/quickstart")
    q.add_argument("--max-steps", type=int, default=None, help="override the number of training steps")
    q.add_argument("--seed", type=int, default=0)
    return p


def _mapping(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    from chatsmith.config import _parse_mapping

    return _parse_mapping(text)


def _run(args: argparse.Namespace) -> int:
    if args.command == "models":
        from rich.console import Console
        from rich.table import Table

        from chatsmith.models.registry import ALIASES

        t = Table(title="builtin models (any HF directory, run directory, adapter, .gguf or hub id works too)")
        for col in ("alias", "params", "what it is"):
            t.add_column(col)
        for a in ALIASES.values():
            t.add_row(a.name, a.params, a.description)
        Console().print(t)
        return 0
    if args.command == "data":
        if args.data_command == "stats":
            from chatsmith.data.stats import data_stats, print_stats

            tok = None
            if args.model:
                from chatsmith.models import load_tokenizer

                tok = load_tokenizer(args.model)
            stats = data_stats(args.file, tokenizer=tok, max_length=args.max_length, format=args.format,
                               columns=_mapping(args.columns), skip_bad=args.skip_bad, template=args.template)
            if args.json:
                import json

                print(json.dumps(stats, indent=2))
            else:
                print_stats(stats)
            return 0
        if args.data_command == "convert":
            from chatsmith.data.formats import convert

            print(convert(args.input, args.output, args.to, format=args.format, columns=_mapping(args.columns),
                          skip_bad=args.skip_bad))
            return 0
        _parser().parse_args(["data", "--help"])
        return 2
    if args.command == "sft":
        from chatsmith.config import SFTConfig, load_config
        from chatsmith.train.sft import run_sft

        overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        cfg = load_config(SFTConfig, args.config, overrides)
        run_sft(cfg)
        return 0
    if args.command == "chat":
        from chatsmith.chat import run_chat
        from chatsmith.infer.sampling import SamplingParams

        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                                seed=args.seed)
        params.validate()
        return run_chat(args.model, prompt=args.prompt, system=args.system, params=params, template=args.template,
                        trust_remote_code=args.trust_remote_code)
    if args.command == "quickstart":
        from chatsmith.quickstart import run_quickstart

        return run_quickstart(name=args.name, maker=args.maker, model=args.model, output=args.output,
                              max_steps=args.max_steps, seed=args.seed)
    _parser().print_help()
    return 2


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ChatsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


