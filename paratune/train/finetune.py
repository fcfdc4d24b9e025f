"""`paratune finetune`: the recipe, top to bottom.

- set-up: the world (torchrun's ranks), the configuration (defaults < model config.yaml < --config <
  ++overrides < flags), the data, the model, the memory plan (`paratune.memory.plan.plan_run`, the one
  `paratune plan` reports), the model prepared for the step (`prepare_model`), resume;
- the epoch loop: micro-batches through `train_step` (accumulation, OOM split, gradient average, clip,
  optimizer), warmup schedule, memory monitor, ledger, checkpoints every N steps and at each epoch end;
- validation (loss, CER) each epoch, the n best kept;
- export: the n best averaged into `exp/final/`, a FunASR model directory.

`Finetune(FinetuneOptions(...)).run()` is what the command line and `paratune demo` call.
"""
from __future__ import annotations

import contextlib
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from paratune.data.hotwords import hotword_sampling
from paratune.data.loader import FeatureDataset, make_loader, step_batch
from paratune.data.specaug import augment_batch
from paratune.memory.fit_cache import load_or_fit
from paratune.memory.plan import gib, plan_run
from paratune.memory.tracker import PeakMemory
from paratune.modeldir import ASRModel, ModelDirError, load_model, read_model_dir, save_model
from paratune.train import checkpoint, distributed, run_folder
from paratune.train.config import apply_flags, load_config
from paratune.train.guard import InjectOOM
from paratune.train.ledger import Ledger
from paratune.train.lora import merge_lora, unsharded
from paratune.train.monitor import MemoryMonitor
from paratune.train.oom import default_budget
from paratune.train.progress import Progress
from paratune.train.schedule import WarmupLR
from paratune.train.step import PRECISIONS, Micro, checkpoint_text, prepare_model, train_step
from paratune.train.validation import estimate_cmvn, load_split, validate


@dataclass
class FinetuneOptions:
    model: Path  # a FunASR model directory
    train: list[Path]  # jsonl manifests
    output: Path
    valid: list[Path] | None = None
    budget: int | None = None  # bytes per device; None: the GPU's memory, 8 GiB of tensors on a CPU
    config: Path | None = None  # YAML over the model's config.yaml
    overrides: list[str] = field(default_factory=list)  # ++section.key=value
    flags: dict = field(default_factory=dict)  # paratune.train.config.FLAGS given on the command line
    device: str | None = None
    from_scratch: bool = False  # random weights
    resume: bool = False  # from output/checkpoint.pt
    overwrite: bool = False  # into a folder that holds a run: that run's files removed first
    fsdp: bool = False
    inject_oom: list[int] = field(default_factory=list)  # steps at which to raise a real OOM (testing)
    inject_oom_rank: int | None = None  # only on this rank (default: every rank)


class Finetune:
    def __init__(self, options: FinetuneOptions):
        self.opts = options
        self.step, self.epoch, self.position, self.best = 0, 0, 0, []
        self.dropped, self.saved = [], None  # kept models to remove after the next save; the last save's step
        self.interrupts, self.progress, self.monitor, self.ledger = run_folder.Interrupts(), None, None, None
        self.unreadable = []  # (key, reason) of clips left out of this step's batches

    def log(self, msg: str) -> None:
        prefix = f"[rank {self.world.rank}] " if self.world.size > 1 else ""
        print(prefix + msg, file=sys.stderr, flush=True)

    def run(self) -> int:
        self.setup()
        try:
            while self.epoch < self.max_epoch:
                self.train_epoch()
                self.epoch, self.position = self.epoch + 1, 0
                self.validate_and_keep(f"ep{self.epoch - 1}")
                self.save_state()
                self._stop_if_interrupted()
        except run_folder.Interrupted as stop:  # every rank, at the same step, the checkpoint saved
            self.close()
            self.log(str(stop))
            return stop.code
        except KeyboardInterrupt:  # a second signal: no checkpoint
            self.abort()
            self.log(f"stopped at once at epoch {self.epoch} step {self.step}; --resume continues from the last "
                     f"checkpoint{f' (step {self.saved})' if self.saved is not None else ' (none was saved)'}")
            return 130
        except BaseException:
            self.abort()
            raise
        self.close()
        return self.export()

    # -- set-up
    def setup(self) -> None:
        o = self.opts
        # the configuration (checked; it has the collectives' timeout), then the group, then the folder,
        # before anything is loaded or fitted and before a bad value could leave a folder behind or
        # --overwrite empty one
        self.spec = read_model_dir(o.model)
        self.config = apply_flags(load_config(self.spec.config, o.config, o.overrides), o.flags)
        self.world = distributed.setup(o.device, float(self.config["train_conf"]["collective_timeout_s"]))
        self.lead = self.world.lead
        self.out = Path(o.output)
        hotword_sampling(self.config["dataset_conf"], None)  # min > max hotword length refused here too
        self.state = run_folder.open_folder(self.out, o.resume, o.overwrite, o.valid, self.log)
        run_folder.prepare(self.out, self.state, o.overwrite, self.lead, self.world.rank, self.log)
        distributed.barrier()
        self.tc, self.dc, self.mc = self.config["train_conf"], self.config["dataset_conf"], self.config["memory"]
        self.max_epoch, self.accum = int(self.tc["max_epoch"]), max(1, int(self.tc["accum_grad"]))
        torch.manual_seed(int(self.tc["seed"]))
        random.seed(int(self.tc["seed"]))
        self._load_data()
        self.asr = self._build_model()
        self.hotwords = hotword_sampling(self.dc, getattr(self.asr.model, "no_bias", None))  # SeACo: sampled
        self._plan()
        self._prepare()
        self._resume()
        distributed.barrier()  # the ledger is truncated before anyone appends
        self.ledger = Ledger(self.out / "ledger.jsonl") if self.lead else None
        self.monitor = MemoryMonitor(self.out if self.lead else self.out / f"rank{self.world.rank}", self.budget,
                                     self.world.device, log=self.log, tensorboard=self.lead)
        self.progress = Progress() if self.lead else None
        self.inject = InjectOOM(self.model, o.inject_oom if o.inject_oom_rank in (None, self.world.rank) else [])
        # one tracker for the run: what an earlier tracked step left alive is still counted (leak detection)
        self.cpu_tracker = PeakMemory(self.model, self.optimizer) if self.world.device.type == "cpu" else None
        self.interrupts.install()  # restored in abort()

    def _load_data(self) -> None:
        self.train_rows, self.train_len, errors = load_split(self.opts.train, self.spec)
        for e in errors:
            self.log(f"excluded: {e}")
        if not self.train_rows:
            raise ModelDirError("no usable training utterance")
        self.valid = load_split(self.opts.valid, self.spec) if self.opts.valid else None

    def _build_model(self) -> ASRModel:
        spec = self.spec
        if not self.opts.from_scratch:
            return load_model(self.opts.model)
        if spec.frontend.cmvn is None:
            spec.frontend.cmvn = estimate_cmvn(self.train_rows, spec.frontend)
            self.log(f"CMVN estimated from {min(2000, len(self.train_rows))} training utterances")
        return ASRModel(spec.build(), spec.frontend, spec.tokenizer, spec.config, spec.root)

    def _plan(self) -> None:
        dev = self.world.device
        if self.opts.budget:
            self.budget = self.opts.budget
        else:
            self.budget, why = default_budget(dev, distributed.gather_objects)
            self.log(f"budget (no --budget given) {why}")
        spec, timeout = self.spec, float(self.mc["fit_timeout_s"])

        def fit(options, max_frames, max_tokens):  # rank 0 fits (or reads the cache); every rank gets it
            return distributed.lead_first(lambda: load_or_fit(
                spec.config, spec.vocab_size, spec.input_size, options, max_frames, max_tokens, holdout=0,
                log=self.log)[0], timeout)

        self.run_plan = plan_run(spec, self.train_len, self.config, self.budget, dev.type, self.world.size,
                                 self.world.rank, self.opts.fsdp, fit=fit, log=self.log)
        self.limit, self.sampler = self.run_plan.limit, self.run_plan.sampler
        for note in self.run_plan.notes:
            self.log(note)

    def _prepare(self) -> None:
        options, lora = self.run_plan.options, self.config["lora"]

        def wrap(model):
            distributed.broadcast_model(model)  # every rank starts from rank 0's weights
            if not self.opts.fsdp:
                self.agreement = distributed.agreement()
                return model
            model, self.agreement = distributed.shard(model, self.world.timeout_s)
            return model

        ready = prepare_model(self.asr.model, options, self.world.device, wrap,
                              lr=float(self.config["optim_conf"]["lr"]),
                              weight_decay=float(self.config["optim_conf"]["weight_decay"]), lora_alpha=lora["alpha"])
        self.model = self.asr.model = ready.model
        self.optimizer, self.scaler = ready.optimizer, ready.scaler
        if options.lora_r:
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            self.log(f"LoRA rank {options.lora_r} on {', '.join(options.lora_targets)}: {trainable} trainable "
                     "parameters")
        self.scheduler = WarmupLR(self.optimizer, int(self.config["scheduler_conf"]["warmup_steps"]))
        self.log(f"plan: {len(self.train_rows)} utterances, {len(self.sampler)} batches per epoch"
                 f"{' per rank' if self.world.size > 1 else ''}, budget {gib(self.budget)}, static "
                 f"{gib(self.limit.model.static_step)}, precision {options.precision}, checkpointing "
                 f"{checkpoint_text(options.checkpointing)} blocks, optimizer {options.optimizer}, "
                 f"accumulation {self.accum}, "
                 f"{'calibrated' if self.limit.calibrated else 'uncalibrated'}")

    def _resume(self) -> None:
        self.gen = torch.Generator().manual_seed(int(self.tc["seed"]))  # SpecAugment's
        path, state, self.state = self.out / "checkpoint.pt", self.state, None  # read and checked in set-up
        if state is None:
            return
        try:
            checkpoint.set_full_state(self.model, self.optimizer, state["model"], state["optimizer"], self.opts.fsdp)
        except (RuntimeError, KeyError, ValueError) as e:
            raise checkpoint.CheckpointError(f"{path}: does not fit this model and configuration: "
                                             f"{str(e).splitlines()[0]}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        rng, specaug = state["rng"], state["specaug_rng"]
        if isinstance(rng, list):  # one per rank (a checkpoint before this had only rank 0's)
            rng, specaug = rng[self.world.rank], specaug[self.world.rank]
        checkpoint.set_rng_state(rng)
        self.gen.set_state(specaug)
        self.step, self.epoch, self.best = state["step"], state["epoch"], state["best"]
        self.position, self.saved = state["sampler"]["position"], self.step
        self.log(f"resumed from {path}: epoch {self.epoch}, step {self.step}, batch {self.position} of the epoch")

    # -- the loop
    def train_epoch(self) -> None:
        sampler, dc = self.sampler, self.dc
        sampler.set_epoch(self.epoch)
        sampler.position = self.position
        n_batches = len(sampler.batches(self.epoch))
        if self.position == 0 and self.lead:
            excluded = [self.train_rows[i]["key"] for i in sampler.excluded(self.epoch)]
            if excluded:
                self.log(f"{len(excluded)} utterances do not fit even alone and are excluded (see the ledger)")
            self.ledger.write(self.epoch, self.step, excluded, "excluded", "does not fit the budget even alone")
        dataset = FeatureDataset(self.train_rows, self.asr.frontend, self.asr.tokenizer, train=True,
                                 seed=int(self.tc["seed"]), speed_perturb=dc["speed_perturb"], gain_db=dc["gain_db"],
                                 noise_snr_db=dc["noise_snr_db"], tilt=dc["tilt"], hotwords=self.hotwords)
        dataset.epoch = self.epoch
        if self.progress:
            self.progress.start_epoch(self.epoch, n_batches, self.position)
        group = []
        for batch in make_loader(dataset, sampler, workers=int(dc["num_workers"])):
            self.position += 1
            if dc["specaug"]:
                batch["speech"] = augment_batch(batch["speech"], batch["speech_lengths"], self.gen,
                                                self.asr.frontend.n_mels, self.asr.frontend.lfr_m)
            self._exclude(batch["excluded"])
            # stays on the host: train_step moves each micro-batch to the device when it runs; a batch
            # with no readable clip is a placeholder that weighs nothing
            group.append(Micro(step_batch(batch), 1.0 / self.accum if batch["keys"] else 0.0))
            if len(group) == self.accum or self.position == n_batches:
                self.train_step(group, n_batches)
                group = []
                interval = int(self.tc["validate_interval"])
                if interval and self.step % interval == 0 and self.position < n_batches:
                    self.validate_and_keep(f"ep{self.epoch}.step{self.step}")
                interval = int(self.tc["save_checkpoint_interval"])
                if interval and self.step % interval == 0:
                    self.save_state()
                self._stop_if_interrupted()

    def train_step(self, group: list[Micro], n_batches: int) -> None:
        self.step += 1
        step, dev = self.step, self.world.device
        self.inject.arm(step)
        self.monitor.start_step()
        # on a CPU the tensor tracker costs a Python call per operator: every few steps only
        track = dev.type == "cuda" or step <= 3 or step % int(self.mc["cpu_track_every"]) == 0
        tracker = self.cpu_tracker if track else None
        with tracker if tracker is not None else contextlib.nullcontext():
            result = train_step(self.model, self.optimizer, group, self.tc["grad_clip"],
                                PRECISIONS[self.run_plan.options.precision], self.scaler, dev, self.world.size,
                                sharded=self.opts.fsdp, agreement=self.agreement,
                                on_oom=lambda e, n: self.log(f"step {step}: {e}; splitting {n} utterances"))
        self.scheduler.step()
        predicted = int(self.limit.expected(result.shapes)) if result.shapes else 0
        if track:
            shape = max(result.shapes, key=lambda s: s[0] * s[1]) if result.shapes else (0, 0, 0)
            self.monitor.end_step(step, self.epoch, shape, predicted, tracker.peak if tracker else None,
                                  tracker.current if tracker else None)
        self._record(result, group, predicted, n_batches)

    def _exclude(self, excluded: list) -> None:
        """Clips the loader could not use: said now (file:line), written to the ledger with the step."""
        for key, index, reason in excluded:
            self.log(f"excluded {key!r} ({self.train_len.origins[index]}): {reason}")
            self.unreadable.append((key, reason))

    def _record(self, result, group, predicted: int, n_batches: int) -> None:
        """The ledger (every rank's keys, by rank), the log line and the progress bar."""
        parts = distributed.gather_objects((result.trained, result.quarantined, self.unreadable))
        self.unreadable = []
        if result.quarantined:
            self.log(f"step {self.step}: quarantined {', '.join(result.quarantined)} (out of memory even alone)")
        if self.lead:
            self.ledger.write_step(self.epoch, self.step, parts, ranked=self.world.size > 1)
        if self.progress is None:
            return
        self.progress.add(sum(int(m.batch["text_lengths"].sum()) for m in group))
        loss = float(np.mean([float(s["loss"]) for s in result.stats])) if result.stats else float("nan")
        last = self.monitor.samples[-1] if self.monitor.samples else None
        if self.step % int(self.tc["log_interval"]) == 0 or self.position == n_batches:
            self.log(f"epoch {self.epoch} step {self.step} batch {self.position}/{n_batches} loss {loss:.3f} "
                     f"lr {self.scheduler.get_last_lr()[0]:.2e} {self.progress.rate():.0f} tokens/s "
                     + (f"memory peak {gib(last.peak)} at step {last.step} " if last else "")
                     + f"(predicted {gib(predicted)}, budget {gib(self.budget)})")
        self.progress.update(self.position, loss, last, self.budget)

    # -- validation, state
    def validate_and_keep(self, tag: str) -> None:
        """Validation loss and CER; the weights kept if among the keep_nbest_models best by CER."""
        if self.valid is None:
            return
        # every rank validates its share (under FSDP every rank takes part in every forward anyway)
        result = validate(self.asr, self.valid[0], self.valid[1], self.world.device, hotwords=self.hotwords,
                          world_size=self.world.size, rank=self.world.rank)
        if self.lead or self.opts.fsdp:
            weights = checkpoint.full_state(self.model, None, self.opts.fsdp)[0]  # a collective under FSDP
        if not self.lead:
            return
        self.log(f"{tag} validation: loss {result['loss']:.3f}, CER {100 * result['cer']:.2f} %, "
                 f"WER {100 * result['wer']:.2f} % on {result['utterances']} utterances"
                 + (f" ({len(result['excluded'])} unreadable, left out)" if result["excluded"] else ""))
        path = self.out / f"model.{tag}.pt"
        run_folder.save(path, weights, self.saved)
        keep = int(self.tc["keep_nbest_models"])
        # names, not paths: the folder can move; the dropped files go once a checkpoint no longer lists them
        best = sorted(self.best + [[result["cer"], path.name]], key=lambda x: x[0])
        self.dropped += [name for _, name in best[keep:]]
        self.best = best[:keep]

    def save_state(self) -> None:
        model_state, optim_state = checkpoint.full_state(self.model, self.optimizer, self.opts.fsdp)
        # every rank's random state (dropout, the glancing sampler, SpecAugment differ by rank), by rank
        rngs = distributed.gather_objects((checkpoint.rng_state(), self.gen.get_state()))
        if not self.lead:
            self.saved = self.step
            return
        path, state = self.out / "checkpoint.pt", {
            "model": model_state, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": {**self.sampler.state_dict(), "epoch": self.epoch, "position": self.position},
            "rng": [r for r, _ in rngs], "specaug_rng": [g for _, g in rngs], "step": self.step,
            "epoch": self.epoch, "best": self.best, "valid": [str(p) for p in self.opts.valid or []]}
        run_folder.save(path, state, self.saved)
        self.saved = self.step
        for name in self.dropped:
            run_folder.remove_kept(self.out, name, self.log)
        self.dropped = []

    def _stop_if_interrupted(self) -> None:
        """At a step boundary: if any rank got SIGINT or SIGTERM, every rank saves here and stops."""
        if not distributed.any_rank(self.interrupts.signum is not None):
            return
        if self.saved != self.step:
            self.save_state()
        raise run_folder.Interrupted(f"interrupted at epoch {self.epoch} step {self.step} (batch {self.position} of "
                                     f"the epoch); checkpoint saved: resume with --resume",
                                     self.interrupts.exit_code())

    def close(self) -> None:
        """The end of training on every rank: files closed, FSDP's weights gathered, the group left."""
        self.abort()
        self.final_state = checkpoint.full_state(self.model, None, True)[0] if self.opts.fsdp else None
        distributed.teardown()

    def abort(self) -> None:
        """What is safe on a failure too: no collective (the other ranks may be anywhere)."""
        self.interrupts.restore()
        if self.progress:
            self.progress.stop()
        if self.monitor is not None:
            self.monitor.close()
        if self.ledger is not None:
            self.ledger.close()

    # -- export
    def export(self) -> int:
        """The final model (average of the n best by validation CER, or the last weights) as a FunASR
        directory, on rank 0."""
        if not self.lead:
            return 0
        model, tc = self.model, self.tc
        if self.opts.fsdp:  # a plain model with the gathered weights (and adapters), for averaging and export
            options = self.run_plan.options
            model = unsharded(self.spec.build, self.final_state, options.lora_r, self.config["lora"]["alpha"],
                              options.lora_dropout, options.lora_targets)
        if self.best and int(tc["avg_nbest_model"]) > 0:
            chosen = [self.out / name for _, name in self.best[:int(tc["avg_nbest_model"])]]
            model.load_state_dict(checkpoint.average(chosen))
            self.log(f"final model: average of {len(chosen)} best epochs by validation CER: "
                     + ", ".join(Path(p).name for p in chosen))
        model = merge_lora(model)  # adapters folded into the weights: a plain FunASR model.pt
        model.to("cpu").eval()
        for layer in list(model.encoder.blocks()) + list(model.decoder.blocks()):
            layer.checkpoint = False
        asr, out = self.asr, self.out
        config = dict(asr.config)
        # FunASR's frontend dithers unless told not to, at inference too: the exported model decodes the
        # same every time, and as paratune decodes it
        config["frontend_conf"] = {**(config.get("frontend_conf") or {}), "dither": 0.0}
        save_model(ASRModel(model, asr.frontend.cpu(), asr.tokenizer, config, asr.path, asr.files), out / "final")
        self.log(f"wrote {out / 'final'} (loads in funasr.AutoModel), {out / 'memory.csv'}, {out / 'memory.png'}, "
                 f"{out / 'ledger.jsonl'}; {self.progress.elapsed() if self.progress else 0:.0f} s")
        return 0


def finetune(options: FinetuneOptions) -> int:
    return Finetune(options).run()
