"""SeacoParaformer: BiCifParaformer biased towards hotwords (FunASR's `paraformer-zh`).

Shi et al., "SeACo-Paraformer: A Non-Autoregressive ASR System with Flexible and Effective Hotword
Customization Ability", arXiv:2308.03266; FunASR 1.4.16's `SeacoParaformer`. Each hotword's tokens go
through the decoder's embedding and an LSTM (the bias encoder); its last state is the hotword's vector.
A SANM decoder without input or output layer (`seaco_decoder`) attends from the acoustic embeddings and
from the decoder's hidden states to those vectors; the two results are added and `hotword_output_layer`
predicts, per token, either the hotword token it should be or `NO_BIAS`. Decoding takes the hotword
head's choice wherever it is not NO_BIAS. Training samples hotwords from the transcripts
(`paratune.data.hotwords`); the loss is the hotword head's plus `seaco_weight` times the decoder's.
"""
from __future__ import annotations

import torch
from torch import nn

from paratune.model.bicif import BiCifParaformer
from paratune.model.decoder import ParaformerSANMDecoder
from paratune.model.paraformer import label_smoothing_loss

ASF_BLOCK = 5  # FunASR's forward_asf6 scores hotwords by the sixth attention block's weights


class SeacoParaformer(BiCifParaformer):
    def __init__(self, vocab_size: int, input_size: int, encoder_conf: dict, decoder_conf: dict,
                 predictor_conf: dict, seaco_decoder_conf: dict, inner_dim: int = 256, bias_encoder_type: str = "lstm",
                 bias_encoder_dropout_rate: float = 0.0, bias_encoder_bid: bool = False, seaco_lsm_weight: float = 0.0,
                 seaco_length_normalized_loss: bool = True, train_decoder: bool = True, seaco_weight: float = 0.01,
                 NO_BIAS: int = 8377, **paraformer):  # noqa: N803 - FunASR's config key
        super().__init__(vocab_size, input_size, encoder_conf, decoder_conf, predictor_conf, **paraformer)
        if bias_encoder_type != "lstm":
            raise ValueError(f"bias_encoder_type {bias_encoder_type!r} is not supported (supported: lstm)")
        if bias_encoder_bid:  # a two-way LSTM would read each hotword's padding backwards: it needs packing,
            # which reads the lengths on the host (no fake-tensor trace, no memory model); the published model is one-way
            raise ValueError("bias_encoder_bid: true is not supported (paratune's bias encoder is one-way, as "
                             "paraformer-zh's)")
        if not 0 <= NO_BIAS < vocab_size:
            raise ValueError(f"NO_BIAS {NO_BIAS} is not a token id (the vocabulary has {vocab_size})")
        self.bias_encoder = nn.LSTM(inner_dim, inner_dim, 2, batch_first=True, dropout=bias_encoder_dropout_rate)
        self.seaco_decoder = ParaformerSANMDecoder(vocab_size, inner_dim, **seaco_decoder_conf)
        self.hotword_output_layer = nn.Linear(inner_dim, vocab_size)
        self.seaco_lsm_weight, self.seaco_length_normalized_loss = seaco_lsm_weight, seaco_length_normalized_loss
        self.train_decoder, self.seaco_weight, self.no_bias = train_decoder, seaco_weight, NO_BIAS

    def block_stacks(self) -> dict:
        return {**super().block_stacks(), "seaco_decoder": self.seaco_decoder.blocks()}

    # ---- hotwords ------------------------------------------------------------------------------

    def hotword_vectors(self, hotword_pad: torch.Tensor, hotword_lengths: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids, (N,) lengths -> (N, inner_dim): the bias encoder's state at each hotword's
        last token. A one-way LSTM's state there does not depend on the padding after it, so the padded
        batch is run as it is (no packing: no lengths read to the host, and a fake-tensor trace runs it)."""
        x = self.bias_encoder(self.decoder.embed(hotword_pad))[0]
        return x[torch.arange(x.size(0), device=x.device), hotword_lengths.long() - 1]

    def attend(self, vectors: torch.Tensor, acoustic_embeds, decoder_hidden, lengths) -> torch.Tensor:
        """The seaco decoder from the acoustic embeddings and from the decoder's hidden states to the
        hotword vectors (B, N, D), added (FunASR's `_merge`)."""
        n = torch.full((vectors.size(0),), vectors.size(1), dtype=torch.long, device=vectors.device)
        return (self.seaco_decoder(vectors, n, acoustic_embeds, lengths)
                + self.seaco_decoder(vectors, n, decoder_hidden, lengths))

    def default_hotwords(self, text: torch.Tensor, text_lengths: torch.Tensor):
        """No sampled hotwords: only the [sos] entry, every real token labelled NO_BIAS."""
        pad = torch.full((1, 1), self.sos, dtype=torch.long, device=text.device)
        pos = torch.arange(text.size(1), device=text.device)[None, :]
        labels = torch.where(pos < text_lengths[:, None], self.no_bias, self.ignore_id)
        return pad, torch.ones(1, dtype=torch.int32, device=text.device), labels

    # ---- training ------------------------------------------------------------------------------

    def forward(self, speech, speech_lengths, text, text_lengths, hotword_pad=None, hotword_lengths=None,
                seaco_label_pad=None):
        """FunASR's signature. Hotwords as `AudioDatasetHotword` gives them: (N, L) ids shared by the
        batch (the last is [sos]), their lengths, and per token the hotword token or NO_BIAS."""
        if hotword_pad is None:
            lengths = text_lengths[:, 0] if text_lengths.dim() > 1 else text_lengths
            hotword_pad, hotword_lengths, seaco_label_pad = self.default_hotwords(text, lengths)
        elif hotword_lengths.dim() > 1:
            hotword_lengths = hotword_lengths[:, 0]
        return super().forward(speech, speech_lengths, text, text_lengths, hotword_pad=hotword_pad,
                               hotword_lengths=hotword_lengths, seaco_label_pad=seaco_label_pad)

    def losses(self, encoder_out, encoder_lengths, ys, ys_lengths, predicted, hotword_pad=None,
               hotword_lengths=None, seaco_label_pad=None) -> dict:
        """loss_seaco (+ seaco_weight x loss_att when `train_decoder`). loss_pre and loss_pre2 are
        reported but, as in FunASR, not trained."""
        acoustic_embeds = predicted[0]
        hidden = self.decoder(encoder_out, encoder_lengths, acoustic_embeds, ys_lengths, return_hidden=True)
        vectors = self.hotword_vectors(hotword_pad, hotword_lengths)
        vectors = vectors[None].expand(encoder_out.size(0), -1, -1)
        merged = self.attend(vectors, acoustic_embeds, hidden, ys_lengths)
        logits = self.hotword_output_layer(merged[:, :-1])  # the end token has no hotword label
        terms = {"loss_seaco": label_smoothing_loss(logits, seaco_label_pad, self.seaco_lsm_weight, self.ignore_id,
                                                    self.seaco_length_normalized_loss)}
        terms["loss_pre2"] = self.count_loss(ys_lengths, predicted[4]).detach()
        if self.train_decoder:
            att = self.attention_loss(encoder_out, encoder_lengths, ys, ys_lengths, acoustic_embeds, predicted[1])
            terms.update(att)
            terms["loss"] = terms["loss_seaco"] + att["loss_att"] * self.seaco_weight
        else:
            terms["loss"] = terms["loss_seaco"]
        return terms

    # ---- inference ----------------------------------------------------------------------------

    def decoder_scores(self, encoder_out, encoder_lengths, embeds, lengths, hotwords=None, nfilter: int = 50,
                       bias_weight: float = 1.0) -> torch.Tensor:
        """Log-probabilities (B, U, V): the decoder's, replaced by the hotword head's wherever it picks a
        hotword token. `hotwords`: token ids per hotword (the [sos] entry is added here, as FunASR does).
        With more than `nfilter` hotwords, each utterance keeps the `nfilter` its decoder attends to most
        (FunASR's attention-score filter, ASF; FunASR scores with the batch's first utterance only, so
        this equals it at batch size 1, its default)."""
        hidden = self.decoder(encoder_out, encoder_lengths, embeds, lengths, return_hidden=True)
        log_probs = torch.log_softmax(self.decoder.output_layer(hidden), dim=-1)
        if not hotwords:
            return log_probs
        entries = [list(h) for h in hotwords] + [[self.sos]]
        pad = nn.utils.rnn.pad_sequence([torch.tensor(h, dtype=torch.long) for h in entries], batch_first=True)
        vectors = self.hotword_vectors(pad.to(encoder_out.device),
                                       torch.tensor([len(h) for h in entries], device=encoder_out.device))
        vectors = vectors[None].expand(encoder_out.size(0), -1, -1)
        if 0 < nfilter < len(entries):
            vectors = self._filter(vectors, hidden, lengths, nfilter)
        bias_log_probs = torch.log_softmax(self.hotword_output_layer(self.attend(vectors, embeds, hidden, lengths)), -1)
        # FunASR's _merge_res: weight 1 takes the hotword head wherever it does not say NO_BIAS
        keep = (bias_log_probs.argmax(-1) == self.no_bias).to(log_probs.dtype)[..., None]
        keep = keep * bias_weight + (1 - bias_weight)
        return log_probs * keep + bias_log_probs * (1 - keep)

    def _filter(self, vectors, hidden, lengths, nfilter):
        """Each utterance's `nfilter` hotwords with the most attention over its tokens, plus [sos]."""
        n = torch.full((vectors.size(0),), vectors.size(1), dtype=torch.long, device=vectors.device)
        weights = self.seaco_decoder.source_weights(vectors, n, hidden, lengths, ASF_BLOCK)  # (B, H, U, N)
        kept = []
        for i, u in enumerate(lengths.tolist()):
            scores = weights[i, :, :u].sum(0).sum(0)
            top = torch.topk(scores, min(nfilter, vectors.size(1) - 1))[1].tolist()
            kept.append(vectors[i, top + [vectors.size(1) - 1]])
        return torch.stack(kept)
