"""The `paratune` command line."""
from __future__ import annotations

import sys

EXIT_OK, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 2


def _device_error(name: str | None, why: str = "") -> str | None:
    """What is wrong with `--device NAME` here (None: nothing; no name: the command picks one)."""
    if name is None:
        return None
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        return f"--device {name}: not a torch device ({e})"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}{why}: torch sees no CUDA device here (use --device cpu)"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)"
    return None


def _where(u, e) -> str:
    """`origin: error`, without the path twice where the error already starts with it."""
    return str(e) if str(e).startswith(f"{u.origin}:") else f"{u.origin}: {e}"


def _report(u, e) -> None:
    print(f"error: {_where(u, e)}", file=sys.stderr)


def _transcribe(args) -> int:
    import torch

    from paratune.data.audio import AudioError, audio_info, load_audio
    from paratune.data.hotwords import HotwordError
    from paratune.data.manifest import read_manifests
    from paratune.decode_long import decode_long, transcript_line
    from paratune.modeldir import ModelDirError, load_model

    bad_device = _device_error(args.device)
    if bad_device:
        print(f"error: {bad_device}", file=sys.stderr)
        return EXIT_FAILED
    try:
        asr = load_model(args.model, device=args.device)
        hotwords = asr.hotword_ids(args.hotwords, args.hotword_file)
        if args.timestamps and not asr.timed:
            raise ModelDirError(f"{args.model}: --timestamps: {asr.config.get('model')} has no timestamp head "
                                "(BiCifParaformer and SeacoParaformer predict timestamps)")
    except (ModelDirError, HotwordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.threads:
        torch.set_num_threads(args.threads)
    utterances, errors = read_manifests(args.inputs, need_audio=True)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)

    # Decode in windows: sorted by duration inside a window (little padding), printed in input order.
    window = args.batch_size * 16
    decoded = 0
    for start in range(0, len(utterances), window):
        chunk = utterances[start : start + window]
        durations = {}
        for u in chunk:
            try:
                sr, frames, _ = audio_info(u.source)
                durations[u.key] = frames / sr
            except AudioError as e:
                errors.append(e)
                _report(u, e)
        ready = sorted((u for u in chunk if u.key in durations), key=lambda u: durations[u.key])
        long = [u for u in ready if durations[u.key] > args.max_duration]
        texts = decode_long(asr, long, args.max_duration, args.batch_size, errors, _report, _log, hotwords)
        ready = [u for u in ready if durations[u.key] <= args.max_duration]
        asr.frontend.eval()
        for b in range(0, len(ready), args.batch_size):
            batch, feats = [], []
            for u in ready[b : b + args.batch_size]:
                try:
                    feats.append(asr.frontend.features(load_audio(u.source, asr.frontend.fs)))
                    batch.append(u)
                except (AudioError, ValueError) as e:  # ValueError: too short for one frame
                    errors.append(e)
                    _report(u, e)
            if batch:
                texts.update(zip((u.key for u in batch), asr.decode_batch(feats, hotwords)))
        for u in chunk:
            if u.key in texts:
                print(transcript_line(u.key, texts[u.key], args.timestamps), flush=True)
                decoded += 1
    if errors:
        return EXIT_PARTIAL if decoded else EXIT_FAILED
    return EXIT_OK


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _read_plan_inputs(args):
    """The budget, model directory, configuration (with --config, ++overrides and flags) and lengths."""
    from paratune.data.lengths import read_lengths
    from paratune.memory.plan import parse_bytes
    from paratune.modeldir import read_model_dir
    from paratune.train.config import apply_flags, load_config

    budget = parse_bytes(args.budget)
    spec = read_model_dir(args.model)
    config = apply_flags(load_config(spec.config, args.config, _overrides(args)), vars(args))
    fe = spec.frontend
    lengths, errors = read_lengths(args.data, spec.tokenizer, fe.lfr_n, fe.frame_shift, fe.frame_length)
    return budget, spec, config, lengths, errors


def _overrides(args) -> list[str]:
    """The `++a.b=c` overrides (`main` gathers them from anywhere on the line); anything else left over
    is an error."""
    from paratune.train.config import ConfigError
    bad = [o for o in args.overrides if not o.startswith("++")]
    if bad:
        raise ConfigError(f"unrecognized argument(s) {' '.join(bad)} (overrides look like ++train_conf.max_epoch=1)")
    return args.overrides


def _plan(args) -> int:
    import json
    import time

    from paratune.memory.fit_cache import load_or_fit
    from paratune.memory.plan import PlanError, make_plan, plan_run
    from paratune.memory.report import explain_peak, summary, write_png
    from paratune.modeldir import ModelDirError
    from paratune.train.config import ConfigError

    start = time.perf_counter()
    try:
        budget, spec, config, lengths, errors = _read_plan_inputs(args)
    except (PlanError, ModelDirError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if not len(lengths):
        print("error: no usable utterance in " + ", ".join(map(str, args.data)) + ": nothing to plan",
              file=sys.stderr)
        return EXIT_FAILED
    _log(f"read {len(lengths)} utterances in {time.perf_counter() - start:.1f} s "
         f"(longest {lengths.seconds.max():.1f} s = {lengths.frames.max()} frames, "
         f"most tokens {lengths.tokens.max()})")

    def fit(options, max_frames, max_tokens):
        t0 = time.perf_counter()
        model, cached = load_or_fit(spec.config, spec.vocab_size, spec.input_size, options, max_frames,
                                    max_tokens, holdout=args.holdout, log=_log)
        if not cached and model.holdout:
            _log(f"fitted in {time.perf_counter() - t0:.1f} s; error on {len(model.holdout)} unseen shapes: "
                 f"worst {100 * model.worst_holdout_error:.2f} %")
        return model

    fe = spec.frontend
    try:
        run = plan_run(spec, lengths, config, budget, args.device, args.world_size, fsdp=args.fsdp, fit=fit, log=_log,
                       explain=args.explain)
        plan = make_plan(run, lengths, fe.lfr_n * fe.frame_shift / 1000)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if plan.excluded and config["memory"]["precision"] == "fp32":
        plan.notes.append("bf16 autocast (--precision bf16) needs less activation memory and may fit them")

    if args.calibrate:
        if not _calibrate(args, spec, plan):
            return EXIT_FAILED

    if args.explain:  # for people: beside --json's one line on stdout, on stderr
        from paratune.memory.levers import text
        out = sys.stderr if args.json else sys.stdout
        print("\n".join(text(plan.run.alternatives, plan.run.blocks, plan.budget)), file=out)
        explain_peak(spec, plan, out)
    if args.png:
        write_png(plan, args.png)
    result = plan.to_dict()
    result["manifest_errors"] = [str(e) for e in errors]
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(summary(plan))
        if args.png:
            print(f"plot: {args.png}")
    _log(f"planned in {time.perf_counter() - start:.1f} s")
    return EXIT_PARTIAL if (plan.excluded or errors) else EXIT_OK


def _calibrate(args, spec, plan) -> bool:
    """Real steps at the plan's costliest batch shapes; the correction is stored with the cached fit."""
    import json

    import numpy as np

    from paratune.io import atomic_write_text
    from paratune.memory.calibrate import calibrate
    from paratune.memory.fit_cache import cache_dir
    from paratune.memory.trace import StepOptions

    bad_device = _device_error(args.device, " --calibrate (it measures real steps on the device)")
    if bad_device:
        print(f"error: {bad_device}", file=sys.stderr)
        return False
    model = plan.limit.model
    if model.options.get("fsdp_world_size"):
        print("error: --calibrate runs on one device: leave out --fsdp", file=sys.stderr)
        return False
    shapes = plan.batch_shapes()
    if not len(shapes):
        return True
    order = np.argsort(plan.predicted())[::-1]
    picks = list(dict.fromkeys(tuple(int(x) for x in shapes[i]) for i in [*order[:3], order[len(order) // 2],
                                                                          order[-1]]))
    options = StepOptions(**{k: v for k, v in model.options.items() if k in StepOptions.__dataclass_fields__})
    _log(f"calibrating on {args.device} at {len(picks)} batch shapes")
    model.calibration = calibrate(spec, model, options, picks, device=args.device)
    for r in model.calibration["rows"]:
        _log(f"  B={r['batch']} T={r['frames']} U={r['tokens']}: predicted {r['predicted'] / 2**30:.3f} GiB, "
             f"allocated {r['allocated'] / 2**30:.3f} GiB ({100 * r['allocated_error']:+.2f} %), "
             f"reserved {r['reserved'] / 2**30:.3f} GiB, step {r['seconds']:.3f} s, {r['flops'] / 1e9:.1f} GFLOP")
    timing = model.calibration["timing"]
    if timing:
        _log(f"step time: {timing['per_step']:.3f} s per step + FLOPs at {timing['rate'] / 1e9:.1f} GFLOP/s")
    path = cache_dir() / f"{model.key}.json"
    atomic_write_text(path, json.dumps(model.to_dict()))
    _log(f"stored the calibration in {path}; later plans use it")
    return True


def _prepare(args) -> int:
    from paratune.data.prepare import PrepareError, prepare
    from paratune.modeldir import ModelDirError, load_model, read_model_dir

    try:
        spec = read_model_dir(args.model)
        align = None
        if args.align_model:
            asr = load_model(args.align_model)
            align = (asr.model, asr.frontend)
        if args.long_audio != "keep" and not args.max_duration:
            raise PrepareError(f"--long-audio {args.long_audio} needs --max-duration SECONDS")
        result = prepare(args.inputs, args.output, spec.tokenizer, spec.frontend.lfr_n, args.transcripts,
                         args.max_duration, args.long_audio, align, args.workers)
    except (PrepareError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    from paratune.data.prepare import summary_text
    print(summary_text(result))
    print(f"wrote {args.output}/data.jsonl, report.json, report.txt, report.png")
    if not result["counts"]["kept"]:
        return EXIT_FAILED
    return EXIT_PARTIAL if result["counts"]["excluded"] else EXIT_OK


def _finetune(args) -> int:
    from paratune.data.prepare import PrepareError
    from paratune.memory.plan import PlanError, parse_bytes
    from paratune.modeldir import ModelDirError
    from paratune.train.config import FLAGS, ConfigError
    from paratune.train.checkpoint import CheckpointError
    from paratune.train.distributed import DistributedError
    from paratune.train.finetune import FinetuneOptions, finetune
    from paratune.train.ledger import LedgerError
    from paratune.train.oom import OutOfMemoryStop
    from paratune.train.run_folder import RunFolderError

    try:
        bad_device = _device_error(args.device)
        if bad_device:
            raise ConfigError(bad_device)
        overrides = _overrides(args)
        options = FinetuneOptions(
            model=args.model, train=args.train, output=args.output, valid=args.valid,
            budget=parse_bytes(args.budget) if args.budget else None, config=args.config, overrides=overrides,
            flags={k: getattr(args, k) for k in FLAGS}, device=args.device, from_scratch=args.from_scratch,
            resume=args.resume, overwrite=args.overwrite, fsdp=args.fsdp,
            inject_oom=[int(x) for x in args.inject_oom.split(",") if x.strip()] if args.inject_oom else [],
            inject_oom_rank=args.inject_oom_rank)
        if not options.train:
            raise ConfigError("--train: no manifest given")
        return finetune(options)
    except (ConfigError, ModelDirError, PlanError, PrepareError, DistributedError, ValueError, CheckpointError,
            LedgerError, RunFolderError, OutOfMemoryStop) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except RuntimeError as e:  # a collective whose peer died (gloo and NCCL say so in a RuntimeError)
        import torch.distributed as dist
        if not (isinstance(e, dist.DistError) or any(w in str(e) for w in ("gloo", "NCCL", "Connection"))):
            raise
        print(f"error: lost another rank ({str(e).splitlines()[0][:200]}); the last checkpoint is intact: "
              "restart with --resume", file=sys.stderr)
        return EXIT_FAILED


def _eval(args) -> int:
    import torch

    from paratune.modeldir import ModelDirError, load_model
    from paratune.train.validation import load_split, validate

    bad_device = _device_error(args.device)
    if bad_device:
        print(f"error: {bad_device}", file=sys.stderr)
        return EXIT_FAILED
    try:
        asr = load_model(args.model)
        rows, lengths, errors = load_split(args.data, asr)
    except (ModelDirError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if not rows:
        print("error: no usable utterance", file=sys.stderr)
        return EXIT_FAILED
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    asr.model.to(device)
    result = validate(asr, rows, lengths, device)
    for origin, reason in result["excluded"]:
        print(f"error: {origin}: {reason}", file=sys.stderr)
    print(f"utterances {result['utterances']}")
    print(f"CER {100 * result['cer']:.2f}%")
    print(f"WER {100 * result['wer']:.2f}%")
    return EXIT_PARTIAL if errors or result["excluded"] else EXIT_OK


def _demo(args) -> int:
    from paratune.demo import run_demo
    return run_demo(args.output, args.budget)


def _doctor(args) -> int:
    from paratune.doctor import doctor, report_text, to_json, write_png
    from paratune.memory.plan import PlanError, parse_bytes

    try:
        gpu = parse_bytes(args.gpu_memory) / 2**30 if args.gpu_memory else None
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    report = doctor(args.logs, gpu)
    print(to_json(report) if args.json else report_text(report))
    if args.png and write_png(report, args.png) and not args.json:
        print(f"timeline: {args.png}")
    return EXIT_OK if report["findings"] else EXIT_FAILED  # no finding: no file could be read


COMMANDS = {"transcribe": _transcribe, "plan": _plan, "prepare": _prepare, "demo": _demo,
            "doctor": _doctor, "finetune": _finetune, "eval": _eval}


def main(argv: list[str] | None = None) -> int:
    from paratune.parser import build_parser
    from paratune.train.distributed import set_alloc_conf
    set_alloc_conf()  # every command, before any of them touches CUDA
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # FunASR users put ++overrides anywhere on the line; argparse would take them only at the end
    overrides = [a for a in argv if a.startswith("++")]
    parser = build_parser(COMMANDS, __doc__)
    args = parser.parse_args([a for a in argv if not a.startswith("++")])
    if overrides and not hasattr(args, "overrides"):
        parser.error(f"{args.command} takes no ++overrides: {' '.join(overrides)}")
    if overrides:
        args.overrides = overrides + list(args.overrides)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # before finetune's own handler is installed, or in another command
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a folder that went away: the file and the reason, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
