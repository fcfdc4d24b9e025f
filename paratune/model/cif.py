"""Continuous integrate-and-fire (CIF) and Paraformer's predictor.

Dong & Xu, "CIF: Continuous Integrate-and-Fire for End-to-End Speech Recognition", arXiv:1905.11235.

CIF walks the encoder frames, adding each frame's weight alpha to an integrator; when the integrator
crosses 1 it "fires" a token whose embedding is the alpha-weighted sum of the frames since the last
fire, the crossing frame split between this token and the next. FunASR's reference is a Python loop
over frames; here every frame's share is found from a cumulative sum, so the whole thing is a few
tensor operations and one batched matmul (weights (B, U, T) @ frames (B, T, D)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cif(hidden: torch.Tensor, alphas: torch.Tensor, threshold: float = 1.0,
        target_lengths: torch.Tensor | None = None, max_tokens: int | None = None, carry: bool = False):
    """Integrate `hidden` (B, T, D) with weights `alphas` (B, T).

    Returns (embeds (B, U, D), fires (B, T)): U = max over the batch of round(sum(alphas)), a
    token only where the integrator fired (the rest zero), and fires the integrator value at each
    frame before it is reset (above 1 where a token fires), as FunASR returns them.

    A frame fires where floor(cumsum(alpha)) steps up, with the cumulative sum taken in float64 and
    rounded to float32, as FunASR 1.4.16's `cif_v1` decides; the shares are computed in float64.
    `threshold` is accepted for config compatibility: like FunASR's training path, firing happens at
    integer boundaries (threshold 1.0).

    With `target_lengths` (training: the alphas were scaled to sum to them) the decisions are taken
    on the cumulative sum scaled to end exactly on the target, so the last token always fires. In
    FunASR it fires only when float rounding leaves the sum at or above the integer.
    `max_tokens` (training: the padded target width) fixes U without reading tensor values, so a
    training step can be traced with fake tensors (the memory model does).

    A frame fires at most one token. Where one frame's weight crosses two integers (possible only in
    training, where alphas are scaled up to the target length) `cif_v1` loses the second token (and
    every later token is one off its target); with `carry` the excess stays in the integrator and the
    next frame fires it, as FunASR's loop `cif` does (the BiCif/SeACo predictor, CifPredictorV3): the
    token count after frame t is n_t = min(n_{t-1} + 1, floor_t), a running minimum. Below 1 per frame
    (inference, and training with a trained predictor) the two agree. A token still owed at the last
    frame does not fire (nor in FunASR).
    """
    b, t, _ = hidden.shape
    csum = torch.cumsum(alphas.double(), dim=1)
    decide = csum
    if target_lengths is not None and t > 0:
        total = csum[:, -1:]
        decide = torch.where(total > 0, csum * (target_lengths.double()[:, None] / total), csum)
    floor = torch.floor(decide.float()).double()  # fire decisions on float32, like FunASR
    if carry and t > 0:  # tokens fired by frame t: min over s <= t of floor_s + (t - s), and t + 1
        steps = torch.arange(t, device=floor.device, dtype=floor.dtype)
        floor = steps + torch.cummin(floor - steps, dim=1).values.clamp(max=1.0)
    prev_floor = F.pad(floor[:, :-1], (1, 0))
    fire = floor > prev_floor  # (B, T)

    # a frame gives `cur` to the token being integrated and, if it fires, `rem` to the next one
    rem = torch.where(fire, csum - floor, torch.zeros_like(csum))
    cur = alphas.double() - rem
    n_fired = torch.cumsum(fire.long(), dim=1)
    token = n_fired - fire.long()  # index of the token this frame completes or continues
    total = n_fired[:, -1] if t > 0 else torch.zeros(b, dtype=torch.long, device=hidden.device)

    if max_tokens is not None:
        u = max_tokens
    else:
        u = int(torch.round(alphas.sum(-1)).max().item()) if t > 0 else 0
        u = max(u, int(total.max().item()) if t > 0 else 0)
    if u == 0:
        return hidden.new_zeros(b, 0, hidden.size(-1)), (csum - prev_floor).to(alphas.dtype)

    weights = hidden.new_zeros(b, t, u + 1)
    weights = weights.scatter_add(2, token[:, :, None], cur.to(hidden.dtype)[:, :, None])
    weights = weights.scatter_add(2, (token + 1).clamp(max=u)[:, :, None], rem.to(hidden.dtype)[:, :, None])
    # the token still being integrated at the end never fired: it is padding, like FunASR's zeros
    fired = torch.arange(u + 1, device=hidden.device)[None, :] < total[:, None]
    weights = weights * fired[:, None, :].to(weights.dtype)
    embeds = torch.bmm(weights[:, :, :u].transpose(1, 2), hidden)
    fires = (csum - prev_floor).to(alphas.dtype)
    return embeds, fires


class CifPredictorV2(nn.Module):
    """Predicts a weight per encoder frame and integrates the frames into token embeddings."""

    CARRY = False  # FunASR's CifPredictorV2 integrates with cif_v1 (see `cif`)

    def __init__(self, idim: int, l_order: int, r_order: int, threshold: float = 1.0,
                 smooth_factor: float = 1.0, noise_threshold: float = 0.0, tail_threshold: float = 0.0,
                 batch_invariant: bool = True):
        super().__init__()
        # True: padded encoder frames are zeroed before the predictor, so each utterance's result is
        # what it would be alone in its batch (FunASR with batch size 1). False: FunASR's batched
        # arithmetic exactly, where the frames past a short utterance's end (encoder output over
        # padding) leak into its last alphas and tail token.
        self.batch_invariant = batch_invariant
        self.padding = (l_order, r_order)
        self.cif_conv1d = nn.Conv1d(idim, idim, l_order + r_order + 1)
        self.cif_output = nn.Linear(idim, 1)
        self.threshold = threshold
        self.smooth_factor = smooth_factor
        self.noise_threshold = noise_threshold
        self.tail_threshold = tail_threshold

    def alphas(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-frame weights (B, T), zero on padding."""
        x = torch.relu(self.cif_conv1d(F.pad(hidden.transpose(1, 2), self.padding))).transpose(1, 2)
        alphas = torch.sigmoid(self.cif_output(x)).squeeze(-1)
        alphas = torch.relu(alphas * self.smooth_factor - self.noise_threshold)
        return alphas * mask

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, target_lengths: torch.Tensor | None = None,
                max_tokens: int | None = None):
        """hidden (B, T, D), mask (B, T) 1.0 on real frames, target_lengths (B,) tokens incl. eos,
        max_tokens the padded target width (U of the result; default: from the weights).

        Returns (embeds (B, U, D), token_num (B,), alphas, fires). With targets (training) the
        alphas are rescaled so they sum to the target length, and token_num is the unscaled sum
        the predictor loss compares with it.
        """
        # CIF sums hundreds of small weights: keep it in float32 under autocast, as FunASR does
        with torch.autocast(hidden.device.type, enabled=False):
            hidden = hidden.float()
            mask = mask.float()
            if self.batch_invariant:
                hidden = hidden * mask[:, :, None]
            alphas = self.alphas(hidden, mask)
            token_num = alphas.sum(-1)
            if target_lengths is not None:
                alphas = alphas * (target_lengths.to(alphas.dtype) / token_num)[:, None]
            elif self.tail_threshold > 0.0:
                hidden, alphas, token_num = self._add_tail(hidden, alphas, mask)
            embeds, fires = cif(hidden, alphas, self.threshold, target_lengths, max_tokens, self.CARRY)
            if target_lengths is None and self.tail_threshold > 0.0:
                embeds = embeds[:, : int(token_num.max().item())]
        return embeds, token_num, alphas, fires

    def _add_tail(self, hidden, alphas, mask):
        """Add `tail_threshold` of weight just past each utterance's end so a last partial token
        fires; one zero frame is appended to hold it for the longest utterance."""
        b, _, d = hidden.shape
        zeros = mask.new_zeros(b, 1)
        end = torch.cat([zeros + 1, mask], 1) - torch.cat([mask, zeros], 1)  # 1 at index length
        alphas = torch.cat([alphas, zeros], 1) + end * self.tail_threshold
        hidden = torch.cat([hidden, hidden.new_zeros(b, 1, d)], 1)
        return hidden, alphas, torch.floor(alphas.sum(-1))


class CifPredictorV3(CifPredictorV2):
    """CifPredictorV2 plus a second, upsampled CIF head that predicts token timestamps (BiCifParaformer).

    Shi et al., "Achieving Timestamp Prediction While Recognizing with Non-Autoregressive End-to-End ASR
    Model", arXiv:2301.12343. The encoder output is upsampled `upsample_times` (a transposed convolution,
    then a BLSTM for `cnn_blstm`) and a second weight per upsampled frame is predicted; trained only on the
    token count (loss_pre2), its firing points mark where tokens start.
    """

    CARRY = True  # FunASR's CifPredictorV3 integrates with the loop `cif` (see `cif`)

    def __init__(self, idim: int, l_order: int, r_order: int, threshold: float = 1.0, smooth_factor: float = 1.0,
                 noise_threshold: float = 0.0, tail_threshold: float = 0.0, smooth_factor2: float = 1.0,
                 noise_threshold2: float = 0.0, upsample_times: int = 5, upsample_type: str = "cnn",
                 use_cif1_cnn: bool = True, batch_invariant: bool = True):
        super().__init__(idim, l_order, r_order, threshold, smooth_factor, noise_threshold, tail_threshold,
                         batch_invariant)
        if upsample_type not in ("cnn", "cnn_blstm"):
            raise ValueError(f"upsample_type {upsample_type!r} is not supported (supported: cnn, cnn_blstm)")
        self.upsample_times, self.upsample_type, self.use_cif1_cnn = upsample_times, upsample_type, use_cif1_cnn
        self.upsample_cnn = nn.ConvTranspose1d(idim, idim, upsample_times, upsample_times)
        if upsample_type == "cnn_blstm":
            self.blstm = nn.LSTM(idim, idim, 1, bias=True, batch_first=True, bidirectional=True)
        self.cif_output2 = nn.Linear(idim * (2 if upsample_type == "cnn_blstm" else 1), 1)
        self.smooth_factor2, self.noise_threshold2 = smooth_factor2, noise_threshold2

    def upsampled_alphas(self, hidden: torch.Tensor, mask: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """Weights (B, T * upsample_times) of the upsampled frames, zero on padding. `packed`: the BLSTM
        reads each utterance's own frames only (its result does not depend on the batch's padding, as
        FunASR at batch size 1); otherwise it runs over the padded batch, as FunASR trains."""
        x = hidden.transpose(1, 2)
        if self.use_cif1_cnn:
            x = torch.relu(self.cif_conv1d(F.pad(x, self.padding)))
        up = self.upsample_cnn(x).transpose(1, 2)  # (B, T * times, D)
        mask2 = mask.repeat_interleave(self.upsample_times, dim=1)
        if self.upsample_type == "cnn_blstm":
            if packed:
                lengths = (mask2.sum(1).long().cpu()).clamp(min=1)
                seq = nn.utils.rnn.pack_padded_sequence(up, lengths, batch_first=True, enforce_sorted=False)
                up = nn.utils.rnn.pad_packed_sequence(self.blstm(seq)[0], batch_first=True,
                                                      total_length=up.size(1))[0]
            else:
                up = self.blstm(up)[0]
        alphas2 = torch.sigmoid(self.cif_output2(up)).squeeze(-1)
        return torch.relu(alphas2 * self.smooth_factor2 - self.noise_threshold2) * mask2

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, target_lengths: torch.Tensor | None = None,
                max_tokens: int | None = None):
        """As CifPredictorV2, plus the upsampled head's token count (B,): (embeds, token_num, alphas,
        fires, token_num2)."""
        embeds, token_num, alphas, fires = super().forward(hidden, mask, target_lengths, max_tokens)
        with torch.autocast(hidden.device.type, enabled=False):
            mask = mask.float()
            hidden = hidden.float() * (mask[:, :, None] if self.batch_invariant else 1.0)
            token_num2 = self.upsampled_alphas(hidden, mask).sum(-1)
        return embeds, token_num, alphas, fires, token_num2

    def timestamp_alphas(self, hidden: torch.Tensor, mask: torch.Tensor, token_num: torch.Tensor) -> torch.Tensor:
        """The upsampled weights scaled to sum to each utterance's decoded token count: where they fire
        is where tokens start (FunASR's `get_upsample_timestamp`)."""
        with torch.autocast(hidden.device.type, enabled=False):
            mask = mask.float()
            hidden = hidden.float() * (mask[:, :, None] if self.batch_invariant else 1.0)
            alphas2 = self.upsampled_alphas(hidden, mask, packed=self.batch_invariant)
            return alphas2 * (token_num.to(alphas2.dtype) / alphas2.sum(-1))[:, None]
