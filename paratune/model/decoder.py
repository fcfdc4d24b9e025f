"""Paraformer's SANM decoder: FSMN self block + source attention over the encoder output.

Names follow FunASR 1.4.16 `ParaformerSANMDecoder`. The decoder reads acoustic embeddings from the CIF
predictor (not token ids): `embed` is used only by the glancing sampler.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from paratune.model.sanm import layer_norm, run_layer


class FSMNSelfBlock(nn.Module):
    """FunASR's `MultiHeadedAttentionSANMDecoder`: no attention at all, only the FSMN memory."""

    def __init__(self, n_feat: int, dropout_rate: float, kernel_size: int, sanm_shfit: int = 0):
        super().__init__()
        self.fsmn_block = nn.Conv1d(n_feat, n_feat, kernel_size, groups=n_feat, bias=False)
        left = (kernel_size - 1) // 2 + max(sanm_shfit, 0)
        self.fsmn_padding = (left, kernel_size - 1 - left)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x * mask
        y = self.fsmn_block(F.pad(x.transpose(1, 2), self.fsmn_padding)).transpose(1, 2) + x
        return self.dropout(y) * mask


class SourceAttention(nn.Module):
    """FunASR's `MultiHeadedAttentionCrossAtt`: queries from the decoder, keys/values from the encoder."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float, encoder_output_size: int | None = None):
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k_v = nn.Linear(encoder_output_size or n_feat, n_feat * 2)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.dropout_rate = dropout_rate

    def _heads(self, x, memory):
        b = x.size(0)
        q = self.linear_q(x).reshape(b, -1, self.h, self.d_k).transpose(1, 2)
        k, v = self.linear_k_v(memory).split(self.h * self.d_k, dim=-1)
        k = k.reshape(b, -1, self.h, self.d_k).transpose(1, 2)
        v = v.reshape(b, -1, self.h, self.d_k).transpose(1, 2)
        return q, k, v

    def weights(self, x, memory, memory_key_mask):
        """The attention weights (B, heads, U, T): what SeACo's hotword filter scores hotwords by."""
        q, k, _ = self._heads(x, memory)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_k)
        scores = scores.masked_fill(~memory_key_mask, float("-inf"))
        return torch.softmax(scores, dim=-1).masked_fill(~memory_key_mask, 0.0)

    def forward(self, x, memory, memory_key_mask):
        b = x.size(0)
        q, k, v = self._heads(x, memory)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=memory_key_mask, dropout_p=self.dropout_rate if self.training else 0.0
        )
        return self.linear_out(att.transpose(1, 2).reshape(b, -1, self.h * self.d_k))


class FeedForwardDecoderSANM(nn.Module):
    """w_2(LayerNorm(dropout(relu(w_1 x)))), w_2 without bias: FunASR's PositionwiseFeedForwardDecoderSANM."""

    def __init__(self, idim: int, hidden_units: int, dropout_rate: float):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.w_2 = nn.Linear(hidden_units, idim, bias=False)
        self.dropout = nn.Dropout(dropout_rate)
        self.norm = layer_norm(hidden_units)

    def forward(self, x):
        return self.w_2(self.norm(self.dropout(torch.relu(self.w_1(x)))))


class DecoderLayerSANM(nn.Module):
    def __init__(self, size: int, self_attn: nn.Module | None, src_attn: nn.Module | None,
                 feed_forward: nn.Module, dropout_rate: float, normalize_before: bool = True):
        super().__init__()
        self.self_attn = self_attn
        self.src_attn = src_attn
        self.feed_forward = feed_forward
        self.norm1 = layer_norm(size)
        if self_attn is not None:
            self.norm2 = layer_norm(size)
        if src_attn is not None:
            self.norm3 = layer_norm(size)
        self.dropout = nn.Dropout(dropout_rate)
        self.normalize_before = normalize_before
        self.checkpoint = False

    def _self_part(self, tgt, tgt_mask):
        # The feed-forward comes first; the last block (no attention at all) has no residual. As FunASR.
        residual = tgt
        if self.normalize_before:
            tgt = self.norm1(tgt)
        tgt = self.feed_forward(tgt)
        x = tgt
        if self.self_attn is not None:
            if self.normalize_before:
                tgt = self.norm2(tgt)
            x = residual + self.dropout(self.self_attn(tgt, tgt_mask))
        return x

    def source_weights(self, tgt, tgt_mask, memory, memory_key_mask):
        """The source attention's weights in this block (FunASR's `get_attn_mat`)."""
        x = self._self_part(tgt, tgt_mask)
        return self.src_attn.weights(self.norm3(x) if self.normalize_before else x, memory, memory_key_mask)

    def forward(self, tgt, tgt_mask, memory, memory_key_mask):
        x = self._self_part(tgt, tgt_mask)
        if self.src_attn is not None:
            residual = x
            if self.normalize_before:
                x = self.norm3(x)
            x = residual + self.dropout(self.src_attn(x, memory, memory_key_mask))
        return x


class ParaformerSANMDecoder(nn.Module):
    def __init__(self, vocab_size: int, encoder_output_size: int, attention_heads: int = 4,
                 linear_units: int = 2048, num_blocks: int = 6, dropout_rate: float = 0.1,
                 self_attention_dropout_rate: float = 0.0, src_attention_dropout_rate: float = 0.0,
                 att_layer_num: int = 6, kernel_size: int = 21, sanm_shfit: int | None = 0,
                 normalize_before: bool = True, wo_input_layer: bool = False, use_output_layer: bool = True):
        super().__init__()
        d = encoder_output_size
        # SeACo's hotword decoder reads embeddings and returns hidden states: no embedding, no output layer
        self.embed = None if wo_input_layer else nn.Sequential(nn.Embedding(vocab_size, d))
        self.normalize_before = normalize_before
        if normalize_before:
            self.after_norm = layer_norm(d)
        self.output_layer = nn.Linear(d, vocab_size) if use_output_layer else None
        if sanm_shfit is None:
            sanm_shfit = (kernel_size - 1) // 2

        def block(self_attn, src_attn):
            return DecoderLayerSANM(d, self_attn, src_attn, FeedForwardDecoderSANM(d, linear_units, dropout_rate),
                                    dropout_rate, normalize_before)

        self.decoders = nn.ModuleList([
            block(FSMNSelfBlock(d, self_attention_dropout_rate, kernel_size, sanm_shfit),
                  SourceAttention(attention_heads, d, src_attention_dropout_rate))
            for _ in range(att_layer_num)
        ])
        extra = num_blocks - att_layer_num
        self.decoders2 = nn.ModuleList([
            block(FSMNSelfBlock(d, self_attention_dropout_rate, kernel_size, 0), None) for _ in range(extra)
        ]) if extra > 0 else None
        self.decoders3 = nn.ModuleList([block(None, None)])

    def blocks(self):
        return [*self.decoders, *(self.decoders2 or []), *self.decoders3]

    @staticmethod
    def _masks(memory, memory_lengths, embeds, lengths):
        tgt_mask = (torch.arange(embeds.size(1), device=embeds.device)[None, :] < lengths[:, None])
        memory_key_mask = (torch.arange(memory.size(1), device=memory.device)[None, :]
                           < memory_lengths[:, None])[:, None, None, :]
        return tgt_mask[:, :, None].to(embeds.dtype), memory_key_mask

    def forward(self, memory: torch.Tensor, memory_lengths: torch.Tensor, embeds: torch.Tensor,
                lengths: torch.Tensor, return_hidden: bool = False) -> torch.Tensor:
        """memory (B, T, D) encoder output; embeds (B, U, D) acoustic embeddings -> logits (B, U, V), or
        the hidden states (B, U, D) before the output layer."""
        tgt_mask, memory_key_mask = self._masks(memory, memory_lengths, embeds, lengths)
        x = embeds
        for layer in self.blocks():
            x = run_layer(layer, x, tgt_mask, memory, memory_key_mask)
        if self.normalize_before:
            x = self.after_norm(x)
        return x if return_hidden or self.output_layer is None else self.output_layer(x)

    def source_weights(self, memory, memory_lengths, embeds, lengths, block: int) -> torch.Tensor:
        """Source attention weights (B, heads, U, T) of attention block `block`, after the blocks before it
        (FunASR's `forward_asf6` is block 5)."""
        tgt_mask, memory_key_mask = self._masks(memory, memory_lengths, embeds, lengths)
        x = embeds
        for layer in self.decoders[:block]:
            x = layer(x, tgt_mask, memory, memory_key_mask)
        return self.decoders[block].source_weights(x, tgt_mask, memory, memory_key_mask)
