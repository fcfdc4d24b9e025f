"""Batches of features for training: computed in DataLoader worker processes, padded, pinned.

The sampler decides which utterances go together; workers read and resample the audio and compute the
fbank + LFR + CMVN features (the expensive part, kept off the training process), and the collate pads
them to the batch's (bucketed) length. Pinned host memory lets the copy to the GPU run asynchronously.

A clip that cannot be read, or whose audio or features are not finite, is left out of its batch here
(`batch["excluded"]`: its key, index and the reason) and the rest of the batch goes on: one bad file
costs that file, never the run. A batch whose every clip is bad becomes a placeholder (`keys` empty) so
that every rank still runs the step's collectives.

For a SeACo-Paraformer (`hotwords`, paratune.data.hotwords) every utterance also gets its hotword spans,
drawn from its (seed, epoch, index) only, and the batch the hotword tensors they make.
"""
from __future__ import annotations

from functools import partial

import numpy as np

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from paratune.data.audio import AudioError, load_audio, resample
from paratune.data.frontend import WavFrontend
from paratune.data.hotwords import HotwordSampling, sample_spans, span_rng, with_hotwords
from paratune.data.tokenizer import CharTokenizer

IGNORE_ID = -1  # padding of the targets, which the loss ignores (FunASR's ignore_id)
# the tensors the model's forward takes (the last three only in a batch with hotwords)
INPUTS = ("speech", "speech_lengths", "text", "text_lengths", "hotword_pad", "hotword_lengths", "seaco_label_pad")


class FeatureDataset(Dataset):
    """rows: dicts with "key", "source" and (for training) "target", e.g. `paratune prepare`'s data.jsonl."""

    def __init__(self, rows: list[dict], frontend: WavFrontend, tokenizer: CharTokenizer, train: bool = True,
                 seed: int = 0, speed_perturb=None, gain_db: float = 0.0, noise_snr_db=None, tilt: float = 0.0,
                 hotwords: HotwordSampling | None = None):
        self.rows, self.frontend, self.tokenizer, self.train = rows, frontend, tokenizer, train
        self.hotwords = hotwords  # spans sampled in validation too (FunASR's uses the same dataset class)
        self.seed, self.epoch = seed, 0  # the dither noise depends on (seed, epoch, utterance) only
        # training-time waveform augmentation: speed (resampling, as FunASR's speed_perturb) and gain
        self.speed_perturb, self.gain_db = list(speed_perturb or []), float(gain_db or 0.0)
        # white noise at a random SNR in [lo, hi] dB, and a random spectral tilt (a first-order filter
        # 1 - a z^-1, |a| <= tilt): the channel and room differences between speakers' recordings
        self.noise_snr_db, self.tilt = (list(noise_snr_db) if noise_snr_db else None), float(tilt or 0.0)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        try:
            feats = self._features(i, row)
        except (AudioError, ValueError) as e:  # ValueError: too short for one frame
            return {"key": row["key"], "index": i, "excluded": str(e)}
        text = torch.tensor(self.tokenizer.encode(row.get("target") or "") if self.tokenizer else [],
                            dtype=torch.long)
        item = {"key": row["key"], "index": i, "speech": feats, "text": text}
        if self.hotwords is not None:
            item["hotword_spans"] = sample_spans(len(text), span_rng(self.seed, self.epoch, i), self.hotwords)
        return item

    def features(self, i: int) -> torch.Tensor | None:
        """Utterance i's features, or None if its clip cannot be used."""
        item = self[i]
        return None if "excluded" in item else item["speech"]

    def _features(self, i: int, row: dict) -> torch.Tensor:
        self.frontend.train(self.train)  # dither only in training
        wave = load_audio(row["source"], self.frontend.fs)  # NonFiniteAudioError for NaN/inf samples
        # seeded per utterance, not by worker: the same features whichever worker reads it, after a resume too
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            if self.train and self.speed_perturb:
                speed = self.speed_perturb[int(torch.randint(len(self.speed_perturb), (1,)))]
                if speed != 1.0:  # played `speed` times faster: fewer samples at the same rate
                    wave = resample(wave, int(round(self.frontend.fs * speed)), self.frontend.fs)
            if self.train and self.tilt:
                a = (torch.rand(1).item() * 2 - 1) * self.tilt
                wave = np.concatenate([wave[:1], wave[1:] - a * wave[:-1]]).astype(np.float32)
            if self.train and self.noise_snr_db:
                lo, hi = self.noise_snr_db
                snr = lo + torch.rand(1).item() * (hi - lo)
                power = float(np.mean(wave ** 2)) + 1e-12
                noise = torch.randn(len(wave)).numpy() * np.sqrt(power / 10 ** (snr / 10))
                wave = (wave + noise).astype(np.float32)
            if self.train and self.gain_db:
                wave = wave * float(10 ** ((torch.rand(1).item() * 2 - 1) * self.gain_db / 20))
            feats = self.frontend.features(wave)
        if not torch.isfinite(feats).all():
            raise AudioError(row["source"], "features are not finite (NaN or inf)")
        return feats


def collate(items: list[dict], pad_frames=None, feature_dim: int | None = None,
            hotwords: HotwordSampling | None = None) -> dict:
    """Pad to the longest utterance (or to `pad_frames(longest)`, the sampler's bucket length). Items
    that could not be read go to "excluded" as (key, index, reason); if none is left, the batch is a
    placeholder of 8 silent frames (`feature_dim` wide) that trains no key. With `hotwords`, the items'
    "hotword_spans" and the hotword tensors they make (paratune.data.hotwords.with_hotwords)."""
    excluded = [(x["key"], x["index"], x["excluded"]) for x in items if "excluded" in x]
    items = [x for x in items if "excluded" not in x]
    if not items:
        return {**placeholder_batch(feature_dim, hotwords), "excluded": excluded}
    lengths = torch.tensor([x["speech"].shape[0] for x in items])
    speech = pad_sequence([x["speech"] for x in items], batch_first=True)
    if pad_frames is not None:
        target = int(pad_frames(int(lengths.max())))
        if target > speech.shape[1]:
            speech = torch.nn.functional.pad(speech, (0, 0, 0, target - speech.shape[1]))
    text = pad_sequence([x["text"] for x in items], batch_first=True, padding_value=IGNORE_ID)
    batch = {"speech": speech, "speech_lengths": lengths, "text": text,
             "text_lengths": torch.tensor([len(x["text"]) for x in items]),
             "keys": [x["key"] for x in items], "indices": [x["index"] for x in items], "excluded": excluded}
    return batch if hotwords is None else with_hotwords(batch, [x["hotword_spans"] for x in items], hotwords)


def placeholder_batch(feature_dim: int | None, hotwords: HotwordSampling | None = None) -> dict:
    """One utterance of 8 zero frames and one token, for a batch with nothing to train: run at loss
    scale 0, it keeps this rank's forward and backward in step with the other ranks'. With `hotwords`,
    no span: the hotwords are [[sos]] and the SeACo label [[no_bias]]."""
    if not feature_dim:
        raise ValueError("a batch with no readable clip needs the feature dimension for its placeholder")
    batch = {"speech": torch.zeros(1, 8, feature_dim), "speech_lengths": torch.tensor([8]),
             "text": torch.zeros(1, 1, dtype=torch.long), "text_lengths": torch.tensor([1]), "keys": [],
             "indices": []}
    return batch if hotwords is None else with_hotwords(batch, [[-1]], hotwords)


def make_loader(dataset: FeatureDataset, batch_sampler, workers: int = 2, pin_memory: bool | None = None,
                prefetch: int = 2) -> DataLoader:
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    pad = partial(collate, pad_frames=getattr(batch_sampler, "padded", None),
                  feature_dim=dataset.frontend.output_size(), hotwords=dataset.hotwords)
    # its own generator: making a loader does not draw from the global RNG (exact resume)
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=pad,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=prefetch if workers > 0 else None, generator=torch.Generator())


def model_inputs(batch: dict, device) -> dict:
    """The tensors the model's forward takes (`INPUTS` the batch has), on `device` (non-blocking from
    pinned memory)."""
    return {k: batch[k].to(device, non_blocking=True) for k in INPUTS if k in batch}


def step_batch(batch: dict) -> dict:
    """What a training step keeps of a loader's batch: the model's inputs, the keys, and the hotword
    spans and sampling (a batch split after an OOM rebuilds its halves' hotwords from them)."""
    return {k: batch[k] for k in (*INPUTS, "keys", "hotword_spans", "hotwords") if k in batch}
