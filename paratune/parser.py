"""The `paratune` command line's arguments (the commands themselves are in paratune.cli)."""
from __future__ import annotations

import argparse
from pathlib import Path


def _number(kind, lowest, strict: bool):
    """An argparse type: `kind` at least (or, `strict`, above) `lowest`, with a message naming the rule."""
    what = {int: "an integer", float: "a number"}[kind]
    rule = f"{'>' if strict else '>='} {lowest}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} {rule}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or value < lowest or (strict and value == lowest):
            raise argparse.ArgumentTypeError(f"expected {what} {rule}, got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__} {rule}"  # argparse names the type in some messages
    return parse


positive_int = _number(int, 1, strict=False)
count = _number(int, 0, strict=False)  # zero allowed
positive_float = _number(float, 0, strict=True)


def _config_flags(p: argparse.ArgumentParser) -> None:
    """The configuration flags `plan` and `finetune` share (paratune.train.config.FLAGS); unset, the
    configuration decides (defaults < model config.yaml < --config < ++overrides < these)."""
    p.add_argument("--config", type=Path, help="YAML with train_conf, optim_conf, scheduler_conf, dataset_conf, "
                                               "memory, freeze, lora")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="memory.precision (default fp32)")
    p.add_argument("--checkpointing", metavar="auto|on|off|E/D",
                   help="activation checkpointing: auto (default): the fewest blocks with which the longest "
                        "utterance fits; on/off: every block or none; E/D: the first E encoder and D decoder blocks")
    p.add_argument("--optimizer-state", choices=["auto", "fp32", "8bit", "offload"],
                   help="memory.optimizer_state: AdamW's state in fp32, in 8 bits (bitsandbytes) or in host memory "
                        "(offload, GPU only); auto (default): 8-bit, then offload, only when the budget needs it")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], help="optim_conf.optimizer (default adamw)")
    p.add_argument("--freeze", nargs="*", default=None, metavar="PREFIX",
                   help="parameter-name prefixes not trained, e.g. encoder.")
    p.add_argument("--margin", type=float, default=None,
                   help="share of the budget kept free (default: the calibration, else 0.10 on cuda)")
    p.add_argument("--max-batch", type=int, default=None, help="at most this many utterances per batch")
    p.add_argument("--seed", type=int, default=None, help="train_conf.seed: the sampler's shuffle (default 0)")
    p.add_argument("--buffer-size", type=int, default=None, help="utterances sorted together (default 20000)")
    p.add_argument("--buckets", type=float, default=None, metavar="GROWTH",
                   help="pad T up to geometric bucket lengths growing by GROWTH, e.g. 1.1 (default: no buckets)")
    p.add_argument("--costliest-first", action=argparse.BooleanOptionalAction, default=None,
                   help="start each epoch with the costliest batch, so an OOM shows at once (default on)")


def _transcribe(sub, run) -> None:
    p = sub.add_parser("transcribe", help="decode audio with a FunASR Paraformer model directory",
                       description="Prints `key<TAB>text` per utterance. INPUT: audio files (key = file stem), "
                                   "a Kaldi wav.scp, or a FunASR jsonl. Bad inputs are reported on stderr; "
                                   "the others are still decoded (exit status 1 if any failed).")
    p.add_argument("--model", required=True, type=Path, help="model directory (config.yaml, model.pt, tokens, am.mvn)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="utterances decoded together (default 8)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--threads", type=count, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--max-duration", type=positive_float, default=60.0, metavar="SECONDS",
                   help="inputs longer than this are cut at pauses (silero-vad, as `prepare --long-audio split`), "
                        "decoded piece by piece and their texts joined (default 60)")
    p.add_argument("--timestamps", action="store_true",
                   help="print `key<TAB>text<TAB>[[start_ms, end_ms], ...]`, FunASR's `timestamp` "
                        "(BiCifParaformer, SeacoParaformer)")
    p.add_argument("--hotwords", metavar='"W1 W2"', help="hotwords to bias a SeacoParaformer towards, separated "
                                                          "by spaces (FunASR's generate(hotword=...))")
    p.add_argument("--hotword-file", type=Path, metavar="FILE",
                   help="hotwords one per line (its tokens separated by spaces), as FunASR's hotword .txt file")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.set_defaults(func=run)


def _plan(sub, run) -> None:
    p = sub.add_parser("plan", help="batches for a manifest under a memory budget, predicted before training",
                       description="Fits (or loads the cached) memory model of a training step for the model "
                                   "directory and options, packs the manifest's utterances into batches whose "
                                   "predicted peak stays within the budget, and reports them. Reads only the "
                                   "manifest's lengths when it has them (source_len: 10 ms frames, as FunASR "
                                   "writes it). Exit status 1 when some utterances cannot be planned.")
    p.add_argument("--model", required=True, type=Path, help="model directory (config.yaml, tokens, am.mvn)")
    p.add_argument("--data", required=True, type=Path, nargs="+", help="FunASR jsonl manifest(s)")
    p.add_argument("--budget", required=True, help="memory per device, e.g. 24GiB")
    _config_flags(p)
    p.add_argument("--world-size", type=positive_int, default=1, help="ranks; without --fsdp each keeps a DDP replica")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP2)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="what the plan is for (default cuda)")
    p.add_argument("--holdout", type=count, default=2, help="unseen shapes the fit is checked on (default 2)")
    p.add_argument("--calibrate", action="store_true", help="measure real steps on the device and keep the correction")
    p.add_argument("--explain", action="store_true", help="where the costliest batch's peak goes")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--png", default="plan.png", help="plot of predicted need per batch (default plan.png; '' for none)")
    p.add_argument("overrides", nargs="*", metavar="++KEY=VALUE")
    p.set_defaults(func=run)


def _prepare(sub, run) -> None:
    p = sub.add_parser("prepare", help="check a corpus and write a canonical jsonl with lengths and a report",
                       description="INPUT: FunASR jsonl, Kaldi wav.scp (with `text` beside it) or data folder, or a "
                                   "folder of audio (with --transcripts). Writes OUTPUT/data.jsonl (key, source, "
                                   "target, source_len, target_len, duration, sample_rate, frames, tokens), "
                                   "report.json, report.txt and report.png. Every utterance left out is in the "
                                   "report with its reason (exit status 1 if any).")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--model", required=True, type=Path, help="model directory: its tokens and frontend")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--transcripts", type=Path, help="TSV `name<TAB>text` for a folder of audio")
    p.add_argument("--max-duration", type=positive_float, default=None, metavar="SECONDS")
    p.add_argument("--long-audio", choices=["split", "drop", "keep"], default="keep",
                   help="clips over --max-duration: cut at pauses (silero-vad), leave out, or keep (default)")
    p.add_argument("--align-model", type=Path, help="model directory whose CIF predictor divides transcripts "
                                                    "when splitting labelled audio")
    p.add_argument("--workers", type=positive_int, default=16, help="threads reading audio headers")
    p.set_defaults(func=run)


def _demo(sub, run) -> None:
    p = sub.add_parser("demo", help="fine-tune the bundled tiny model on the bundled set (CPU, a few minutes)",
                       description="Runs `paratune finetune` on the bundled model and fine-tuning set (a speaking "
                                   "condition the model never heard) and prints the CER before and after.")
    p.add_argument("--output", type=Path, default=Path("exp/demo"), help="where the run goes (default exp/demo)")
    p.add_argument("--budget", default="2GiB", help="memory budget (default 2GiB of CPU tensors)")
    p.set_defaults(func=run)


def _doctor(sub, run) -> None:
    p = sub.add_parser("doctor", help="explain GPU memory in FunASR training logs or paratune's memory.csv",
                       description="Reads FunASR 1.x per-step log lines (GPU, memory: usage/peak/cache/cache_peak), "
                                   "FunASR 0.x epoch summaries, DeepSpeed MemAllocated= lines and paratune's "
                                   "memory.csv, and says what happened (leak, fragmentation, outlier_batch, "
                                   "near_capacity, host_memory, healthy, no_memory_data) with the figures and "
                                   "the fix, as paratune and as FunASR settings. Several files are one run.")
    p.add_argument("logs", nargs="+", type=Path, metavar="LOG")
    p.add_argument("--json", action="store_true", help="print {lines_parsed, ranks, findings, notes} as JSON")
    p.add_argument("--png", type=Path, help="plot the log's memory figures over steps")
    p.add_argument("--gpu-memory", help="the card's memory, e.g. 80GiB (for near_capacity)")
    p.set_defaults(func=run)


def _finetune(sub, run) -> None:
    p = sub.add_parser("finetune", help="train a Paraformer within a memory budget",
                       description="Plans batches with the memory model, trains with OOM recovery, watches memory "
                                   "every step, writes OUTPUT/final (a FunASR model directory), memory.csv, "
                                   "memory.png, ledger.jsonl, checkpoint.pt. FunASR-style overrides: "
                                   "++train_conf.max_epoch=1.")
    p.add_argument("--model", required=True, type=Path, help="model directory to start from")
    p.add_argument("--train", required=True, type=Path, nargs="+", help="jsonl manifest(s)")
    p.add_argument("--valid", type=Path, nargs="+", help="jsonl manifest(s) for validation each epoch")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--budget", help="memory per device (default: what is free on the GPU once its CUDA context "
                   "exists, less 1 GiB + 5 %% for workspaces and NCCL buffers; 8GiB of tensors on CPU)")
    _config_flags(p)
    p.add_argument("--device", default=None)
    p.add_argument("--from-scratch", action="store_true", help="random weights (the directory needs no model.pt)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="OUTPUT holds an earlier run: remove its ledger, checkpoint, kept models and memory.csv, "
                        "and start over")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer "
                                                       "state over the ranks (FSDP2 fully_shard per block)")
    p.add_argument("--inject-oom", metavar="STEP[,STEP...]",
                   help="raise a real torch.OutOfMemoryError at these steps (testing the recovery)")
    p.add_argument("--inject-oom-rank", type=count, default=None, metavar="R",
                   help="inject on rank R only (default: every rank)")
    p.add_argument("overrides", nargs="*", metavar="++KEY=VALUE")
    p.set_defaults(func=run)


def _eval(sub, run) -> None:
    p = sub.add_parser("eval", help="CER and WER of a model directory on a manifest")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, nargs="+")
    p.add_argument("--device", default=None)
    p.set_defaults(func=run)


def build_parser(commands: dict, description: str) -> argparse.ArgumentParser:
    """`commands` maps each subcommand to the function that runs it."""
    parser = argparse.ArgumentParser(prog="paratune", description=description)
    sub = parser.add_subparsers(dest="command", required=True)

    _transcribe(sub, commands["transcribe"])
    _plan(sub, commands["plan"])
    _prepare(sub, commands["prepare"])
    _demo(sub, commands["demo"])
    _doctor(sub, commands["doctor"])
    _finetune(sub, commands["finetune"])
    _eval(sub, commands["eval"])
    return parser
