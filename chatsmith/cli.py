"""The one entry point. Each subcommand is a thin call into a module (heavy imports happen there)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from chatsmith import __version__
from chatsmith.errors import ChatsmithError
from chatsmith.infer.precision import CHOICES as PRECISION_CHOICES
from chatsmith.infer.precision import HELP as PRECISION_HELP

EXAMPLES = {
    "main": """examples:
  chatsmith quickstart                                   teach the embedded model a new identity
  chatsmith models                                       list the builtin model aliases
  chatsmith data stats data.json --model smollm2-135m    records, turns, token lengths
  chatsmith sft --data alpaca.json --output runs/mine    LoRA fine-tuning of the embedded model
  chatsmith chat runs/mine                               talk to the result
  chatsmith eval tasks runs/mine --data builtin:identity  did it get better? (also ppl, rm, judge)
""",
    "sft": """examples:
  chatsmith sft --data alpaca.json --output runs/a                      LoRA r=16 on all linear layers
  chatsmith sft --data a.json b.jsonl:0.3 --method dora --epochs 2      two files, b is 30% of the mix
  chatsmith sft --config recipes/sft_lora.yaml --lr 1e-4                 YAML config, a flag overrides it
  chatsmith sft --data chat.json --method freeze --freeze-trainable-layers 4
  chatsmith sft --data d.csv --columns prompt=question,response=answer   CSV with a column mapping
  chatsmith sft ... --save-every 50   then after a crash:  chatsmith sft ... --resume
""",
    "rm": """examples:
  chatsmith rm --data pairs.json --output runs/rm                      LoRA reward model, Bradley-Terry on pairs
  chatsmith rm --data rankings.jsonl --loss listwise --method head     Plackett-Luce over K ranked answers
  chatsmith rm --config recipes/rm_identity_demo.yaml                  the built-in preference demo set
  chatsmith rm score runs/rm --prompt "Who are you?" --response "I'm Smithy."
  chatsmith rm compare runs/rm --models smollm2-135m runs/dpo          sample answers, mean reward per model
""",
    "dpo": """examples:
  chatsmith dpo --data pairs.json --output runs/dpo                    DPO with LoRA (reference = adapter off)
  chatsmith dpo --data pairs.json --loss simpo --beta 2.0              reference-free SimPO
  chatsmith dpo --data feedback.json --loss kto                        unpaired {messages, label} feedback
  chatsmith dpo --data rankings.jsonl --loss rrhf                      RRHF over K ranked answers
  chatsmith dpo --config recipes/dpo_identity_demo.yaml                the built-in preference demo
""",
    "grpo": """examples:
  chatsmith grpo --data builtin:arithmetic --reward exact_answer               GRPO, G=8, LoRA, on built-in word problems
  chatsmith grpo --data builtin:arithmetic --reward exact_answer --estimator rloo
  chatsmith grpo --data prompts.jsonl --reward my_rewards.py:score length:20=0.1   a user function plus a weighted length reward
  chatsmith grpo --config recipes/grpo_arithmetic.yaml                          the CPU recipe (before/after accuracy)
""",
    "ppo": """examples:
  chatsmith ppo --data prompts.jsonl --reward runs/rm --output runs/ppo          PPO against a `chatsmith rm` reward model
  chatsmith ppo --data builtin:arithmetic --reward exact_answer --kl-target 2  adaptive KL towards a 2-nat budget
  chatsmith ppo ... --ptx-data sft.json --ptx-coef 0.5                           PPO-ptx: keep the SFT loss in the mix
""",
    "chat": """examples:
  chatsmith chat smollm2-135m
  chatsmith chat runs/mine --temperature 0 --prompt "Who are you?"
  chatsmith chat model.gguf --system "You answer in French." --max-new-tokens 100
  chatsmith chat runs/mine --kb docs.kb --prompt "How do I stream answers?"   answer with numbered sources
in the chat: /reset clears the history, /system TEXT sets the system prompt, /exit leaves.
""",
    "eval": """examples:
  chatsmith eval ppl smollm2-135m runs/mine --data heldout.json              perplexity, assistant tokens, one row per model
  chatsmith eval tasks smollm2-135m runs/grpo --data builtin:arithmetic --shots 3
  chatsmith eval tasks runs/mine --data qa.jsonl --match contains --output eval/qa   accuracy by category + report.html
  chatsmith eval rm runs/rm --data heldout_pairs.jsonl                       pairwise accuracy with a 95% interval
  chatsmith eval rm-compare runs/rm --models smollm2-135m runs/dpo --prompts prompts.jsonl
  chatsmith eval judge runs/mine --baseline smollm2-135m --questions question.jsonl \
      --judge-url http://127.0.0.1:8001/v1 --judge-model judge --output eval/judge
  chatsmith eval compare eval/before eval/after                              two results folders side by side
""",
    "kb": """examples:
  chatsmith kb add docs.kb docs/ README.md handbook.pdf   ingest files and folders (re-run: only changes)
  chatsmith kb query docs.kb "How do I stream answers?"   ranked chunks with source, heading path, both scores
  chatsmith kb query docs.kb "error E-4012" --mode bm25   one method alone (bm25 or vector)
  chatsmith kb list docs.kb                               the documents and their chunk counts
  chatsmith kb remove docs.kb docs/old/                   drop a file or everything under a folder
  chatsmith kb stats docs.kb
then: chatsmith chat MODEL --kb docs.kb   or   chatsmith serve MODEL --kb docs.kb
""",
    "export": """examples:
  chatsmith export runs/mine --to hf --output out/mine-hf              merged safetensors + tokenizer + template
  chatsmith export runs/mine --to gguf --quant q8_0 --output out/       GGUF for llama.cpp / LM Studio, checked by round trip
  chatsmith export runs/mine --to ollama --quant q4_0 --output out/ollama   GGUF + Modelfile; then `ollama create`
  chatsmith export smollm2-135m --to gguf --quant f16 --output smol.gguf --no-verify
""",
    "vocab": """examples:
  chatsmith vocab extend --model smollm2-135m --corpus zh.txt --add 2000 --output models/smol-zh   learn 2000 tokens
  chatsmith vocab prune --model smollm2-135m --corpus my_data.jsonl --output models/smol-small      keep what the data uses
  chatsmith sft --model models/smol-zh --data zh_chat.jsonl --output runs/zh     the new rows train with LoRA
""",
    "data": """examples:
  chatsmith data stats ../shared/data/alpaca_50.json --model smollm2-135m --max-length 512
  chatsmith data convert sharegpt.json out.jsonl --to messages
""",
}


EXAMPLES["datagen"] = """examples:
  chatsmith serve smollm2-135m --port 8000 &                     any OpenAI-compatible endpoint can be the teacher
  chatsmith data self-instruct --seeds seed_tasks.jsonl --n 500 --output si.jsonl \\
      --teacher-url http://127.0.0.1:8000/v1 --teacher-model smollm2-135m
  chatsmith data self-chat --seeds questions.txt --turns 4 --output chats.jsonl \\
      --teacher-url https://api.openai.com/v1 --teacher-model gpt-4o-mini --price-in 0.15 --price-out 0.6
  interrupted? run the same command again: answers already paid for are replayed from the journal
"""


EXAMPLES["data_tools"] = """examples:
  chatsmith data mix alpaca.jsonl:0.7 chats.jsonl:0.3 --total 100000 --output mix.jsonl     ratios, seeded, shuffled
  chatsmith data mix a.jsonl:5000 b.jsonl:2000 --counts --output mix.jsonl                 record counts
  chatsmith data dedupe mix.jsonl --near --threshold 0.8 --output dedup.jsonl               exact + MinHash LSH
  chatsmith data filter dedup.jsonl --model smollm2-135m --max-tokens 1024 --lang en --output f.jsonl
  chatsmith data filter f.jsonl --quality-threshold 7 --teacher-url URL --teacher-model M --output good.jsonl
  chatsmith data split good.jsonl --test-size 0.05 --output-dir splits/
  chatsmith data sample good.jsonl --n 1000 --output small.jsonl
  chatsmith data translate alpaca.jsonl --to Korean --teacher-url URL --teacher-model M --output ko.jsonl
  chatsmith data clean sharegpt.json --model smollm2-135m --max-length 2048 --output clean.jsonl
"""


EXAMPLES["label"] = """examples:
  chatsmith label --prompts prompts.txt --model runs/sft --k 4 --output labels/rankings.jsonl
      open http://127.0.0.1:8010/ ; rank with the mouse or keys 1-4 and Enter; stop and start again at will
  chatsmith rm --data labels/rankings.jsonl --loss listwise            a reward model from the rankings
  chatsmith dpo --data labels/rankings.pairs.jsonl                     DPO on the pairs
"""


DEFAULT_CACHE = "~/.cache/chatsmith/responses.db"   # serve --cache without a PATH
SERVE_EXAMPLES = """examples:
  chatsmith serve smollm2-135m                          web chat at http://127.0.0.1:8000/, API at /v1
  CHATSMITH_API_KEY=secret chatsmith serve runs/mine --port 9000      require the key on the API routes
  chatsmith serve runs/mine --host 0.0.0.0 --api-key-file key.txt     every interface, key from a file
  chatsmith serve smollm2-135m --lora mine=runs/mine/adapter --max-concurrency 8
  chatsmith serve runs/mine --cache --cache-semantic     answer repeats and guarded paraphrases from a cache
then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret").chat.completions.create(...)
"""


# Training stages: command -> (config class in chatsmith.config, module, function(cfg), help). Each
# gets --config YAML plus one flag per config field, and runs function(load_config(...)).
TRAIN_STAGES = {
    "sft": ("SFTConfig", "chatsmith.train.sft", "run_sft",
            "supervised fine-tuning (full, freeze, LoRA, DoRA, QLoRA, prompt, prefix, adapter)"),
    "rm": ("RMConfig", "chatsmith.train.rm", "run_rm",
           "train a reward model on pairs or rankings; score or compare with one"),
    "dpo": ("DPOConfig", "chatsmith.train.dpo", "run_dpo", "preference tuning: dpo, ipo, cdpo, kto, orpo, simpo, rrhf"),
    "ppo": ("PPOConfig", "chatsmith.train.ppo", "run_ppo", "online RL with a critic: PPO, KL to the reference, PPO-ptx"),
    "grpo": ("GRPOConfig", "chatsmith.train.grpo", "run_grpo", "online RL without a critic: GRPO, RLOO (group baselines)"),
}


def _parser() -> argparse.ArgumentParser:
    from chatsmith.config import add_dataclass_arguments
    from chatsmith.train.launch import add_launch_arguments

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="chatsmith", description="Build your own ChatGPT-style assistant from an open model.",
                                epilog=EXAMPLES["main"], formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"chatsmith {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("models", help="list the builtin model aliases", formatter_class=fmt)
    pl = sub.add_parser("plan", help="memory per device for a training run, whether it fits each GPU, what to change, "
                        "and a speed estimate", epilog=PLAN_EXAMPLES, formatter_class=fmt)
    _plan_flags(pl)

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
    _datagen_parsers(dsub, fmt)
    _data_tool_parsers(dsub, fmt)

    _kb_parser(sub, fmt)

    import chatsmith.config as config_module

    stages = {}
    for name, (cls_name, _, _, help_text) in TRAIN_STAGES.items():
        stages[name] = sub.add_parser(name, help=help_text, epilog=EXAMPLES[name], formatter_class=fmt)
        stages[name].add_argument("--config", default=None, help=f"YAML file of {name} settings; flags override it")
        add_dataclass_arguments(stages[name], getattr(config_module, cls_name))
        add_launch_arguments(stages[name])
    r = stages["rm"]
    rsub = r.add_subparsers(dest="rm_command", metavar="RM_COMMAND")
    rs = rsub.add_parser("score", help="score a prompt and response with a trained reward model",
                         epilog=EXAMPLES["rm"], formatter_class=fmt)
    rs.add_argument("reward_model", help="a `chatsmith rm` run directory")
    rs.add_argument("--prompt", required=True, action="append", help="user message (repeat for several)")
    rs.add_argument("--response", required=True, action="append", help="assistant answer (one per --prompt)")
    rc = rsub.add_parser("compare", help="sample answers from models and compare their mean reward",
                         epilog=EXAMPLES["rm"], formatter_class=fmt)
    _compare_flags(rc)
    rc.add_argument("--json", default=None, help="also write the table and every answer to this JSON file")
    rc.add_argument("--output", default=None, help="results folder: results.jsonl, summary.json, report.html")


    ev = sub.add_parser("eval", help="did it get better? perplexity, task accuracy, reward-model accuracy, "
                        "win rates, LLM-as-judge", epilog=EXAMPLES["eval"], formatter_class=fmt)
    esub = ev.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")

    def out_flag(e: argparse.ArgumentParser, required: bool = False) -> None:
        e.add_argument("--output", required=required, default=None,
                       help="results folder: results.jsonl, summary.json, report.html")

    ep = esub.add_parser("ppl", help="perplexity and mean token NLL on held-out data (any format chatsmith reads)",
                         epilog=EXAMPLES["eval"], formatter_class=fmt)
    ep.add_argument("models", nargs="+", metavar="MODEL", help="aliases, run directories, HF directories, .gguf files")
    ep.add_argument("--data", required=True, help="a file of conversations in any format chatsmith reads")
    ep.add_argument("--all-tokens", action="store_true", help="score every token, not only the assistant's")
    ep.add_argument("--max-length", type=int, default=2048, help="examples are cut to this many tokens (default 2048)")
    ep.add_argument("--format", default=None, help="force a data format instead of detecting it")
    ep.add_argument("--columns", default=None, help="column mapping, e.g. prompt=question,response=answer")
    ep.add_argument("--template", default=None, help="chat template (default: the model's own)")
    ep.add_argument("--skip-bad", action="store_true", help="drop malformed records and count them")
    ep.add_argument("--limit", type=int, default=None, help="the first N examples only")
    out_flag(ep)

    et = esub.add_parser("tasks", help="accuracy on prompts with references (exact, normalised, numeric, regex, "
                         "contains)", epilog=EXAMPLES["eval"], formatter_class=fmt)
    et.add_argument("models", nargs="+", metavar="MODEL")
    et.add_argument("--data", required=True, help="task sets, comma-separated: builtin:identity, builtin:arithmetic, "
                    "or files of {prompt|question|instruction, answer|reference(s)|output, [category], [match]}")
    et.add_argument("--match", default="normalised", choices=["exact", "normalised", "numeric", "regex", "contains"],
                    help="how an answer is compared with the reference when a record does not say (default normalised)")
    et.add_argument("--shots", type=int, default=0, help="few-shot examples as earlier turns (default 0): from "
                    "--shots-from, else a built-in set's training split, else the items before each item")
    et.add_argument("--shots-from", default=None, help="a task file whose first --shots items are the examples")
    et.add_argument("--system", default=None, help="system prompt")
    et.add_argument("--max-new-tokens", type=int, default=64)
    et.add_argument("--columns", default=None, help="column mapping, e.g. prompt=q,answer=a")
    et.add_argument("--template", default=None, help="chat template (default: the model's own)")
    et.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                    help=PRECISION_HELP)
    et.add_argument("--limit", type=int, default=None, help="the first N items of each set")
    out_flag(et)

    er = esub.add_parser("rm", help="pairwise accuracy and mean margin of a reward model on held-out preferences",
                         epilog=EXAMPLES["eval"], formatter_class=fmt)
    er.add_argument("reward_model", help="a `chatsmith rm` run directory")
    er.add_argument("--data", required=True, help="pairs or rankings in any format `chatsmith rm` reads")
    er.add_argument("--skip-bad", action="store_true", help="drop malformed records and count them")
    er.add_argument("--limit", type=int, default=None, help="the first N records only")
    er.add_argument("--max-length", type=int, default=None, help="tokens per prompt+answer, the prompt's start cut "
                    "first (default: the length the reward model was trained with)")
    out_flag(er)

    ec = esub.add_parser("rm-compare", help="models answer the same prompts; a reward model scores them: mean "
                         "reward and win/tie/loss with intervals", epilog=EXAMPLES["eval"], formatter_class=fmt)
    _compare_flags(ec)
    out_flag(ec)

    ej = esub.add_parser("judge", help="LLM-as-judge on MT-bench-format questions: 1-10 grades or pairwise "
                         "against a baseline (both orders)", epilog=EXAMPLES["eval"], formatter_class=fmt)
    ej.add_argument("model", help="the model to evaluate")
    ej.add_argument("--baseline", default=None, help="compare against this model (pairwise mode)")
    ej.add_argument("--questions", required=True, help="FastChat question.jsonl (MT-bench, Vicuna-bench)")
    ej.add_argument("--judge-url", default=os.environ.get("CHATSMITH_JUDGE_URL"),
                    help="the judge's OpenAI-compatible base URL, e.g. http://127.0.0.1:8001/v1 (or $CHATSMITH_JUDGE_URL)")
    ej.add_argument("--judge-model", default=os.environ.get("CHATSMITH_JUDGE_MODEL"),
                    help="the judge's model name (or $CHATSMITH_JUDGE_MODEL)")
    ej.add_argument("--judge-api-key", default=None, help="the judge's key (prefer $CHATSMITH_JUDGE_API_KEY or "
                    "$OPENAI_API_KEY: a flag is visible to `ps`)")
    ej.add_argument("--mode", default=None, choices=["single", "pairwise"],
                    help="single: 1-10 grades; pairwise: against --baseline (default: pairwise with a baseline)")
    ej.add_argument("--judge-prompts", default=None, help="a folder of prompt files that replace the defaults "
                    "(single.txt, single_reference.txt, pair.txt, pair_reference.txt)")
    ej.add_argument("--concurrency", type=int, default=4, help="judge requests in flight (default 4)")
    ej.add_argument("--retries", type=int, default=3, help="transport retries with backoff (default 3)")
    ej.add_argument("--parse-retries", type=int, default=2, help="asks again when no verdict parses (default 2)")
    ej.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request (default 120)")
    ej.add_argument("--temperature", type=float, default=0.0, help="answer sampling temperature (default 0: greedy)")
    ej.add_argument("--max-new-tokens", type=int, default=256)
    ej.add_argument("--seed", type=int, default=0)
    ej.add_argument("--system", default=None, help="system prompt for the answers")
    ej.add_argument("--template", default=None, help="chat template (default: the model's own)")
    ej.add_argument("--precision", default="auto", choices=PRECISION_CHOICES, help=PRECISION_HELP)
    ej.add_argument("--limit", type=int, default=None, help="the first N questions only")
    out_flag(ej, required=True)

    ecm = esub.add_parser("compare", help="two results folders side by side in the terminal", epilog=EXAMPLES["eval"],
                          formatter_class=fmt)
    ecm.add_argument("a", help="a results folder of `chatsmith eval ... --output`")
    ecm.add_argument("b", help="another one")

    x = sub.add_parser("export", help="merge adapters and write HF, GGUF or Ollama with the chat template, "
                       "checked by round trip", epilog=EXAMPLES["export"], formatter_class=fmt)
    x.add_argument("model", help="run directory, adapter directory, HF directory, .gguf file or alias")
    x.add_argument("--to", required=True, choices=["hf", "gguf", "ollama"])
    x.add_argument("--quant", default=None, help="hf: f32 (default), f16, bf16; gguf/ollama: f32, f16 (gguf default), "
                   "bf16, q8_0 (ollama default), q4_0, q4_1. K-quants: run llama.cpp's llama-quantize on an f16 file")
    x.add_argument("--output", required=True, help="hf/ollama: a directory; gguf: a .gguf file or a directory")
    x.add_argument("--no-verify", action="store_true", help="skip the round-trip check after writing a GGUF")
    x.add_argument("--template", default=None, help="chat template (default: the one the model or run trained with)")
    x.add_argument("--system", default=None, help="system prompt for the Modelfile (default: the run's)")
    x.add_argument("--pre-tokenizer", default=None, help="llama.cpp pre-tokenizer name to write when chatsmith does "
                   "not recognise the tokenizer's (see docs/export.md)")
    x.add_argument("--trust-remote-code", action="store_true")

    vo = sub.add_parser("vocab", help="grow the vocabulary from a corpus, or prune it to what a corpus uses",
                        epilog=EXAMPLES["vocab"], formatter_class=fmt)
    vsub = vo.add_subparsers(dest="vocab_command", metavar="VOCAB_COMMAND")
    ve = vsub.add_parser("extend", help="learn N new BPE tokens from a corpus; new embeddings start at the mean of "
                         "the tokens they replace", epilog=EXAMPLES["vocab"], formatter_class=fmt)
    vp = vsub.add_parser("prune", help="keep only the tokens a corpus uses (plus specials and bytes); remap the "
                         "embeddings and LM head", epilog=EXAMPLES["vocab"], formatter_class=fmt)
    for v in (ve, vp):
        v.add_argument("--model", required=True, help="alias, HF directory, run directory or .gguf file")
        v.add_argument("--corpus", required=True, nargs="+", help="text files (whole file) or chat datasets (every "
                       "message)")
        v.add_argument("--output", required=True, help="directory for the new model")
    ve.add_argument("--add", type=int, required=True, help="how many tokens to learn")
    ve.add_argument("--heldout", type=float, default=0.1, help="fraction of the corpus texts (the last ones) kept out "
                    "of learning to measure the gain (default 0.1)")

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
    c.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                    help=PRECISION_HELP)
    c.add_argument("--trust-remote-code", action="store_true")
    c.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="prefill the whole conversation every turn; by default each turn prefills only what is "
                        "new and reuses the KV cache of the earlier turns")
    c.add_argument("--threads", type=int, default=None, metavar="N",
                   help="the engine's threads; by default all of torch's (OMP_NUM_THREADS, else the cores), with the "
                        "engine moving to 1 thread while that measures faster (a machine other work keeps busy) and "
                        "back; a number fixes the count")
    _add_memory_flags(c)
    c.add_argument("--kb", default=None, metavar="KB", help="answer from this knowledge base (`chatsmith kb add`) "
                   "with numbered citations; the sources are listed after each answer")
    c.add_argument("--kb-top-k", type=int, default=5, help="sources retrieved per question (default 5)")

    sv = sub.add_parser("serve", help="OpenAI-compatible API server and web chat page", epilog=SERVE_EXAMPLES,
                        formatter_class=fmt)
    sv.add_argument("model", help="alias, HF directory, run directory, adapter directory, .gguf file or hub id")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API routes (visible "
                    "to `ps`: prefer CHATSMITH_API_KEY or --api-key-file)")
    sv.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    sv.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                    help="a Host header name the server answers to (repeatable; on loopback only loopback names "
                         "are answered unless added here)")
    sv.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body; larger gets 413 (default 4)")
    sv.add_argument("--max-connections", type=int, default=256, help="open connections at most (default 256)")
    sv.add_argument("--header-timeout", type=float, default=10.0,
                    help="seconds a connection may take to send a request's head before it is closed (default 10)")
    sv.add_argument("--max-concurrency", type=int, default=16, help="sequences decoded together (KV cache slots)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429")
    sv.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                    help="serve a LoRA adapter under the model name NAME (repeatable)")
    sv.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                    help=PRECISION_HELP)
    sv.add_argument("--kv-cache-mb", type=float, default=2048, help="KV cache budget shared by all slots")
    sv.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                    help="prefill every prompt whole; by default a prompt that starts like an earlier or running "
                         "one (a system prompt, a chat's earlier turns) reuses its KV cache and prefills only the "
                         "rest (equal to float rounding, not bit for bit)")
    sv.add_argument("--threads", type=int, default=None, metavar="N",
                    help="the engine's threads; by default all of torch's (OMP_NUM_THREADS, else the cores), with the "
                         "engine moving to 1 thread while that measures faster (a machine other work keeps busy) and "
                         "back; a number fixes the count")
    sv.add_argument("--engine", default="builtin", choices=["builtin", "vllm"],
                    help="builtin: chatsmith's engine (CPU or GPU); vllm: vLLM on a CUDA GPU (pip install "
                         "'chatsmith[vllm]'; no tools/json_schema constraints; --precision and --kv-cache-mb "
                         "are then vLLM's own)")
    sv.add_argument("--served-name", default=None, help="model name the API reports (default: MODEL)")
    sv.add_argument("--template", default=None, help="chat template (default: the model's own)")
    sv.add_argument("--trust-remote-code", action="store_true")
    _add_memory_flags(sv)
    sv.add_argument("--kb", default=None, metavar="KB", help="answer from this knowledge base (`chatsmith kb add`) "
                    "with numbered citations; a request's \"kb\": false turns it off, {\"top_k\": N} sets the count")
    sv.add_argument("--kb-top-k", type=int, default=5, help="sources retrieved per question (default 5)")
    sv.add_argument("--cache", nargs="?", const=DEFAULT_CACHE, default=None, metavar="PATH",
                    help="cache deterministic answers (temperature 0 or a seed) in this SQLite file, kept across "
                         f"restarts (default PATH: {DEFAULT_CACHE})")
    sv.add_argument("--cache-semantic", action="store_true", help="also answer a close paraphrase (same system "
                    "prompt and earlier turns) from the cache, after the guard (negation, numbers, names, quotes)")
    sv.add_argument("--cache-threshold", type=float, default=None,
                    help="cosine similarity a paraphrase needs (default 0.80)")
    sv.add_argument("--cache-ttl", type=float, default=None, metavar="SECONDS", help="entries expire after this long")
    sv.add_argument("--cache-max-entries", type=int, default=10000, help="least recently used entries are evicted "
                    "past this many (default 10000)")
    sv.add_argument("--moderation", default=None, metavar="SPEC", help="gate requests and answers: a rules file "
                    "(.yaml/.json: categories of keywords and regexes) or a classifier directory (a `chatsmith rm` "
                    "model or a sequence classifier), optionally DIR@THRESHOLD; flagged ones end with content_filter")

    lb = sub.add_parser("label", help="a local page to rank K sampled answers per prompt (drag or keys 1-K, ties, "
                        "skip, edit the best); saves rankings for `rm`/`dpo --loss rrhf` and pairs for `dpo`",
                        epilog=EXAMPLES["label"], formatter_class=fmt)
    lb.add_argument("--prompts", required=True, help="a .txt file (one prompt a line), prompt records (JSON, JSONL, CSV, "
                    "Parquet with a 'prompt'), or builtin")
    lb.add_argument("--model", required=True, help="the model whose answers are ranked (alias, run directory, ...)")
    lb.add_argument("--k", type=int, default=4, help="answers per prompt (default 4)")
    lb.add_argument("--output", required=True, help="rankings JSONL; pairs go to OUTPUT's name + .pairs.jsonl")
    lb.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8; must be > 0)")
    lb.add_argument("--max-new-tokens", type=int, default=256)
    lb.add_argument("--seed", type=int, default=0)
    lb.add_argument("--template", default=None, help="chat template (default: the model's own)")
    lb.add_argument("--precision", default="auto", choices=PRECISION_CHOICES, help=PRECISION_HELP)
    lb.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    lb.add_argument("--host", default="127.0.0.1")
    lb.add_argument("--port", type=int, default=8010)
    lb.add_argument("--open", action="store_true", help="open the page in the default browser")

    q = sub.add_parser("quickstart", help="teach the embedded model a new identity and show before/after",
                       formatter_class=fmt)
    q.add_argument("--name", default="Smithy", help="the assistant's new name")
    q.add_argument("--maker", default="the chatsmith project", help="who made it")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--output", default="runs/quickstart")
    q.add_argument("--max-steps", type=int, default=None, help="override the number of training steps")
    q.add_argument("--seed", type=int, default=0)
    return p


def _teacher_flags(p: argparse.ArgumentParser, concurrency: int = 4) -> None:
    p.add_argument("--teacher-url", default=os.environ.get("CHATSMITH_TEACHER_URL"),
                   help="the teacher's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 for `chatsmith serve` "
                        "(or $CHATSMITH_TEACHER_URL)")
    p.add_argument("--teacher-model", default=os.environ.get("CHATSMITH_TEACHER_MODEL"),
                   help="the teacher's model name (or $CHATSMITH_TEACHER_MODEL)")
    p.add_argument("--teacher-api-key", default=None, help="the teacher's key (prefer $CHATSMITH_TEACHER_API_KEY or "
                   "$OPENAI_API_KEY: a flag is visible to `ps`)")
    p.add_argument("--teacher-api", default="chat", choices=["chat", "completions"],
                   help="the endpoint: /chat/completions (default) or /completions")
    p.add_argument("--concurrency", type=int, default=concurrency, help=f"requests in flight at once (default {concurrency})")
    p.add_argument("--retries", type=int, default=5, help="retries on 429, 5xx, timeouts, with backoff (default 5)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--price-in", type=float, default=None, help="price per million prompt tokens, for the cost estimate")
    p.add_argument("--price-out", type=float, default=None, help="price per million completion tokens")
    p.add_argument("--journal", default=None, help="the journal of answers (default: OUTPUT's name + .journal.jsonl); "
                   "a rerun of the same command replays it and pays only for what is missing")


def _teacher_settings(args: argparse.Namespace) -> Any:
    from chatsmith.datagen.teacher import TeacherSettings

    if not args.teacher_url or not args.teacher_model:
        raise ChatsmithError("this command needs --teacher-url (an OpenAI-compatible base URL such as "
                             "http://127.0.0.1:8000/v1) and --teacher-model (or $CHATSMITH_TEACHER_URL and "
                             "$CHATSMITH_TEACHER_MODEL)")
    return TeacherSettings(url=args.teacher_url, model=args.teacher_model, api_key=args.teacher_api_key,
                           api=args.teacher_api, concurrency=args.concurrency, max_retries=args.retries,
                           timeout=args.timeout, price_in=args.price_in, price_out=args.price_out)


def _datagen_parsers(dsub: Any, fmt: Any) -> None:
    si = dsub.add_parser("self-instruct", help="new instructions, inputs and outputs from seed tasks and a teacher "
                         "(Alpaca's self-instruct)", epilog=EXAMPLES["datagen"], formatter_class=fmt)
    si.add_argument("--seeds", required=True, help="self-instruct seed tasks (JSONL), Alpaca records, a JSON list of "
                    "strings or a .txt file with one instruction per line")
    si.add_argument("--n", type=int, required=True, help="Alpaca records to write")
    si.add_argument("--output", required=True, help="JSONL of Alpaca records with provenance")
    _teacher_flags(si)
    si.add_argument("--seed", type=int, default=0, help="which examples each prompt shows (default 0)")
    si.add_argument("--tasks-per-request", type=int, default=20, help="'List of N tasks' (default 20)")
    si.add_argument("--seed-tasks-in-prompt", type=int, default=3, help="seed tasks shown per request (default 3)")
    si.add_argument("--machine-tasks-in-prompt", type=int, default=2,
                    help="tasks made earlier in the run shown per request (default 2)")
    si.add_argument("--rouge-threshold", type=float, default=0.7,
                    help="drop an instruction whose ROUGE-L F1 with any pool instruction is above this (default 0.7)")
    si.add_argument("--temperature", type=float, default=1.0, help="for instruction requests (default 1.0)")
    si.add_argument("--max-tokens", type=int, default=1024, help="per instruction request (default 1024)")
    si.add_argument("--instance-max-tokens", type=int, default=512, help="per input/output request (default 512)")
    si.add_argument("--parse-retries", type=int, default=2, help="asks again after an unusable answer (default 2)")
    si.add_argument("--any-language", action="store_true", help="keep instructions that start with a non-ASCII "
                    "character (Alpaca drops them)")
    sc = dsub.add_parser("self-chat", help="multi-turn dialogues: the teacher plays both the user and the assistant "
                         "(Baize)", epilog=EXAMPLES["datagen"], formatter_class=fmt)
    sc.add_argument("--seeds", required=True, help="seed questions: a .txt file (one a line), a JSON list of strings, "
                    "Alpaca or self-instruct records, ShareGPT/messages records (their first user turn)")
    sc.add_argument("--output", required=True, help="JSONL of ShareGPT records with provenance")
    sc.add_argument("--turns", type=int, default=4, help="assistant answers per dialogue at most (default 4)")
    sc.add_argument("--n", type=int, default=None, help="dialogues (default: one per seed; seeds are reused beyond that)")
    _teacher_flags(sc)
    sc.add_argument("--temperature", type=float, default=0.7)
    sc.add_argument("--max-tokens", type=int, default=512, help="per turn (default 512)")
    sc.add_argument("--parse-retries", type=int, default=2, help="asks again after an empty or refused turn (default 2)")
    sc.add_argument("--seed", type=int, default=0, help="dialogue i asks with seed + i (default 0)")


def _data_tool_parsers(dsub: Any, fmt: Any) -> None:
    ex = EXAMPLES["data_tools"]
    mx = dsub.add_parser("mix", help="mix files by ratio or record count, seeded and shuffled (streams)", epilog=ex,
                         formatter_class=fmt)
    mx.add_argument("sources", nargs="+", metavar="FILE[:N]", help="FILE:RATIO (like --data a.json:0.7), or FILE:COUNT "
                    "with --counts; a source without a number has ratio 1")
    mx.add_argument("--output", required=True, help=".jsonl or .json")
    mx.add_argument("--counts", action="store_true", help="the numbers are record counts, not ratios")
    mx.add_argument("--total", type=int, default=None, help="records in the mixture (ratios only; default: as many as "
                    "all sources together)")
    mx.add_argument("--seed", type=int, default=0)
    mx.add_argument("--no-shuffle", action="store_true", help="keep the sources in order, one after the other")
    mx.add_argument("--tag-source", action="store_true", help="add a 'source' field naming each record's file")
    dd = dsub.add_parser("dedupe", help="drop exact and (--near) MinHash-LSH near duplicates (streams)", epilog=ex,
                         formatter_class=fmt)
    dd.add_argument("input")
    dd.add_argument("--output", required=True)
    dd.add_argument("--near", action="store_true", help="also drop near duplicates (MinHash LSH)")
    dd.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of word 3-grams (default 0.8)")
    dd.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    dd.add_argument("--ngram", type=int, default=3, help="words per shingle (default 3)")
    dd.add_argument("--removed", default=None, help="also write the dropped records here")
    sp = dsub.add_parser("split", help="train/valid/test files, seeded (streams)", epilog=ex, formatter_class=fmt)
    sp.add_argument("input")
    sp.add_argument("--output-dir", required=True, help="train/valid/test.jsonl (or .json) are written here")
    sp.add_argument("--test-size", type=float, required=True, help="a fraction (below 1) or a record count")
    sp.add_argument("--valid-size", type=float, default=0.0, help="a fraction or a count (default none)")
    sp.add_argument("--seed", type=int, default=0)
    sa = dsub.add_parser("sample", help="a uniform random sample, in file order (streams)", epilog=ex,
                         formatter_class=fmt)
    sa.add_argument("input")
    sa.add_argument("--output", required=True)
    sa.add_argument("--n", type=float, required=True, help="records to keep, or a fraction when below 1")
    sa.add_argument("--seed", type=int, default=0)
    fl = dsub.add_parser("filter", help="keep records by token length, language, regex or a teacher's quality score "
                         "(streams)", epilog=ex, formatter_class=fmt)
    fl.add_argument("input")
    fl.add_argument("--output", required=True)
    fl.add_argument("--model", default=None, help="the tokenizer (and chat template) that --min/--max-tokens count with")
    fl.add_argument("--template", default=None, help="chat template (default: the model's own)")
    fl.add_argument("--max-tokens", type=int, default=None, help="drop conversations longer than this, as rendered")
    fl.add_argument("--min-tokens", type=int, default=None)
    fl.add_argument("--lang", default=None, help="keep these languages, comma-separated ISO codes (en,fr,de,es,it,pt,nl,"
                    "ru,uk,zh,ja,ko,ar,hi,el,he,th)")
    fl.add_argument("--drop-regex", default=None, help="drop records whose text matches this regular expression")
    fl.add_argument("--keep-regex", default=None, help="keep only records whose text matches this")
    fl.add_argument("--quality-threshold", type=float, default=None, help="keep records a teacher scores at least this "
                    "(1-10); needs --teacher-url and --teacher-model")
    fl.add_argument("--rejected", default=None, help="also write the dropped records, with the reason, here")
    _teacher_flags(fl)
    tr = dsub.add_parser("translate", help="translate every text of every record through a teacher, keeping the format",
                         epilog=ex, formatter_class=fmt)
    tr.add_argument("input")
    tr.add_argument("--to", required=True, dest="language", help="the target language, in words (Korean, German...)")
    tr.add_argument("--output", required=True)
    tr.add_argument("--parse-retries", type=int, default=2, help="asks again after an empty or refused answer")
    _teacher_flags(tr)
    cl = dsub.add_parser("clean", help="FastChat-style ShareGPT cleaning: HTML to Markdown, empty and broken turns, "
                         "split conversations longer than --max-length (streams)", epilog=ex, formatter_class=fmt)
    cl.add_argument("input")
    cl.add_argument("--output", required=True)
    cl.add_argument("--model", default=None, help="the tokenizer and template --max-length counts with")
    cl.add_argument("--max-length", type=int, default=None, help="split longer conversations at exchange boundaries")
    cl.add_argument("--template", default=None)
    cl.add_argument("--blocked-words", default="", help="drop conversations containing any of these, comma-separated "
                    "(FastChat used openai,chatgpt)")
    for p in (mx, dd, sp, sa, fl, tr, cl):
        p.add_argument("--skip-bad", action="store_true", help="drop unreadable records instead of stopping")


def _kb_parser(sub: argparse._SubParsersAction, fmt: type) -> None:
    kb = sub.add_parser("kb", help="a local knowledge base: ingest documents, hybrid BM25 + vector search",
                        epilog=EXAMPLES["kb"], formatter_class=fmt)
    ksub = kb.add_subparsers(dest="kb_command", metavar="KB_COMMAND")
    ka = ksub.add_parser("add", help="ingest files and folders (text, Markdown, HTML, PDF, code); a re-run reads "
                         "only new or changed files and drops deleted ones", epilog=EXAMPLES["kb"], formatter_class=fmt)
    ka.add_argument("kb", metavar="KB", help="the knowledge-base file (created when missing), e.g. docs.kb")
    ka.add_argument("paths", nargs="+", metavar="PATH", help="files and folders")
    ka.add_argument("--chunk-tokens", type=int, default=200, help="tokens per chunk at most (default 200)")
    ka.add_argument("--overlap", type=int, default=30, help="tokens a chunk repeats from the one before (default 30)")
    ka.add_argument("--embedding-model", default=None, help="a sentence-transformers model (directory, or hub id "
                    "when online) for a new KB (default: the packaged all-MiniLM-L6-v2)")
    ka.add_argument("--quiet", action="store_true", help="no progress bar")
    kq = ksub.add_parser("query", help="ranked chunks for a question, with source, heading path and both scores",
                         epilog=EXAMPLES["kb"], formatter_class=fmt)
    kq.add_argument("kb", metavar="KB")
    kq.add_argument("question")
    kq.add_argument("-k", "--top-k", type=int, default=5, help="chunks to show (default 5)")
    kq.add_argument("--mode", default="hybrid", choices=["hybrid", "bm25", "vector"],
                    help="hybrid: BM25 and vectors fused by reciprocal rank (default)")
    kq.add_argument("--json", action="store_true", help="print JSON")
    kl = ksub.add_parser("list", help="documents and their chunk counts", formatter_class=fmt)
    kl.add_argument("kb", metavar="KB")
    kr = ksub.add_parser("remove", help="remove documents (a file, or everything under a folder)", formatter_class=fmt)
    kr.add_argument("kb", metavar="KB")
    kr.add_argument("paths", nargs="+", metavar="PATH")
    ks = ksub.add_parser("stats", help="documents, chunks, tokens, size on disk", formatter_class=fmt)
    ks.add_argument("kb", metavar="KB")
    ks.add_argument("--json", action="store_true")


def _run_kb(args: argparse.Namespace) -> int:
    from chatsmith.kb import commands

    cmd = args.kb_command
    if cmd == "add":
        return commands.run_add(args.kb, args.paths, chunk_tokens=args.chunk_tokens, overlap=args.overlap,
                                model=args.embedding_model, quiet=args.quiet)
    if cmd == "query":
        return commands.run_query(args.kb, args.question, k=args.top_k, mode=args.mode, as_json=args.json)
    if cmd == "list":
        return commands.run_list(args.kb)
    if cmd == "remove":
        return commands.run_remove(args.kb, args.paths)
    if cmd == "stats":
        return commands.run_stats(args.kb, as_json=args.json)
    _parser().parse_args(["kb", "--help"])
    return 2


def _compare_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("reward_model", help="a `chatsmith rm` run directory")
    p.add_argument("--models", nargs="+", required=True, help="models to compare, the first is the baseline "
                   "(aliases, run directories...)")
    p.add_argument("--prompts", default="builtin", help="a .txt file (one prompt a line), a prompt file (records "
                   "with a 'prompt'), or builtin: held-out demo questions")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0, help="with a temperature, prompt i samples with seed + i")
    p.add_argument("--tie-margin", type=float, default=0.0, help="rewards closer than this are a tie (default 0)")
    p.add_argument("--limit", type=int, default=None, help="the first N prompts only")


PLAN_EXAMPLES = """examples:
  chatsmith plan --model smollm2-135m --method full                      this CPU: does full SFT fit in RAM?
  chatsmith plan --model meta-llama/Llama-3.1-8B --method lora --gpu RTX4090 --seq-len 2048
  chatsmith plan --model ./my-model --stage dpo --method full --gpus 8 --gpu A100-80GB --strategy zero3
  chatsmith plan --model model.gguf --stage grpo --group-size 8 --max-new-tokens 512 --memory 24 --json
"""


def _plan_flags(p: argparse.ArgumentParser) -> None:
    from chatsmith.planner import GPU_NAMES, PLAN_METHODS, STAGES, STRATEGIES

    p.add_argument("--model", required=True, help="alias, HF directory, run or adapter directory, .gguf file or hub "
                   "id (only its config is read; a hub id needs the network)")
    p.add_argument("--stage", default="sft", choices=STAGES, help="training stage (default sft)")
    p.add_argument("--method", default="lora", choices=PLAN_METHODS, help="what trains (default lora)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per example; grpo/ppo: prompt tokens (default 1024)")
    p.add_argument("--batch", type=int, default=4, help="examples (dpo: pairs, grpo: prompts) per micro-batch (default 4)")
    p.add_argument("--gpu", choices=GPU_NAMES, help="plan for this GPU (default: this machine's CPU and RAM)")
    p.add_argument("--memory", type=float, help="memory per device in GB instead of the GPU's own")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (processes) the run uses (default 1)")
    p.add_argument("--strategy", default="ddp", choices=STRATEGIES, help="how several GPUs share the model (default ddp)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="plan with activation recomputation")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-targets", default="all-linear", help="all-linear or a comma list such as q_proj,v_proj")
    p.add_argument("--freeze-trainable-layers", type=int, default=2, help="--method freeze: trained blocks (default 2)")
    p.add_argument("--group-size", type=int, default=8, help="grpo: completions per prompt (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="grpo/ppo: tokens per completion (default 256)")
    p.add_argument("--utilisation", type=float, default=0.4, help="share of peak FLOP/s and bandwidth assumed for the "
                   "speed estimate (default 0.4)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _run_plan(args: argparse.Namespace) -> int:
    from chatsmith.planner import estimate, fit_table, read_config, render, to_json

    config = read_config(args.model)
    kw = dict(stage=args.stage, method=args.method, seq_len=args.seq_len, batch=args.batch, gpus=args.gpus,
              strategy=args.strategy, gradient_checkpointing=args.gradient_checkpointing, lora_r=args.lora_r,
              lora_targets=args.lora_targets, freeze_layers=args.freeze_trainable_layers,
              group_size=args.group_size, max_new_tokens=args.max_new_tokens, utilisation=args.utilisation)
    e = estimate(args.model, gpu=args.gpu, memory_gb=args.memory, config=config, **kw)
    if args.json:
        print(to_json(e))
        return 0
    render(e, None if args.memory else fit_table(args.model, config=config, **kw))
    return 0


def _mapping(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    from chatsmith.config import _parse_mapping

    return _parse_mapping(text)


def _run(args: argparse.Namespace) -> int:
    if args.command == "plan":
        return _run_plan(args)
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
            from chatsmith.data.writers import convert

            print(convert(args.input, args.output, args.to, format=args.format, columns=_mapping(args.columns),
                          skip_bad=args.skip_bad))
            return 0
        if args.data_command in DATAGEN_COMMANDS:
            return _run_datagen(args)
        if args.data_command in DATA_TOOLS:
            return _run_data_tool(args)
        _parser().parse_args(["data", "--help"])
        return 2
    if args.command in TRAIN_STAGES and getattr(args, "rm_command", None) is None:
        import importlib

        import chatsmith.config as config_module
        from chatsmith.train.launch import FLAGS, launch

        launched = launch(args, args.argv)
        if launched is not None:
            return launched
        cls_name, module, function, _ = TRAIN_STAGES[args.command]
        overrides = {k: v for k, v in vars(args).items()
                     if k not in ("command", "config", "rm_command", "argv", *FLAGS.values())}
        cfg = config_module.load_config(getattr(config_module, cls_name), args.config, overrides)
        getattr(importlib.import_module(module), function)(cfg)
        return 0
    if args.command == "rm":
        if args.rm_command == "score":
            from chatsmith.models.reward import load_reward_model

            if len(args.prompt) != len(args.response):
                raise ChatsmithError("pass one --response for each --prompt")
            rm = load_reward_model(args.reward_model)
            for p, resp, sc in zip(args.prompt, args.response, rm.score(args.prompt, args.response), strict=True):
                print(f"{sc:+.4f}\t{p!r} -> {resp!r}")
            return 0
        if args.rm_command == "compare":
            _rm_compare(args)
            return 0
    if args.command == "eval":
        return _run_eval(args)
    if args.command == "kb":
        return _run_kb(args)
    if args.command == "export":
        from chatsmith.export import export_model, print_result

        print_result(export_model(args.model, args.to, args.output, quant=args.quant, verify=not args.no_verify,
                                  template=args.template, system_prompt=args.system, pre_tokenizer=args.pre_tokenizer,
                                  trust_remote_code=args.trust_remote_code))
        return 0
    if args.command == "vocab":
        from chatsmith import vocab

        if args.vocab_command == "extend":
            r = vocab.extend_vocab(args.model, args.corpus, args.add, args.output, heldout_fraction=args.heldout)
            st = r.stats
            print(f"{r.old_size} -> {r.new_size} tokens; held-out text: {st['heldout_tokens_before']} -> "
                  f"{st['heldout_tokens_after']} tokens ({st['fewer_tokens']:.1%} fewer)")
            print("new tokens, first 20: " + ", ".join(repr(t) for t in r.new_tokens[:20]))
        elif args.vocab_command == "prune":
            r = vocab.prune_vocab(args.model, args.corpus, args.output)
            print(f"{r.old_size} -> {r.new_size} tokens ({r.stats['removed']} removed)")
        else:
            _parser().parse_args(["vocab", "--help"])
            return 2
        print(f"wrote {r.output} (train it: chatsmith sft --model {r.output} ...)")
        return 0
    if args.command == "chat":
        from chatsmith.chat import run_chat
        from chatsmith.infer.sampling import SamplingParams

        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                                seed=args.seed)
        params.validate()
        return run_chat(args.model, prompt=args.prompt, system=args.system, params=params, template=args.template,
                        trust_remote_code=args.trust_remote_code, precision=args.precision, kb=args.kb,
                        kb_top_k=args.kb_top_k, max_memory=args.max_memory, quantization=_quantization(args),
                        prefix_cache=args.prefix_cache, threads=_threads(args))
    if args.command == "serve":
        from chatsmith.serve.app import run_server

        loras = {}
        for item in args.lora:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ChatsmithError(f"--lora expects NAME=PATH, got '{item}'")
            loras[name] = path
        return run_server(args.model, host=args.host, port=args.port, api_key=_api_key(args),
                          max_concurrency=args.max_concurrency, loras=loras, precision=args.precision,
                          kv_cache_mb=args.kv_cache_mb, max_queue=args.max_queue, served_name=args.served_name,
                          template=args.template, trust_remote_code=args.trust_remote_code,
                          allowed_hosts=args.allowed_host, max_body_mb=args.max_body_mb,
                          header_timeout=args.header_timeout, max_connections=args.max_connections,
                          cache=_cache_options(args), kb=args.kb, kb_top_k=args.kb_top_k,
                          moderation=args.moderation, engine=args.engine, max_memory=args.max_memory,
                          quantization=_quantization(args), prefix_cache=args.prefix_cache,
                          threads=_threads(args))
    if args.command == "label":
        from chatsmith.datagen.label import LabelSettings, run_label

        settings = LabelSettings(model=args.model, k=args.k, temperature=args.temperature,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed, template=args.template,
                                 precision=args.precision)
        return run_label(args.prompts, args.output, settings, host=args.host, port=args.port, limit=args.limit,
                         open_browser=args.open)
    if args.command == "quickstart":
        from chatsmith.quickstart import run_quickstart

        return run_quickstart(name=args.name, maker=args.maker, model=args.model, output=args.output,
                              max_steps=args.max_steps, seed=args.seed)
    _parser().print_help()
    return 2


def _rm_compare(args: argparse.Namespace) -> None:
    from chatsmith.eval.rm_compare import compare_models

    compare_models(args.reward_model, args.models, prompts=args.prompts, temperature=args.temperature,
                   max_new_tokens=args.max_new_tokens, seed=args.seed, limit=args.limit, tie_margin=args.tie_margin,
                   output=args.output, json_path=getattr(args, "json", None))


def _run_eval(args: argparse.Namespace) -> int:
    cmd = args.eval_command
    if cmd == "ppl":
        from chatsmith.eval.runs import run_ppl

        run_ppl(args.models, args.data, all_tokens=args.all_tokens, template=args.template, max_length=args.max_length,
                format=args.format, columns=_mapping(args.columns), skip_bad=args.skip_bad, limit=args.limit,
                output=args.output)
        return 0
    if cmd == "tasks":
        from chatsmith.eval.runs import run_tasks

        run_tasks(args.models, args.data, shots=args.shots, match=args.match, system=args.system,
                  template=args.template, max_new_tokens=args.max_new_tokens, columns=_mapping(args.columns),
                  limit=args.limit, precision=args.precision, shots_from=args.shots_from, output=args.output)
        return 0
    if cmd == "rm":
        from chatsmith.eval.runs import run_rm_eval

        run_rm_eval(args.reward_model, args.data, skip_bad=args.skip_bad, limit=args.limit, max_length=args.max_length,
                    output=args.output)
        return 0
    if cmd == "rm-compare":
        _rm_compare(args)
        return 0
    if cmd == "judge":
        from chatsmith.eval.judge import AnswerSettings, JudgeSettings, print_summary, run_judge

        if not args.judge_url or not args.judge_model:
            raise ChatsmithError("eval judge needs --judge-url (an OpenAI-compatible base URL) and --judge-model "
                                 "(or $CHATSMITH_JUDGE_URL and $CHATSMITH_JUDGE_MODEL)")
        judge = JudgeSettings(url=args.judge_url, model=args.judge_model, api_key=args.judge_api_key,
                              concurrency=args.concurrency, max_retries=args.retries, parse_retries=args.parse_retries,
                              timeout=args.timeout, prompts_dir=args.judge_prompts)
        settings = AnswerSettings(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                  system=args.system, template=args.template, precision=args.precision)
        summary = run_judge(args.model, args.questions, args.output, judge, baseline=args.baseline, mode=args.mode,
                            settings=settings, limit=args.limit)
        print_summary(summary)
        print(f"report: {args.output}/report.html")
        return 0
    if cmd == "compare":
        from chatsmith.eval.report import print_compare

        print_compare(args.a, args.b)
        return 0
    _parser().parse_args(["eval", "--help"])
    return 2


DATAGEN_COMMANDS = ("self-instruct", "self-chat")


def _run_datagen(args: argparse.Namespace) -> int:
    import json

    cmd = args.data_command
    if cmd == "self-instruct":
        from chatsmith.datagen.self_instruct import SelfInstructSettings, run_self_instruct

        settings = SelfInstructSettings(
            n=args.n, seed=args.seed, seed_tasks_in_prompt=args.seed_tasks_in_prompt,
            machine_tasks_in_prompt=args.machine_tasks_in_prompt, tasks_per_request=args.tasks_per_request,
            rouge_threshold=args.rouge_threshold, temperature=args.temperature, max_tokens=args.max_tokens,
            instance_max_tokens=args.instance_max_tokens, parse_retries=args.parse_retries,
            english_only=not args.any_language)
        summary = run_self_instruct(args.seeds, args.output, _teacher_settings(args), settings, journal=args.journal)
        print(json.dumps({k: summary[k] for k in ("written", "proposed", "kept", "rejected", "stopped")}))
        return 0 if summary["written"] >= args.n else 1
    if cmd == "self-chat":
        from chatsmith.datagen.self_chat import SelfChatSettings, run_self_chat

        chat = SelfChatSettings(n=args.n, turns=args.turns, temperature=args.temperature, max_tokens=args.max_tokens,
                                parse_retries=args.parse_retries, seed=args.seed)
        summary = run_self_chat(args.seeds, args.output, _teacher_settings(args), chat, journal=args.journal)
        print(json.dumps({k: summary[k] for k in ("written", "n", "rejected", "stops")}))
        return 0 if summary["written"] else 1
    return 2


DATA_TOOLS = ("mix", "dedupe", "split", "sample", "filter", "translate", "clean")


def _run_data_tool(args: argparse.Namespace) -> int:
    import json

    cmd = args.data_command
    if cmd == "mix":
        from chatsmith.data.ops.select import mix

        sources = []
        for spec in args.sources:
            path, number = spec, None
            if not os.path.exists(spec) and ":" in spec:
                head, tail = spec.rsplit(":", 1)
                try:
                    path, number = head, float(tail)
                except ValueError:
                    raise ChatsmithError(f"data mix {spec}: '{tail}' is not a number (FILE:RATIO or FILE:COUNT)") from None
            sources.append((path, number))
        result = mix(sources, args.output, counts=args.counts, total=args.total, seed=args.seed,
                     shuffle=not args.no_shuffle, tag_source=args.tag_source, skip_bad=args.skip_bad)
    elif cmd == "dedupe":
        from chatsmith.data.ops.dedupe import dedupe

        result = dedupe(args.input, args.output, near=args.near, threshold=args.threshold, num_perm=args.num_perm,
                        ngram=args.ngram, skip_bad=args.skip_bad, removed_path=args.removed)
    elif cmd == "split":
        from chatsmith.data.ops.select import split

        result = split(args.input, args.output_dir, test=args.test_size, valid=args.valid_size, seed=args.seed,
                       skip_bad=args.skip_bad)
    elif cmd == "sample":
        from chatsmith.data.ops.select import sample

        result = sample(args.input, args.output, n=args.n, seed=args.seed, skip_bad=args.skip_bad)
    elif cmd == "filter":
        result = _run_filter(args)
    elif cmd == "translate":
        from chatsmith.datagen.self_instruct import journal_path
        from chatsmith.datagen.teacher import Journal, Teacher, usage_line
        from chatsmith.datagen.teacher_ops import translate

        settings = _teacher_settings(args)
        teacher = Teacher(settings, Journal(journal_path(args.output, args.journal)))
        teacher.check_reachable()
        result = translate(teacher, args.input, args.output, args.language, parse_retries=args.parse_retries,
                           skip_bad=args.skip_bad)
        result["usage"] = teacher.usage.as_dict(settings)
        print(usage_line(teacher.usage, settings))
    else:
        from chatsmith.data.ops.clean import clean

        if args.max_length and not args.model:
            raise ChatsmithError("data clean --max-length counts tokens: pass --model too (its tokenizer and template)")
        tok = None
        if args.model:
            from chatsmith.models import load_tokenizer

            tok = load_tokenizer(args.model)
        result = clean(args.input, args.output, tokenizer=tok, max_length=args.max_length, template=args.template,
                       blocked_words=[w.strip() for w in args.blocked_words.split(",") if w.strip()],
                       skip_bad=args.skip_bad)
    print(json.dumps(result, ensure_ascii=False))
    return 0


def _run_filter(args: argparse.Namespace) -> dict[str, Any]:
    from chatsmith.data.ops.select import (
        filter_records,
        language_predicate,
        regex_predicate,
        token_length_predicate,
    )

    preds: list[Any] = []
    if args.min_tokens is not None or args.max_tokens is not None:
        if not args.model:
            raise ChatsmithError("data filter --min-tokens/--max-tokens count with a model's tokenizer: pass --model")
        from chatsmith.models import load_tokenizer

        preds.append(("tokens", token_length_predicate(load_tokenizer(args.model), min_tokens=args.min_tokens,
                                                       max_tokens=args.max_tokens, template=args.template)))
    if args.lang:
        preds.append(("lang", language_predicate([x.strip() for x in args.lang.split(",") if x.strip()])))
    if args.drop_regex:
        preds.append(("regex", regex_predicate(args.drop_regex, keep_matching=False)))
    if args.keep_regex:
        preds.append(("regex", regex_predicate(args.keep_regex, keep_matching=True)))
    teacher = None
    if args.quality_threshold is not None:
        from chatsmith.datagen.self_instruct import journal_path
        from chatsmith.datagen.teacher import Journal, Teacher
        from chatsmith.datagen.teacher_ops import quality_predicate

        teacher = Teacher(_teacher_settings(args), Journal(journal_path(args.output, args.journal)))
        teacher.check_reachable()
        preds.append(("quality", quality_predicate(teacher, args.quality_threshold)))
    if not preds:
        raise ChatsmithError("data filter: say what to filter on: --max-tokens/--min-tokens with --model, --lang, "
                             "--drop-regex, --keep-regex or --quality-threshold")
    result = filter_records(args.input, args.output, preds, rejected_path=args.rejected, skip_bad=args.skip_bad,
                            batch_size=max(64, 4 * args.concurrency))
    if teacher is not None:
        result["usage"] = teacher.usage.as_dict(teacher.settings)
    return result


def _cache_options(args: argparse.Namespace) -> dict | None:
    """ResponseCache's arguments from `serve --cache...` (None without --cache)."""
    if args.cache is None:
        if args.cache_semantic or args.cache_threshold is not None or args.cache_ttl is not None:
            raise ChatsmithError("--cache-semantic, --cache-threshold and --cache-ttl need --cache [PATH]")
        return None
    from chatsmith.cache import DEFAULT_THRESHOLD

    threshold = DEFAULT_THRESHOLD if args.cache_threshold is None else args.cache_threshold
    if not 0 < threshold <= 1:
        raise ChatsmithError(f"--cache-threshold must be in (0, 1], got {threshold}")
    if args.cache_max_entries < 1 or (args.cache_ttl is not None and args.cache_ttl <= 0):
        raise ChatsmithError("--cache-max-entries and --cache-ttl must be positive")
    return {"path": os.path.expanduser(args.cache), "semantic": args.cache_semantic, "threshold": threshold,
            "ttl": args.cache_ttl, "max_entries": args.cache_max_entries}


def _add_memory_flags(p: argparse.ArgumentParser) -> None:
    """chat's and serve's --max-memory (accelerate disk offload) and --load-in-8bit/--load-in-4bit (bitsandbytes)."""
    p.add_argument("--max-memory", default=None, metavar="SIZE", help="keep at most SIZE of weights in memory "
                   "(e.g. 2GiB, 500MB; per device 0=20GiB,cpu=30GiB) and offload the rest to disk with accelerate "
                   "(slower; decodes in precision module). See docs/offload.md")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--load-in-8bit", action="store_true", help="8-bit weights with bitsandbytes (CUDA GPU; "
                   "pip install 'chatsmith[qlora]')")
    q.add_argument("--load-in-4bit", action="store_true", help="4-bit NF4 weights with bitsandbytes (CUDA GPU; "
                   "pip install 'chatsmith[qlora]')")


def _quantization(args: argparse.Namespace) -> str | None:
    """"8bit", "4bit" or None from --load-in-8bit/--load-in-4bit."""
    return "8bit" if args.load_in_8bit else "4bit" if args.load_in_4bit else None


def _api_key(args: argparse.Namespace) -> str | None:
    """The server's key: --api-key, else --api-key-file's first line, else $CHATSMITH_API_KEY."""
    if args.api_key:
        return args.api_key
    if args.api_key_file:
        from pathlib import Path

        try:
            key = Path(args.api_key_file).read_text().splitlines()[0].strip() if Path(args.api_key_file).is_file() else ""
        except IndexError:
            key = ""
        if not key:
            raise ChatsmithError(f"--api-key-file {args.api_key_file}: no key in it (it must exist and hold the key "
                                 "on its first line)")
        return key
    return os.environ.get("CHATSMITH_API_KEY") or None


def _threads(args: argparse.Namespace) -> int | None:
    """--threads, checked."""
    if args.threads is not None and args.threads < 1:
        raise ChatsmithError(f"--threads must be 1 or more, got {args.threads}")
    return args.threads


def main(argv: list[str] | None = None) -> int:
    """Run the `chatsmith` command line with `argv` (default: sys.argv); returns the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # what a launch of several processes re-runs
    try:
        status = _run(args)
    except ChatsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    from chatsmith.train.launch import end_launched_process

    end_launched_process(status)   # a launched training process exits here, without finalization
    return status


