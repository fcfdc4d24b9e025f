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


class ConfigError(ValueError):
    """A model configuration paratune cannot build, with the offending key."""


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
    def __init__(self, vocab_size: int, input_size: int, encoder_conf: dict, decoder_conf: dict,
                 predictor_conf: dict, lsm_weight: float = 0.0, length_normalized_loss: bool = False,
                 predictor_weight: float = 0.0, predictor_bias: int = 0, sampling_ratio: float = 0.2,
                 ignore_id: int = -1, blank_id: int = 0, sos: int = 1, eos: int = 2):
        super().__init__()
        self.encoder = SANMEncoder(input_size, **encoder_conf)
        self.decoder = ParaformerSANMDecoder(vocab_size, self.encoder.output_size(), **decoder_conf)
        self.predictor = CifPredictorV2(**predictor_conf)
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

    def encode(self, speech: torch.Tensor, speech_lengths: torch.Tensor):
        return self.encoder(speech, speech_lengths)

    def predict(self, encoder_out, encoder_lengths, target_lengths=None, max_tokens=None):
        mask = (torch.arange(encoder_out.size(1), device=encoder_out.device)[None, :]
                < encoder_lengths[:, None]).to(encoder_out.dtype)
        return self.predictor(encoder_out, mask, target_lengths, max_tokens)

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

    def forward(self, speech: torch.Tensor, speech_lengths: torch.Tensor, text: torch.Tensor,
                text_lengths: torch.Tensor):
        """FunASR's signature: returns (loss, stats, weight)."""
        if text_lengths.dim() > 1:
            text_lengths = text_lengths[:, 0]
        if speech_lengths.dim() > 1:
            speech_lengths = speech_lengths[:, 0]
        batch_size = speech.size(0)
        encoder_out, encoder_lengths = self.encode(speech, speech_lengths)

        ys = self.targets(text, text_lengths)
        ys_lengths = text_lengths + (1 if self.predictor_bias == 1 else 0)
        acoustic_embeds, token_num, _, _ = self.predict(encoder_out, encoder_lengths, ys_lengths, ys.size(1))
        first = None
        if self.sampling_ratio > 0.0 and self.training:
            embeds, first = self.glance(encoder_out, encoder_lengths, ys, ys_lengths, acoustic_embeds)
        else:
            embeds = acoustic_embeds
        logits = self.decoder(encoder_out, encoder_lengths, embeds, ys_lengths)
        if first is None:
            first = logits.detach()

        loss_att = label_smoothing_loss(logits, ys, self.lsm_weight, self.ignore_id, self.length_normalized_loss)
        target_len = ys_lengths.to(token_num.dtype)
        loss_pre = F.l1_loss(target_len, token_num, reduction="sum") / (
            target_len.sum() if self.length_normalized_loss else batch_size)
        loss = loss_att + loss_pre * self.predictor_weight

        valid = ys != self.ignore_id
        acc = ((first.argmax(-1) == ys) & valid).sum().float() / valid.sum().clamp(min=1)
        stats = {"loss_att": loss_att.detach(), "loss_pre": loss_pre.detach(), "acc": acc.detach(),
                 "loss": loss.detach(), "batch_size": batch_size}
        if self.length_normalized_loss:
            weight = (text_lengths + self.predictor_bias).sum()
        else:
            weight = torch.tensor(batch_size, device=loss.device)
        return loss, stats, weight

    # ---- inference ----------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, speech: torch.Tensor, speech_lengths: torch.Tensor) -> list[list[int]]:
        """Greedy CIF decoding: one token per fired CIF step, argmax of the decoder, no beam."""
        encoder_out, encoder_lengths = self.encode(speech, speech_lengths)
        embeds, token_num, _, _ = self.predict(encoder_out, encoder_lengths)
        lengths = token_num.round().long()
        if lengths.numel() == 0 or lengths.max() < 1:
            return [[] for _ in range(speech.size(0))]
        logits = self.decoder(encoder_out, encoder_lengths, embeds, lengths)
        best = logits.argmax(-1).tolist()
        drop = {self.eos, self.sos, self.blank_id}
        return [[i for i in row[:n] if i not in drop] for row, n in zip(best, lengths.tolist())]


# ---- building from a FunASR config.yaml -------------------------------------------------------

_SUPPORTED = {"model": "Paraformer", "encoder": "SANMEncoder", "decoder": "ParaformerSANMDecoder",
              "predictor": "CifPredictorV2"}
_ENCODER_KEYS = {"output_size", "attention_heads", "linear_units", "num_blocks", "dropout_rate",
                 "attention_dropout_rate", "normalize_before", "kernel_size", "sanm_shfit"}
_DECODER_KEYS = {"attention_heads", "linear_units", "num_blocks", "dropout_rate", "self_attention_dropout_rate",
                 "src_attention_dropout_rate", "att_layer_num", "kernel_size", "sanm_shfit", "normalize_before"}
_PREDICTOR_KEYS = {"idim", "l_order", "r_order", "threshold", "smooth_factor", "noise_threshold",
                   "tail_threshold"}
_MODEL_KEYS = {"lsm_weight", "length_normalized_loss", "predictor_weight", "predictor_bias", "sampling_ratio",
               "ignore_id", "blank_id", "sos", "eos"}
# keys FunASR accepts that change nothing here when they hold these values
_INERT = {
    "encoder_conf": {"input_layer": {"pe"}, "pos_enc_class": {"SinusoidalPositionEncoder"},
                     "selfattention_layer_type": {"sanm"}, "concat_after": {False},
                     "positionwise_layer_type": {"linear"}, "interctc_layer_idx": {()},
                     "lora_list": {None}, "stochastic_depth_rate": {0, 0.0}},
    "decoder_conf": {"input_layer": {"embed"}, "use_output_layer": {True}, "wo_input_layer": {False},
                     "concat_after": {False}, "lora_list": {None}},
    "predictor_conf": {"tail_mask": {True}},
    "model_conf": {"ctc_weight": {0, 0.0}, "share_embedding": {False}, "use_1st_decoder_loss": {False}},
}
_IGNORED = {"positional_dropout_rate", "padding_idx", "positionwise_conv_kernel_size", "pos_enc_class",
            "chunk_multiply_factor", "lora_rank", "lora_alpha", "lora_dropout", "dropout",
            "tf2torch_tensor_name_prefix_torch", "tf2torch_tensor_name_prefix_tf", "interctc_use_conditioning"}


def _split(section: str, conf: dict, known: set, source: str) -> dict:
    out = {}
    for key, value in (conf or {}).items():
        if key in known:
            out[key] = value
        elif key in _INERT.get(section, {}):
            v = tuple(value) if isinstance(value, list) else value
            if v not in _INERT[section][key]:
                raise ConfigError(f"{source}: {section}.{key}={value!r} is not supported by paratune "
                                  f"(supported: {sorted(map(repr, _INERT[section][key]))})")
        elif key in _IGNORED:
            continue
        else:
            raise ConfigError(f"{source}: unknown key {section}.{key}")
    return out


def build_paraformer(config: dict, vocab_size: int, input_size: int, source: str = "config") -> Paraformer:
    """Build the model a FunASR `config.yaml` describes (already parsed into a dict)."""
    for key, expected in _SUPPORTED.items():
        if config.get(key) != expected:
            raise ConfigError(f"{source}: {key} is {config.get(key)!r}; paratune builds {key}: {expected}")
    model_conf = _split("model_conf", config.get("model_conf"), _MODEL_KEYS, source)
    return Paraformer(
        vocab_size=vocab_size,
        input_size=input_size,
        encoder_conf=_split("encoder_conf", config.get("encoder_conf"), _ENCODER_KEYS, source),
        decoder_conf=_split("decoder_conf", config.get("decoder_conf"), _DECODER_KEYS, source),
        predictor_conf=_split("predictor_conf", config.get("predictor_conf"), _PREDICTOR_KEYS, source),
        **model_conf,
    )


def paraformer_config(d: int, enc_blocks: int, dec_blocks: int, ffn: int, fs: int = 16000) -> dict:
    """The model and frontend sections of a FunASR `config.yaml` in paraformer-large's layout
    (../shared/data/paraformer_large/config.yaml) with small sizes: for models trained from scratch."""
    return {
        "model": "Paraformer",
        "model_conf": {"ctc_weight": 0.0, "lsm_weight": 0.1, "length_normalized_loss": True,
                       "predictor_weight": 1.0, "predictor_bias": 1, "sampling_ratio": 0.75},
        "encoder": "SANMEncoder",
        "encoder_conf": {"output_size": d, "attention_heads": 4, "linear_units": ffn, "num_blocks": enc_blocks,
                         "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.1,
                         "input_layer": "pe", "pos_enc_class": "SinusoidalPositionEncoder",
                         "normalize_before": True, "kernel_size": 11, "sanm_shfit": 0,
                         "selfattention_layer_type": "sanm"},
        "decoder": "ParaformerSANMDecoder",
        "decoder_conf": {"attention_heads": 4, "linear_units": ffn, "num_blocks": dec_blocks, "dropout_rate": 0.1,
                         "positional_dropout_rate": 0.1, "self_attention_dropout_rate": 0.1,
                         "src_attention_dropout_rate": 0.1, "att_layer_num": dec_blocks, "kernel_size": 11,
                         "sanm_shfit": 0},
        "predictor": "CifPredictorV2",
        "predictor_conf": {"idim": d, "threshold": 1.0, "l_order": 1, "r_order": 1, "tail_threshold": 0.45},
        "frontend": "WavFrontend",
        "frontend_conf": {"fs": fs, "window": "hamming", "n_mels": 80, "frame_length": 25, "frame_shift": 10,
                          "lfr_m": 7, "lfr_n": 6},
    }


def set_checkpointing(model: Paraformer, encoder_blocks: int | None = None, decoder_blocks: int | None = 0):
    """Turn on activation checkpointing for the first `encoder_blocks` encoder blocks (None: all)
    and the first `decoder_blocks` decoder blocks (None: all). Non-reentrant; dropout replays."""
    for stack, n in ((model.encoder.blocks(), encoder_blocks), (model.decoder.blocks(), decoder_blocks)):
        n = len(stack) if n is None else n
        for i, layer in enumerate(stack):
            layer.checkpoint = i < n
