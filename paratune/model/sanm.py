"""SANM encoder: self-attention with an FSMN memory block.

Gao et al., "SAN-M: Memory Equipped Self-Attention for End-to-End Speech Recognition", arXiv:2006.01713.
Module and parameter names follow FunASR 1.4.16 (`funasr/models/sanm`) so its `model.pt` loads with
`strict=True`; the arithmetic is the same, with attention through `scaled_dot_product_attention`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-12  # FunASR's LayerNorm uses eps=1e-12, not torch's 1e-5


def layer_norm(size: int) -> nn.LayerNorm:
    return nn.LayerNorm(size, eps=LN_EPS)


def sinusoidal_positions(length: int, depth: int, dtype: torch.dtype, device) -> torch.Tensor:
    """FunASR's SinusoidalPositionEncoder table, positions 1..length, [sin | cos] halves.

    Computed in `dtype` with the same operations as FunASR so values match to the bit.
    """
    positions = torch.arange(1, length + 1, device=device).to(dtype)
    log_increment = torch.log(torch.tensor([10000.0], dtype=dtype, device=device)) / (depth / 2 - 1)
    inv_timescales = torch.exp(torch.arange(depth / 2, device=device).to(dtype) * -log_increment)
    scaled = positions[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


def run_layer(layer: nn.Module, *args):
    """Call a block, through non-reentrant activation checkpointing when its switch is on."""
    if layer.checkpoint and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, idim: int, hidden_units: int, dropout_rate: float):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.w_2 = nn.Linear(hidden_units, idim)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(torch.relu(self.w_1(x))))


class MultiHeadedAttentionSANM(nn.Module):
    """Self-attention plus an FSMN memory: a depthwise 1-D convolution over the values."""

    def __init__(self, n_head: int, in_feat: int, n_feat: int, dropout_rate: float, kernel_size: int,
                 sanm_shfit: int = 0):
        super().__init__()
        assert n_feat % n_head == 0
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_q_k_v = nn.Linear(in_feat, n_feat * 3)
        self.fsmn_block = nn.Conv1d(n_feat, n_feat, kernel_size, groups=n_feat, bias=False)
        left = (kernel_size - 1) // 2 + max(sanm_shfit, 0)
        self.fsmn_padding = (left, kernel_size - 1 - left)
        self.dropout_rate = dropout_rate

    def forward(self, x: torch.Tensor, mask: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, in_feat); mask (B, T, 1) 1.0 on real frames; key_mask (B, 1, 1, T) bool."""
        b, t, _ = x.shape
        q, k, v = self.linear_q_k_v(x).split(self.h * self.d_k, dim=-1)

        v = v * mask
        memory = self.fsmn_block(F.pad(v.transpose(1, 2), self.fsmn_padding)).transpose(1, 2) + v
        memory = F.dropout(memory, self.dropout_rate, self.training) * mask

        q, k, v = (z.reshape(b, t, self.h, self.d_k).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.dropout_rate if self.training else 0.0
        )
        return self.linear_out(att.transpose(1, 2).reshape(b, t, self.h * self.d_k)) + memory


class EncoderLayerSANM(nn.Module):
    def __init__(self, in_size: int, size: int, self_attn: nn.Module, feed_forward: nn.Module,
                 dropout_rate: float, normalize_before: bool = True):
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.norm1 = layer_norm(in_size)
        self.norm2 = layer_norm(size)
        self.dropout = nn.Dropout(dropout_rate)
        self.in_size = in_size
        self.size = size
        self.normalize_before = normalize_before
        self.checkpoint = False

    def forward(self, x, mask, key_mask):
        residual = x
        if self.normalize_before:
            x = self.norm1(x)
        x = self.dropout(self.self_attn(x, mask, key_mask))
        if self.in_size == self.size:  # the first block changes width (560 -> 512): no residual
            x = residual + x
        if not self.normalize_before:
            x = self.norm1(x)
        residual = x
        if self.normalize_before:
            x = self.norm2(x)
        x = residual + self.dropout(self.feed_forward(x))
        if not self.normalize_before:
            x = self.norm2(x)
        return x


class SANMEncoder(nn.Module):
    def __init__(self, input_size: int, output_size: int = 256, attention_heads: int = 4,
                 linear_units: int = 2048, num_blocks: int = 6, dropout_rate: float = 0.1,
                 attention_dropout_rate: float = 0.0, normalize_before: bool = True,
                 kernel_size: int = 11, sanm_shfit: int = 0):
        super().__init__()
        self._output_size = output_size
        self.normalize_before = normalize_before

        def block(in_size):
            attn = MultiHeadedAttentionSANM(attention_heads, in_size, output_size, attention_dropout_rate,
                                            kernel_size, sanm_shfit)
            ff = PositionwiseFeedForward(output_size, linear_units, dropout_rate)
            return EncoderLayerSANM(in_size, output_size, attn, ff, dropout_rate, normalize_before)

        self.encoders0 = nn.ModuleList([block(input_size)])
        self.encoders = nn.ModuleList([block(output_size) for _ in range(num_blocks - 1)])
        if normalize_before:
            self.after_norm = layer_norm(output_size)

    def output_size(self) -> int:
        return self._output_size

    def blocks(self):
        return [*self.encoders0, *self.encoders]

    def forward(self, xs: torch.Tensor, lengths: torch.Tensor):
        """xs (B, T, input_size) LFR features -> (B, T, output_size), lengths."""
        t = xs.size(1)
        valid = torch.arange(t, device=xs.device)[None, :] < lengths[:, None]
        mask = valid[:, :, None].to(xs.dtype)
        key_mask = valid[:, None, None, :]
        # FunASR scales by sqrt(output_size) even though the input width is the LFR width
        xs = xs * math.sqrt(self._output_size)
        xs = xs + sinusoidal_positions(t, xs.size(-1), xs.dtype, xs.device)
        for layer in self.blocks():
            xs = run_layer(layer, xs, mask, key_mask)
        if self.normalize_before:
            xs = self.after_norm(xs)
        return xs, valid.sum(1)
