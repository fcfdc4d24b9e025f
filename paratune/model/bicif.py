"""BiCifParaformer: Paraformer whose predictor also says where each token starts (timestamps).

Shi et al., "Achieving Timestamp Prediction While Recognizing with Non-Autoregressive End-to-End ASR
Model", arXiv:2301.12343; FunASR 1.4.16's `BiCifParaformer` (`paraformer-en`, the zh `-vad-punc` model).
The second CIF head (`CifPredictorV3`) is trained only on the token count (`loss_pre2`, at half the
predictor weight); at inference its upsampled weights, scaled to the decoded token count, fire where
tokens start, and `paratune.model.timestamps` turns the firing frames into milliseconds.
"""
from __future__ import annotations

import torch

from paratune.model.cif import CifPredictorV3
from paratune.model.paraformer import Paraformer
from paratune.model.timestamps import fire_weights, token_timestamps


class BiCifParaformer(Paraformer):
    PREDICTOR = CifPredictorV3

    def losses(self, encoder_out, encoder_lengths, ys, ys_lengths, predicted) -> dict:
        terms = super().losses(encoder_out, encoder_lengths, ys, ys_lengths, predicted)
        terms["loss_pre2"] = self.count_loss(ys_lengths, predicted[4])
        terms["loss"] = terms["loss"] + terms["loss_pre2"] * self.predictor_weight * 0.5
        return terms

    @torch.no_grad()
    def timestamp_weights(self, encoder_out, encoder_lengths, token_counts):
        """Per utterance, the upsampled weights and the integrator at each upsampled frame (its real
        frames only): FunASR's `us_alphas`, `us_peaks`."""
        alphas = self.predictor.timestamp_alphas(encoder_out, self.frame_mask(encoder_out, encoder_lengths),
                                                 token_counts)
        peaks = fire_weights(alphas, self.predictor.threshold - 1e-4)
        times = self.predictor.upsample_times
        return [(alphas[i, : n * times], peaks[i, : n * times]) for i, n in enumerate(encoder_lengths.tolist())]

    @torch.no_grad()
    def decode_timed(self, speech: torch.Tensor, speech_lengths: torch.Tensor, **options):
        """Token ids and their [start_ms, end_ms] per utterance (before FunASR's sentence post-processing
        merges word pieces)."""
        ids, (encoder_out, encoder_lengths, token_counts) = self.recognize(speech, speech_lengths, **options)
        if all(not row for row in ids) and token_counts.max() < 1:
            return [(row, []) for row in ids]
        weights = self.timestamp_weights(encoder_out, encoder_lengths, token_counts)
        times = self.predictor.upsample_times
        return [(row, token_timestamps(a, p, [""] * len(row), upsample_rate=times))
                for row, (a, p) in zip(ids, weights)]
