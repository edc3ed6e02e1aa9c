"""Transformer building blocks shared by the pre-training and fine-tuning models.

Parameter names match the reference checkpoints (``attn.qkv``, ``q_bias``/``v_bias``, ``cross_attn.kv``, ...),
so released weights load by name. Attention runs through ``F.scaled_dot_product_attention`` (flash or
memory-efficient kernels on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sincos_table(num_positions: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sinusoid table (1, num_positions, dim): sin on even, cos on odd channels (interleaved).

    Computed in float64 and cast to float32, as the reference does.
    """
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2 * torch.div(torch.arange(dim), 2, rounding_mode="floor").double() / dim
    angle = position / torch.pow(10000.0, exponent)[None, :]   # (N, dim)
    table = torch.empty_like(angle)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float().unsqueeze(0)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as the reference
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C // heads)"""
    batch, tokens, dim = x.shape
    return x.view(batch, tokens, num_heads, dim // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, head_dim) -> (B, N, C)"""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class Attention(nn.Module):
    """Multi-head self-attention with one packed qkv projection and learnable q and v biases (k bias = 0)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, N, C)
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)                      # (B, N, 3C)
        q, k, v = (_split_heads(t, self.num_heads) for t in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)                 # (B, heads, N, head_dim)
        return self.proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from x, keys and values from a context sequence."""

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim or dim, dim * 2, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, N, C), context: (B, M, C_ctx)
        q = _split_heads(F.linear(x, self.q.weight, self.q_bias), self.num_heads)
        kv = F.linear(context, self.kv.weight, torch.cat((self.k_bias, self.v_bias)))   # (B, M, 2C)
        k, v = (_split_heads(t, self.num_heads) for t in kv.chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)                 # (B, heads, N, head_dim)
        return self.proj(_merge_heads(out))


class Block(nn.Module):
    """Pre-norm ViT block: x += attn(norm1 x); x += mlp(norm2 x)."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, norm_eps: float, drop_path: float = 0.0):
        super().__init__()
        self._add_self_attention(dim, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
                                 drop_path=drop_path)

    def _add_self_attention(self, dim: int, *, num_heads: int, mlp_ratio: float, norm_eps: float,
                            drop_path: float) -> None:
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossSelfBlock(Block):
    """Cross-attention to a context, then a ViT block (the paper's MHCA unit; the reference's CSBlock).

    x += cross_attn(cross_norm1 x, cross_norm2 ctx); x += attn(norm1 x); x += mlp(norm2 x)
    The cross-attention parts are registered first so state-dict keys come in the reference's order.
    """

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, norm_eps: float, drop_path: float = 0.0,
                 context_dim: int | None = None):
        nn.Module.__init__(self)
        self.cross_attn = CrossAttention(dim, num_heads, context_dim=context_dim)
        self.cross_norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.cross_norm2 = nn.LayerNorm(context_dim or dim, eps=norm_eps)
        self._add_self_attention(dim, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
                                 drop_path=drop_path)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.cross_attn(self.cross_norm1(x), self.cross_norm2(context)))
        return super().forward(x)


class VideoPatchEmbed(nn.Module):
    """(B, 3, T, H, W) -> (B, T'H'W', C) tokens in (t, h, w) order, via a tubelet Conv3d."""

    def __init__(self, *, tubelet_size: int, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        size = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=size, stride=size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class AudioPatchEmbed(nn.Module):
    """(B, 1, time, mel) -> (B, time' * mel', C) tokens in (time, mel) order, via a Conv2d."""

    def __init__(self, *, patch_size: int, embed_dim: int, in_chans: int = 1):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def drop_path_schedule(rate: float, depth: int) -> list[float]:
    """Linearly increasing drop-path rates over a stack of blocks."""
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def init_xavier(module: nn.Module) -> None:
    """Pre-training init of the reference: xavier-uniform Linear (bias 0), LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_trunc_normal(module: nn.Module) -> None:
    """Fine-tuning-from-scratch init of the reference: truncated-normal(0.02) Linear, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


__all__ = [
    "sincos_table", "DropPath", "Mlp", "Attention", "CrossAttention", "Block", "CrossSelfBlock",
    "VideoPatchEmbed", "AudioPatchEmbed", "drop_path_schedule", "init_xavier", "init_trunc_normal",
]
