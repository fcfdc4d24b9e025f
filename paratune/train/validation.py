"""Reading a split for training or evaluation, validation (loss, CER, WER), and CMVN from data."""
from __future__ import annotations

import torch

from paratune.data.hotwords import HotwordSampling
from paratune.data.loader import FeatureDataset, make_loader, model_inputs
from paratune.data.lengths import read_lengths
from paratune.data.sampler import MemoryBoundedSampler
from paratune.modeldir import ASRModel
from paratune.train import distributed
from paratune.train.metrics import error_rate


def load_split(paths, spec):
    """The manifests' usable lines as loader rows (key, source, target), their lengths, the bad lines."""
    lengths, errors = read_lengths(paths, spec.tokenizer, spec.frontend.lfr_n, spec.frontend.frame_shift,
                                   spec.frontend.frame_length, need_audio=True)
    rows = [{"key": key, "source": str(lengths.source(i)), "target": lengths.targets[i] or ""}
            for i, key in enumerate(lengths.keys)]
    return rows, lengths, errors


def estimate_cmvn(rows, frontend, n: int = 2000) -> torch.Tensor:
    """Mean and inverse std of the features of up to n readable training utterances, in am.mvn's layout
    (a clip that cannot be read is skipped here; training leaves it out and says so)."""
    dataset = FeatureDataset(rows[:n], frontend, None, train=False)
    feats = [f for f in map(dataset.features, range(len(dataset))) if f is not None]
    if not feats:
        raise ValueError("no readable training utterance to estimate CMVN from")
    feats = torch.cat(feats)
    return torch.stack([-feats.mean(0), 1 / feats.std(0).clamp_min(1e-3)])


@torch.no_grad()
def validate(asr: ASRModel, rows, lengths, device, batch_frames: int = 20000,
             hotwords: HotwordSampling | None = None, world_size: int = 1, rank: int = 0) -> dict:
    """Loss, CER and WER over every utterance: one longer than `batch_frames` goes in a batch of its own
    (none is skipped); clips that cannot be read are counted out in "excluded" as (origin, reason). A
    SeACo model's loss takes `hotwords` sampled from the targets (the same at every validation); its
    CER is decoded without hotwords. Under torchrun rank r validates every world_size-th batch from the
    r-th and every rank returns the whole set's scores. Every rank runs as many forwards (FSDP gathers
    weights in each): one short of batches, or whose clips are all unreadable, runs a placeholder."""
    model = asr.model.eval()
    longest = int(lengths.frames.max()) if len(lengths) else 0
    sampler = MemoryBoundedSampler(lengths.frames, lengths.tokens, max_frames=max(batch_frames, longest),
                                   shuffle=False)
    batches = sampler.batches(0)
    mine = batches[rank::world_size]
    mine += [[]] * (-(-len(batches) // world_size) - len(mine))  # as many as any rank runs
    dataset = FeatureDataset(rows, asr.frontend, asr.tokenizer, train=False, hotwords=hotwords)
    loader = make_loader(dataset, mine, workers=0)  # an empty batch: the loader's placeholder
    hyps, refs, loss_sum, weight_sum, excluded = [], [], 0.0, 0.0, []
    for batch in loader:
        excluded += [(lengths.origins[i], reason) for _, i, reason in batch["excluded"]]
        if not batch["keys"]:
            if world_size > 1:
                inputs = model_inputs(batch, device)
                model(**inputs)
                model.decode(inputs["speech"], inputs["speech_lengths"])
            continue
        inputs = model_inputs(batch, device)
        loss, _, weight = model(**inputs)
        loss_sum += float(loss) * float(weight)
        weight_sum += float(weight)
        for ids, i in zip(model.decode(inputs["speech"], inputs["speech_lengths"]), batch["indices"]):
            hyps.append(asr.text(ids))
            refs.append(rows[i]["target"])
    model.train()
    if world_size > 1:  # the ranks' shares, in rank order
        parts = distributed.gather_objects((hyps, refs, loss_sum, weight_sum, excluded))
        hyps, refs, excluded = (sum((p[i] for p in parts), []) for i in (0, 1, 4))
        loss_sum, weight_sum = sum(p[2] for p in parts), sum(p[3] for p in parts)
    return {"loss": loss_sum / max(weight_sum, 1e-9), "cer": error_rate(hyps, refs, "char"),
            "wer": error_rate(hyps, refs, "word"), "utterances": len(refs), "excluded": excluded}

