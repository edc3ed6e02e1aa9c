"""The three transformer stacks of HiCMAE: modality encoder, cross-modal fusion encoder, decoder."""

from __future__ import annotations

import torch
from torch import nn

from .layers import Block, CrossSelfBlock, drop_path_schedule, sincos_table
from .masking import gather_tokens


class ModalityEncoder(nn.Module):
    """Patch embedding + fixed sin-cos positions + ViT blocks + one final LayerNorm.

    The final LayerNorm is shared by every block's output: ``norm(block_l output)`` is the level-l feature
    used by the hierarchical skip connections, the contrastive loss and hierarchical feature fusion.
    """

    def __init__(self, patch_embed: nn.Module, num_tokens: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, norm_eps: float, drop_path_rate: float):
        super().__init__()
        self.patch_embed = patch_embed
        self.register_buffer("pos_embed", sincos_table(num_tokens, dim), persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, norm_eps, rate)
            for rate in drop_path_schedule(drop_path_rate, depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Raw input -> every block's output, each (B, N_keep, C) (not yet normed).

        ids_keep (B, N_keep): the visible tokens to encode (pre-training); None encodes all tokens.
        """
        tokens = self.patch_embed(x) + self.pos_embed                   # (B, N, C)
        if ids_keep is not None:
            tokens = gather_tokens(tokens, ids_keep)                    # (B, N_keep, C)
        outputs = []
        for block in self.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        return outputs


class FusionEncoder(nn.Module):
    """Bidirectional cross-modal fusion: each layer updates both streams from the previous layer at once.

    v' = blocks[i](v, ctx=a), a' = blocks_audio[i](a, ctx=v); then separate final LayerNorms.
    """

    def __init__(self, video_dim: int, audio_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 norm_eps: float, drop_path_rate: float):
        super().__init__()
        rates = drop_path_schedule(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            CrossSelfBlock(video_dim, num_heads, mlp_ratio, norm_eps, rate, context_dim=audio_dim) for rate in rates
        )
        self.norm = nn.LayerNorm(video_dim, eps=norm_eps)
        self.blocks_audio = nn.ModuleList(
            CrossSelfBlock(audio_dim, num_heads, mlp_ratio, norm_eps, rate, context_dim=video_dim) for rate in rates
        )
        self.norm_audio = nn.LayerNorm(audio_dim, eps=norm_eps)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # video (B, Nv, Cv), audio (B, Na, Ca) -> same shapes
        for block_video, block_audio in zip(self.blocks, self.blocks_audio, strict=True):
            video, audio = block_video(video, audio), block_audio(audio, video)
        return self.norm(video), self.norm_audio(audio)


class Decoder(nn.Module):
    """Lightweight decoder with hierarchical skip connections.

    Block 0 is a plain ViT block; block i >= 1 is a cross+self block that attends to skips[-i], so the
    deepest encoder level feeds the first skip block (U-Net order). Without skip connections every block
    is plain (the paper's ablation). Only the masked tokens are predicted.
    """

    def __init__(self, num_tokens: int, dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 norm_eps: float, out_dim: int, skip_connections: bool):
        super().__init__()
        self.register_buffer("pos_embed", sincos_table(num_tokens, dim), persistent=False)
        self.blocks = nn.ModuleList(
            CrossSelfBlock(dim, num_heads, mlp_ratio, norm_eps) if skip_connections and i > 0
            else Block(dim, num_heads, mlp_ratio, norm_eps)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], num_masked: int) -> torch.Tensor:
        """x (B, N, D): visible tokens then mask tokens, positions added; skips: (B, N_vis, D) per level.

        Returns predictions for the last num_masked tokens, (B, num_masked, out_dim).
        """
        for i, block in enumerate(self.blocks):
            x = block(x, skips[-i] if i > 0 and isinstance(block, CrossSelfBlock) else None)
        return self.head(self.norm(x[:, -num_masked:]))
