"""Paraformer: SANM encoder -> CIF predictor -> non-autoregressive SANM decoder.

Gao et al., "Paraformer: Fast and Accurate Parallel Transformer for Non-autoregressive End-to-End
Speech Recognition", arXiv:2206.08317. Same computation and parameter names as FunASR 1.4.16's
`Paraformer` (so a FunASR `model.pt` loads with strict=True), with three deliberate differences:
the glancing sampler runs in training mode only (FunASR also samples during validation), padded
encoder frames are zeroed before CIF (FunASR's batched results depend on batch composition), and
the label-smoothed loss is computed without materialising a (tokens x vocab) target distribution.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from paratune.model.cif import CifPredictorV2
from paratune.model.decoder import ParaformerSANMDecoder
from paratune.model.sanm import SANMEncoder


def label_smoothing_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float, ignore_id: int,
                         normalize_length: bool) -> torch.Tensor:
    """FunASR's LabelSmoothingLoss: KL(q || softmax(logits)) summed over non-ignored tokens, where q
    puts 1 - smoothing on the target and smoothing / (V - 1) on every other token.

    KL = sum q log q - sum q log p; the second term is cross-entropy with torch's label smoothing
    `V * s` (which spreads over all V tokens), the first a constant per token.
    """
    b, _, v = logits.shape
    logits = logits.reshape(-1, v).float()
    target = target.reshape(-1)
    s = smoothing / (v - 1)
    ce = F.cross_entropy(logits, target, ignore_index=ignore_id, label_smoothing=min(s * v, 1.0),
                         reduction="sum")
    count = (target != ignore_id).sum()
    conf = 1.0 - smoothing
    neg_entropy = (conf * math.log(conf) if conf > 0 else 0.0) + ((v - 1) * s * math.log(s) if s > 0 else 0.0)
    loss = ce + neg_entropy * count
    return loss / (count if normalize_length else b)


class Paraformer(nn.Module):
    PREDICTOR = CifPredictorV2  # BiCifParaformer's predictor adds the timestamp head

    def __init__(self, vocab_size: int, input_size: int, encoder_conf: dict, decoder_conf: dict,
                 predictor_conf: dict, lsm_weight: float = 0.0, length_normalized_loss: bool = False,
                 predictor_weight: float = 0.0, predictor_bias: int = 0, sampling_ratio: float = 0.2,
                 ignore_id: int = -1, blank_id: int = 0, sos: int = 1, eos: int = 2):
        super().__init__()
        self.encoder = SANMEncoder(input_size, **encoder_conf)
        self.decoder = ParaformerSANMDecoder(vocab_size, self.encoder.output_size(), **decoder_conf)
        self.predictor = self.PREDICTOR(**predictor_conf)
        self.vocab_size = vocab_size
        self.lsm_weight = lsm_weight
        self.length_normalized_loss = length_normalized_loss
        self.predictor_weight = predictor_weight
        self.predictor_bias = predictor_bias
        self.sampling_ratio = sampling_ratio
        self.ignore_id = ignore_id
        self.blank_id = blank_id
        self.sos = sos
        self.eos = eos

    # ---- building blocks -------------------------------------------------------------------

    def block_stacks(self) -> dict:
        """The model's stacks of blocks by name: what checkpointing and FSDP work per block on."""
        return {"encoder": self.encoder.blocks(), "decoder": self.decoder.blocks()}

    def encode(self, speech: torch.Tensor, speech_lengths: torch.Tensor):
        return self.encoder(speech, speech_lengths)

    @staticmethod
    def frame_mask(encoder_out, encoder_lengths) -> torch.Tensor:
        """(B, T) 1.0 on each utterance's real encoder frames."""
        return (torch.arange(encoder_out.size(1), device=encoder_out.device)[None, :]
                < encoder_lengths[:, None]).to(encoder_out.dtype)

    def predict(self, encoder_out, encoder_lengths, target_lengths=None, max_tokens=None):
        return self.predictor(encoder_out, self.frame_mask(encoder_out, encoder_lengths), target_lengths, max_tokens)

    def targets(self, text: torch.Tensor, text_lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, any padding -> (B, L + predictor_bias): eos after each when the bias is 1,
        padded with ignore_id. L is the padded width, not max(text_lengths): shapes never depend
        on tensor values, so a step can be traced with fake tensors. Collate pads to the longest."""
        width = text.size(1) + (1 if self.predictor_bias == 1 else 0)
        pos = torch.arange(width, device=text.device)[None, :]
        pad = torch.full((text.size(0), width - text.size(1)), self.ignore_id, dtype=torch.long, device=text.device)
        ys = torch.cat([text.long(), pad], 1)
        ys = ys.masked_fill(pos >= text_lengths[:, None], self.ignore_id)
        if self.predictor_bias == 1:
            ys = ys.masked_fill(pos == text_lengths[:, None], self.eos)
        return ys

    def glance(self, encoder_out, encoder_lengths, ys, ys_lengths, acoustic_embeds):
        """Glancing sampler: decode once without gradients, then replace a share (sampling_ratio) of
        the wrongly predicted positions' acoustic embeddings by the target tokens' embeddings."""
        valid = ys != self.ignore_id
        target_embeds = self.decoder.embed(ys.masked_fill(~valid, 0))
        with torch.no_grad():
            first = self.decoder(encoder_out, encoder_lengths, acoustic_embeds, ys_lengths)
            wrong = ys_lengths - ((first.argmax(-1) == ys) & valid).sum(1)
            n_glance = (wrong.float() * self.sampling_ratio).long()
            # n_glance positions drawn uniformly among each utterance's real positions
            score = torch.rand(ys.shape, device=ys.device).masked_fill(~valid, 2.0)
            rank = score.argsort(1).argsort(1)
            use_target = (rank < n_glance[:, None]) & valid
        tgt_mask = valid[:, :, None].to(acoustic_embeds.dtype)
        embeds = torch.where(use_target[:, :, None], target_embeds.to(acoustic_embeds.dtype), acoustic_embeds)
        return embeds * tgt_mask, first * tgt_mask

    # ---- training ------------------------------------------------------------------------------

    def count_loss(self, ys_lengths: torch.Tensor, token_num: torch.Tensor) -> torch.Tensor:
        """The predictor's L1 loss on the token count (FunASR's mae_loss)."""
        target_len = ys_lengths.to(token_num.dtype)
        return F.l1_loss(target_len, token_num, reduction="sum") / (
            target_len.sum() if self.length_normalized_loss else ys_lengths.size(0))

    def attention_loss(self, encoder_out, encoder_lengths, ys, ys_lengths, acoustic_embeds, token_num) -> dict:
        """loss_att (decoder, after the glancing sampler), loss_pre (token count) and acc: FunASR's
        `_calc_att_loss`."""
        first = None
        if self.sampling_ratio > 0.0 and self.training:
            embeds, first = self.glance(encoder_out, encoder_lengths, ys, ys_lengths, acoustic_embeds)
        else:
            embeds = acoustic_embeds
        logits = self.decoder(encoder_out, encoder_lengths, embeds, ys_lengths)
        if first is None:
            first = logits.detach()
        loss_att = label_smoothing_loss(logits, ys, self.lsm_weight, self.ignore_id, self.length_normalized_loss)
        valid = ys != self.ignore_id
        acc = ((first.argmax(-1) == ys) & valid).sum().float() / valid.sum().clamp(min=1)
        return {"loss_att": loss_att, "loss_pre": self.count_loss(ys_lengths, token_num), "acc": acc.detach()}

    def losses(self, encoder_out, encoder_lengths, ys, ys_lengths, predicted) -> dict:
        """Every loss term and their weighted sum "loss"; `predicted` is what `predict` returned."""
        terms = self.attention_loss(encoder_out, encoder_lengths, ys, ys_lengths, predicted[0], predicted[1])
        terms["loss"] = terms["loss_att"] + terms["loss_pre"] * self.predictor_weight
        return terms

    def forward(self, speech: torch.Tensor, speech_lengths: torch.Tensor, text: torch.Tensor,
                text_lengths: torch.Tensor, **inputs):
        """FunASR's signature: returns (loss, stats, weight). `inputs`: a subclass's extra tensors
        (SeACo's hotwords)."""
        if text_lengths.dim() > 1:
            text_lengths = text_lengths[:, 0]
        if speech_lengths.dim() > 1:
            speech_lengths = speech_lengths[:, 0]
        batch_size = speech.size(0)
        encoder_out, encoder_lengths = self.encode(speech, speech_lengths)
        ys = self.targets(text, text_lengths)
        ys_lengths = text_lengths + (1 if self.predictor_bias == 1 else 0)
        predicted = self.predict(encoder_out, encoder_lengths, ys_lengths, ys.size(1))
        terms = self.losses(encoder_out, encoder_lengths, ys, ys_lengths, predicted, **inputs)
        loss = terms["loss"]
        stats = {k: v.detach() for k, v in terms.items()}
        stats["batch_size"] = batch_size
        if self.length_normalized_loss:
            weight = (text_lengths + self.predictor_bias).sum()
        else:
            weight = torch.tensor(batch_size, device=loss.device)
        return loss, stats, weight

    # ---- inference ----------------------------------------------------------------------------

    def decoder_scores(self, encoder_out, encoder_lengths, embeds, lengths, **options) -> torch.Tensor:
        """Scores (B, U, V) whose argmax is the decoded token: the decoder's logits (SeACo biases them)."""
        return self.decoder(encoder_out, encoder_lengths, embeds, lengths)

    @torch.no_grad()
    def recognize(self, speech: torch.Tensor, speech_lengths: torch.Tensor, **options):
        """Greedy CIF decoding: one token per fired CIF step, argmax of the decoder, no beam. Returns the
        token ids per utterance and (encoder output, its lengths, the token counts) for what follows."""
        encoder_out, encoder_lengths = self.encode(speech, speech_lengths)
        embeds, token_num = self.predict(encoder_out, encoder_lengths)[:2]
        lengths = token_num.round().long()
        if lengths.numel() == 0 or lengths.max() < 1:
            return [[] for _ in range(speech.size(0))], (encoder_out, encoder_lengths, lengths)
        best = self.decoder_scores(encoder_out, encoder_lengths, embeds, lengths, **options).argmax(-1).tolist()
        drop = {self.eos, self.sos, self.blank_id}
        ids = [[i for i in row[:n] if i not in drop] for row, n in zip(best, lengths.tolist())]
        return ids, (encoder_out, encoder_lengths, lengths)

    @torch.no_grad()
    def decode(self, speech: torch.Tensor, speech_lengths: torch.Tensor, **options) -> list[list[int]]:
        """The token ids of each utterance (greedy, see `recognize`)."""
        return self.recognize(speech, speech_lengths, **options)[0]
