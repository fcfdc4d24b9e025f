"""`paratune finetune`: the recipe, top to bottom.

1. the configuration (defaults < model config.yaml < --config < ++overrides);
2. the model directory (or a fresh model with --from-scratch), the manifests' lengths;
3. the memory plan: fitted memory model, checkpointing only if something does not fit without it,
   the memory-bounded sampler;
4. the loop: micro-batches through the OOM guard, clip, step, warmup schedule; memory monitor, ledger,
   checkpoints every N steps and at each epoch's end (exact resume with --resume);
5. validation (loss, CER) each epoch, the n best kept and averaged into `exp/final/`, a FunASR directory.
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from paratune.data.loader import FeatureDataset, make_loader, model_inputs
from paratune.data.manifest import read_lengths
from paratune.data.sampler import MemoryBoundedSampler, bucket_boundaries
from paratune.data.specaug import augment_batch
from paratune.memory.estimate import load_or_fit
from paratune.memory.plan import Limit, gib
from paratune.memory.trace import PRECISIONS, StepOptions
from paratune.memory.tracker import PeakMemory
from paratune.model.paraformer import set_checkpointing
from paratune.modeldir import ASRModel, ModelDirError, load_model, read_model_dir, save_model
from paratune.train import checkpoint
from paratune.train.config import load_config
from paratune.train.lora import DEFAULT_TARGETS, add_lora, merge_lora
from paratune.train.guard import InjectOOM, Micro, loss_weight, run_step
from paratune.train.ledger import Ledger
from paratune.train.metrics import error_rate
from paratune.train.monitor import MemoryMonitor
from paratune.train.schedule import WarmupLR
from paratune.train.step import make_optimizer, optimizer_step


_PREFIX = ""


def log(msg: str) -> None:
    print(_PREFIX + msg, file=sys.stderr, flush=True)


def load_split(paths, spec):
    """The manifests' usable lines as loader rows (key, source, target), their lengths, the bad lines."""
    lengths, errors = read_lengths(paths, spec.tokenizer, spec.frontend.lfr_n, spec.frontend.frame_shift,
                                   spec.frontend.frame_length)
    rows = [{"key": key, "source": str(lengths.source(i)), "target": lengths.targets[i] or ""}
            for i, key in enumerate(lengths.keys)]
    return rows, lengths, errors


def estimate_cmvn(rows, frontend, n: int = 2000) -> torch.Tensor:
    """Mean and inverse std of the features of up to n training utterances, in am.mvn's layout."""
    from paratune.data.audio import load_audio
    frontend.eval()
    feats = torch.cat([frontend.features(load_audio(r["source"], frontend.fs)) for r in rows[:n]])
    return torch.stack([-feats.mean(0), 1 / feats.std(0).clamp_min(1e-3)])


@torch.no_grad()
def validate(asr: ASRModel, rows, lengths, device, batch_frames: int = 20000) -> dict:
    model = asr.model.eval()
    sampler = MemoryBoundedSampler(lengths.frames, lengths.tokens, max_frames=batch_frames, shuffle=False)
    loader = make_loader(FeatureDataset(rows, asr.frontend, asr.tokenizer, train=False), sampler, workers=0)
    hyps, refs, loss_sum, weight_sum = [], [], 0.0, 0.0
    for batch in loader:
        inputs = model_inputs(batch, device)
        loss, _, weight = model(**inputs)
        loss_sum += float(loss) * float(weight)
        weight_sum += float(weight)
        for ids, i in zip(model.decode(inputs["speech"], inputs["speech_lengths"]), batch["indices"]):
            hyps.append(asr.text(ids))
            refs.append(rows[i]["target"])
    model.train()
    return {"loss": loss_sum / max(weight_sum, 1e-9), "cer": error_rate(hyps, refs, "char"),
            "wer": error_rate(hyps, refs, "word"), "utterances": len(refs)}


def _distributed(device_arg):
    """torchrun sets WORLD_SIZE, RANK, LOCAL_RANK: join the group (nccl on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return 1, 0, torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device_arg or "cuda").startswith("cuda")
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return world, dist.get_rank(), device


BUCKET = 25 * 2**20


def all_reduce_gradients(model, world: int, bucket_bytes: int = BUCKET) -> None:
    """The mean of the ranks' gradients, after all of a step's micro-batches (none of which talked to
    the other ranks: an OOM on one rank must not leave the others waiting inside a backward). Reduced
    in buckets of at most 25 MiB, so the step needs no second copy of the gradients."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    i = 0
    while i < len(grads):
        j, size = i, 0
        while j < len(grads) and (j == i or size + grads[j].numel() * grads[j].element_size() <= bucket_bytes):
            size += grads[j].numel() * grads[j].element_size()
            j += 1
        group = grads[i:j]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        i = j


def full_state(model, optimizer, fsdp: bool):
    """Whole (unsharded) model and optimizer state dicts, on the CPU."""
    if not fsdp:
        return model.state_dict(), (optimizer.state_dict() if optimizer is not None else None)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return model_state, optim_state


def set_full_state(model, optimizer, model_state, optim_state, fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state, options=opts)


def gather_keys(keys: list[str], world: int) -> list[str]:
    if world < 2:
        return keys
    parts = [None] * world
    dist.all_gather_object(parts, keys)
    return [k for part in parts for k in part]


def finetune(args) -> int:
    global _PREFIX
    world, rank, device = _distributed(args.device)
    lead = rank == 0
    _PREFIX = f"[rank {rank}] " if world > 1 else ""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    spec = read_model_dir(args.model)
    config = load_config(spec.config, args.config, args.overrides)
    tc, dc, mc = config["train_conf"], config["dataset_conf"], config["memory"]
    for name in ("precision", "checkpointing"):
        if getattr(args, name, None):
            mc[name] = getattr(args, name)
    if args.freeze:
        config["freeze"] = list(args.freeze)
    seed = int(tc["seed"])
    random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    # -- data
    train_rows, train_len, errors = load_split(args.train, spec)
    for e in errors:
        log(f"excluded: {e}")
    if not train_rows:
        raise ModelDirError("no usable training utterance")
    valid = load_split(args.valid, spec) if args.valid else None

    # -- model
    if args.from_scratch:
        if spec.frontend.cmvn is None:
            spec.frontend.cmvn = estimate_cmvn(train_rows, spec.frontend)
            log(f"CMVN estimated from {min(2000, len(train_rows))} training utterances")
        asr = ASRModel(spec.build(), spec.frontend, spec.tokenizer, spec.config, spec.root)
    else:
        asr = load_model(args.model)
    model = asr.model
    frozen = tuple(config["freeze"])
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name.startswith(f) for f in frozen))
    lora = config["lora"]
    lora_targets = tuple(lora["targets"] or DEFAULT_TARGETS)
    if int(lora["r"]):
        model = asr.model = add_lora(model, int(lora["r"]), lora["alpha"], lora["dropout"], lora_targets)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"LoRA rank {lora['r']} on {', '.join(lora_targets)}: {trainable} trainable parameters")

    # -- memory plan
    budget = args.budget
    if budget is None:
        budget = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 8 * 2**30
    options = StepOptions(precision=mc["precision"], checkpointing=False, frozen=frozen,
                          grad_clip=tc["grad_clip"], device="cuda" if device.type == "cuda" else "cpu",
                          lora_r=int(lora["r"]), lora_targets=lora_targets if int(lora["r"]) else ())
    # speed perturbation below 1 lengthens an utterance after planning: plan with the longest version
    slowest = min([1.0] + [float(x) for x in dc["speed_perturb"] or []])
    frames = np.ceil(train_len.frames / slowest).astype(np.int64) + (slowest < 1.0)
    t_max, u_max = int(frames.max()), int(train_len.tokens.max())

    def reduce_bucket(m) -> int:
        return min(BUCKET, m.resident["gradients"]) if world > 1 and not getattr(args, "fsdp", False) else 0

    def limit_for(opts):
        if world > 1 and not lead:
            dist.barrier()  # rank 0 fits (or finds the cached fit); the others then read its cache
        m, cached = load_or_fit(spec.config, spec.vocab_size, spec.input_size, opts, t_max, u_max, holdout=0,
                                log=log)
        if world > 1 and lead:
            dist.barrier()
        if getattr(args, "fsdp", False):  # per-rank: sharded parameters, gradients, optimizer state
            from paratune.memory.shard import shard_model
            with torch.device("meta"):
                m = shard_model(m, spec.build(), world)
            return Limit(m, budget, options.device, mc["margin"])
        # the gradient all-reduce's bucket (ranks > 1) comes on top of the step the model predicts
        return Limit(m, budget - reduce_bucket(m), options.device, mc["margin"])

    limit = limit_for(options)
    need_ckpt = mc["checkpointing"] == "on" or (
        mc["checkpointing"] == "auto" and not limit.fits(1, t_max, u_max))
    if need_ckpt:
        options = StepOptions(**{**options.to_dict(), "checkpointing": True})
        limit = limit_for(options)
        set_checkpointing(model, encoder_blocks=None, decoder_blocks=None)
        log("activation checkpointing on: " + ("asked for" if mc["checkpointing"] == "on"
                                              else "the longest utterance does not fit without it"))
    if limit.model.static_step * limit.scale > budget:
        raise ModelDirError(f"the budget {gib(budget)} is below the static memory {gib(limit.model.static_step)}")
    model.to(device).train()
    if world > 1:
        for t in model.state_dict().values():  # every rank starts from rank 0's weights
            dist.broadcast(t, 0)
    fsdp = bool(getattr(args, "fsdp", False))
    if fsdp:
        if world < 2:
            raise ModelDirError("--fsdp shards over ranks: run under torchrun with --nproc-per-node 2 or more")
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        for layer in list(model.encoder.blocks()) + list(model.decoder.blocks()):
            fully_shard(layer)
        fully_shard(model)
        register_fsdp_forward_method(model, "decode")  # validation decodes: gather the root's weights too
    buckets = bucket_boundaries(t_max, dc["buckets"]) if dc["buckets"] else None
    sampler = MemoryBoundedSampler(frames, train_len.tokens, limit, seed=seed,
                                   buffer_size=dc["buffer_size"], buckets=buckets,
                                   costliest_first=dc["costliest_first"], max_batch=dc["max_batch"],
                                   world_size=world, rank=rank)
    optimizer = make_optimizer(model, lr=float(config["optim_conf"]["lr"]),
                               weight_decay=float(config["optim_conf"]["weight_decay"]))
    scheduler = WarmupLR(optimizer, int(config["scheduler_conf"]["warmup_steps"]))
    autocast_dtype = PRECISIONS[mc["precision"]]
    scaler = torch.amp.GradScaler(device.type) if mc["precision"] == "fp16" else None
    inject = InjectOOM(model, args.inject_oom or [])
    log(f"plan: {len(train_rows)} utterances, {len(sampler)} batches per epoch, budget {gib(budget)}, "
        f"static {gib(limit.model.static_step)}, precision {mc['precision']}, checkpointing "
        f"{'on' if need_ckpt else 'off'}, {'calibrated' if limit.calibrated else 'uncalibrated'}")

    # -- state, resume
    step, epoch, position, best = 0, 0, 0, []
    state_path = out / "checkpoint.pt"
    gen = torch.Generator().manual_seed(seed)
    if args.resume and state_path.exists():
        state = checkpoint.load(state_path)
        set_full_state(model, optimizer, state["model"], state["optimizer"], fsdp)
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        gen.set_state(state["specaug_rng"])
        step, epoch, position, best = state["step"], state["epoch"], state["sampler"]["position"], state["best"]
        if lead:
            Ledger.truncate_after(out / "ledger.jsonl", epoch, step)
        log(f"resumed from {state_path}: epoch {epoch}, step {step}, batch {position} of the epoch")
    if world > 1:
        dist.barrier()  # the ledger is truncated before anyone appends
    ledger = Ledger(out / "ledger.jsonl") if lead else None
    monitor = MemoryMonitor(out if lead else out / f"rank{rank}", budget, device, log=log, tensorboard=lead)

    def save_state():
        model_state, optim_state = full_state(model, optimizer, fsdp)  # a collective under FSDP
        if not lead:
            return
        checkpoint.save(state_path, {
            "model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "sampler": {**sampler.state_dict(), "epoch": epoch, "position": position},
            "rng": checkpoint.rng_state(), "specaug_rng": gen.get_state(), "step": step, "epoch": epoch,
            "best": best})

    def validate_and_keep(tag: str, best: list) -> list:
        """Validation loss and CER; the weights kept if among the keep_nbest_models best by CER."""
        if valid is None:
            return best
        if lead or fsdp:  # under FSDP every rank takes part in every forward
            result = validate(asr, valid[0], valid[1], device)
            weights = full_state(model, None, fsdp)[0]  # a collective under FSDP: every rank
        if not lead:
            return best
        log(f"{tag} validation: loss {result['loss']:.3f}, CER {100 * result['cer']:.2f} %, "
            f"WER {100 * result['wer']:.2f} % on {result['utterances']} utterances")
        path = out / f"model.{tag}.pt"
        checkpoint.save(path, weights)
        best = sorted(best + [[result["cer"], str(path)]], key=lambda x: x[0])
        for _, drop in best[int(tc["keep_nbest_models"]):]:
            Path(drop).unlink(missing_ok=True)
        return best[:int(tc["keep_nbest_models"])]

    weight_of = lambda b: loss_weight(b, model.predictor_bias, model.length_normalized_loss)  # noqa: E731
    dataset = FeatureDataset(train_rows, asr.frontend, asr.tokenizer, train=True, seed=seed,
                             speed_perturb=dc["speed_perturb"], gain_db=dc["gain_db"],
                             noise_snr_db=dc["noise_snr_db"], tilt=dc["tilt"])
    accum = max(1, int(tc["accum_grad"]))
    max_epoch = int(tc["max_epoch"])
    excluded = [train_rows[i]["key"] for i in sampler.excluded(0)]
    if excluded:
        log(f"{len(excluded)} utterances do not fit even alone and are excluded (see the ledger)")
    t_start, tokens_done = time.time(), 0
    progress = _progress() if lead else None
    # one tracker for the run: what an earlier tracked step left alive is still counted (leak detection)
    cpu_tracker = PeakMemory(model, optimizer) if device.type == "cpu" else None
    while epoch < max_epoch:
        sampler.set_epoch(epoch)
        sampler.position = position
        n_batches = len(sampler.batches(epoch))
        dataset.epoch = epoch
        if position == 0 and lead:
            ledger.write(epoch, step, excluded, "excluded", "does not fit the budget even alone")
        loader = make_loader(dataset, sampler, workers=int(dc["num_workers"]))
        bar = progress.add_task(f"epoch {epoch}", total=n_batches, completed=position, info="") if progress else None
        group, group_shapes = [], []
        for batch in loader:
            position += 1
            if dc["specaug"]:
                batch["speech"] = augment_batch(batch["speech"], batch["speech_lengths"], gen,
                                                asr.frontend.n_mels, asr.frontend.lfr_m)
            inputs = {**model_inputs(batch, device), "keys": batch["keys"]}
            group.append(Micro(inputs, 1.0 / accum))
            group_shapes.append((len(batch["keys"]), int(batch["speech"].shape[1]), int(batch["text"].shape[1])))
            if len(group) < accum and position < n_batches:
                continue
            step += 1
            inject.arm(step)
            monitor.start_step()
            # on CPU the tensor tracker costs a Python call per operator: every few steps only
            track = device.type == "cuda" or step <= 3 or step % int(mc["cpu_track_every"]) == 0
            tracker = cpu_tracker if device.type == "cpu" and track else None
            with tracker if tracker is not None else contextlib.nullcontext():
                result = run_step(model, optimizer, group, weight_of, autocast_dtype, scaler,
                                  on_oom=lambda e, n: log(f"step {step}: {e}; splitting {n} utterances"))
                if world > 1 and not fsdp:  # FSDP reduce-scatters the gradients in backward
                    all_reduce_gradients(model, world)
                optimizer_step(model, optimizer, tc["grad_clip"], scaler)
            scheduler.step()
            b, t, u = max(group_shapes, key=lambda s: s[0] * s[1])
            predicted = int(limit.expected(b, t, u)) + reduce_bucket(limit.model)
            if track:
                monitor.end_step(step, epoch, (b, t, u), predicted, tracker.peak if tracker else None,
                                 tracker.current if tracker else None)
            trained, quarantined = gather_keys(result.trained, world), gather_keys(result.quarantined, world)
            if lead:
                ledger.write(epoch, step, trained, "trained")
                if quarantined:
                    ledger.write(epoch, step, quarantined, "quarantined", "out of memory even alone")
                ledger.flush()
            if result.quarantined:
                log(f"step {step}: quarantined {', '.join(result.quarantined)} (out of memory even alone)")
            tokens_done += sum(int(m.batch["text_lengths"].sum()) for m in group)
            if lead and (step % int(tc["log_interval"]) == 0 or position == n_batches):
                losses = [float(s["loss"]) for s in result.stats]
                elapsed = time.time() - t_start
                log(f"epoch {epoch} step {step} batch {position}/{n_batches} loss {np.mean(losses):.3f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} {tokens_done / max(elapsed, 1e-9):.0f} tokens/s "
                    f"memory peak {gib(monitor.samples[-1].peak)} at step {monitor.samples[-1].step} (predicted "
                    f"{gib(predicted)}, budget {gib(budget)})")
            if bar is not None:
                last = monitor.samples[-1] if monitor.samples else None
                progress.update(bar, completed=position, info=(
                    f"loss {float(result.stats[-1]['loss']) if result.stats else float('nan'):.3f}  "
                    f"{tokens_done / max(time.time() - t_start, 1e-9):.0f} tok/s  memory "
                    + (f"{gib(last.allocated)} now / {gib(last.peak)} peak / {gib(budget)}" if last else "")))
            group, group_shapes = [], []
            if int(tc["validate_interval"]) and step % int(tc["validate_interval"]) == 0 and position < n_batches:
                best = validate_and_keep(f"ep{epoch}.step{step}", best)
            if int(tc["save_checkpoint_interval"]) and step % int(tc["save_checkpoint_interval"]) == 0:
                save_state()
        epoch, position = epoch + 1, 0
        best = validate_and_keep(f"ep{epoch - 1}", best)
        save_state()
    if progress:
        progress.stop()
    monitor.close()
    final_state = full_state(model, None, fsdp)[0] if fsdp else None
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if not lead:
        return 0
    ledger.close()

    # -- the final model: average of the n best (by validation CER), or the last weights
    if fsdp:  # a plain model with the gathered weights, for averaging and export
        model = spec.build()
        model.load_state_dict(final_state)
    if best and int(tc["avg_nbest_model"]) > 0:
        chosen = [p for _, p in best[:int(tc["avg_nbest_model"])]]
        model.load_state_dict(checkpoint.average(chosen))
        log(f"final model: average of {len(chosen)} best epochs by validation CER: "
            + ", ".join(Path(p).name for p in chosen))
    model = merge_lora(model)  # adapters folded into the weights: a plain FunASR model.pt
    model.to("cpu").eval()
    for layer in list(model.encoder.blocks()) + list(model.decoder.blocks()):
        layer.checkpoint = False
    config_out = dict(asr.config)
    # FunASR's frontend dithers unless told not to, at inference too: the exported model decodes the
    # same every time, and as paratune decodes it
    config_out["frontend_conf"] = {**(config_out.get("frontend_conf") or {}), "dither": 0.0}
    save_model(ASRModel(model, asr.frontend.cpu(), asr.tokenizer, config_out, asr.path, asr.files), out / "final")
    log(f"wrote {out / 'final'} (loads in funasr.AutoModel), {out / 'memory.csv'}, {out / 'memory.png'}, "
        f"{out / 'ledger.jsonl'}; {time.time() - t_start:.0f} s")
    return 0


def _progress():
    """A rich progress bar (ETA, tokens/s, memory now / peak / budget, loss) when stderr is a terminal;
    log lines every log_interval steps otherwise."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), console=Console(stderr=True))
    progress.start()
    return progress
