"""The three transformer stacks of HiCMAE: modality encoder, cross-modal fusion encoder, decoder.

``video_encoder``, ``audio_encoder`` and ``fusion_encoder`` build the encoders of a config; the pre-training
and the fine-tuning model both take theirs from these.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import HiCMAEConfig
from .layers import AudioPatchEmbed, Block, CrossSelfBlock, VideoPatchEmbed, drop_path_schedule, sincos_table
from .masking import gather_tokens


class ModalityEncoder(nn.Module):
    """Patch embedding + fixed sin-cos positions + ViT blocks + one final LayerNorm.

    The final LayerNorm is shared by every block's output: ``norm(block_l output)`` is the level-l feature
    used by the hierarchical skip connections, the contrastive loss and hierarchical feature fusion.
    """

    def __init__(self, patch_embed: nn.Module, *, num_tokens: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, norm_eps: float, drop_path_rate: float):
        super().__init__()
        self.patch_embed = patch_embed
        self.register_buffer("pos_embed", sincos_table(num_tokens, dim), persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps, drop_path=rate)
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

    def __init__(self, *, video_dim: int, audio_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 norm_eps: float, drop_path_rate: float):
        super().__init__()
        rates = drop_path_schedule(drop_path_rate, depth)
        common = dict(num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps)
        self.blocks = nn.ModuleList(
            CrossSelfBlock(video_dim, **common, drop_path=rate, context_dim=audio_dim) for rate in rates
        )
        self.norm = nn.LayerNorm(video_dim, eps=norm_eps)
        self.blocks_audio = nn.ModuleList(
            CrossSelfBlock(audio_dim, **common, drop_path=rate, context_dim=video_dim) for rate in rates
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

    def __init__(self, *, num_tokens: int, dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 norm_eps: float, out_dim: int, skip_connections: bool):
        super().__init__()
        self.register_buffer("pos_embed", sincos_table(num_tokens, dim), persistent=False)
        common = dict(num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps)
        self.blocks = nn.ModuleList(
            CrossSelfBlock(dim, **common) if skip_connections and i > 0 else Block(dim, **common)
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


def video_encoder(cfg: HiCMAEConfig) -> ModalityEncoder:
    """The video encoder of ``cfg``: tubelet embedding, then ``depth`` blocks ``embed_dim`` wide."""
    return ModalityEncoder(
        VideoPatchEmbed(tubelet_size=cfg.tubelet_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim),
        num_tokens=cfg.num_video_tokens, dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio, norm_eps=cfg.norm_eps, drop_path_rate=cfg.drop_path_rate)


def audio_encoder(cfg: HiCMAEConfig) -> ModalityEncoder:
    """The audio encoder of ``cfg``: log-mel patch embedding, then ``audio_depth`` blocks ``audio_embed_dim`` wide."""
    return ModalityEncoder(
        AudioPatchEmbed(patch_size=cfg.audio_patch_size, embed_dim=cfg.audio_embed_dim),
        num_tokens=cfg.num_audio_tokens, dim=cfg.audio_embed_dim, depth=cfg.audio_depth,
        num_heads=cfg.audio_num_heads, mlp_ratio=cfg.mlp_ratio, norm_eps=cfg.norm_eps,
        drop_path_rate=cfg.drop_path_rate)


def fusion_encoder(cfg: HiCMAEConfig) -> FusionEncoder:
    """The cross-modal fusion encoder of ``cfg``: ``fusion_depth`` layers between the two encoders' widths."""
    return FusionEncoder(
        video_dim=cfg.embed_dim, audio_dim=cfg.audio_embed_dim, depth=cfg.fusion_depth,
        num_heads=cfg.fusion_num_heads, mlp_ratio=cfg.mlp_ratio, norm_eps=cfg.norm_eps,
        drop_path_rate=cfg.drop_path_rate)


def video_decoder(cfg: HiCMAEConfig) -> Decoder:
    """The video decoder of ``cfg``: predicts the masked tubelets' pixels (``video_patch_dim`` each)."""
    return Decoder(
        num_tokens=cfg.num_video_tokens, dim=cfg.decoder_embed_dim, depth=cfg.decoder_depth,
        num_heads=cfg.decoder_num_heads, mlp_ratio=cfg.mlp_ratio, norm_eps=cfg.norm_eps,
        out_dim=cfg.video_patch_dim, skip_connections=cfg.decoder_skip_connections)


def audio_decoder(cfg: HiCMAEConfig) -> Decoder:
    """The audio decoder of ``cfg``: predicts the masked log-mel patches (``audio_patch_dim`` each)."""
    return Decoder(
        num_tokens=cfg.num_audio_tokens, dim=cfg.audio_decoder_embed_dim, depth=cfg.audio_decoder_depth,
        num_heads=cfg.audio_decoder_num_heads, mlp_ratio=cfg.mlp_ratio, norm_eps=cfg.norm_eps,
        out_dim=cfg.audio_patch_dim, skip_connections=cfg.decoder_skip_connections)
