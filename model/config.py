"""One configuration for every HiCMAE model, and the registered sizes.

Field names follow the paper's structure: a video encoder and an audio encoder (each ``depth`` ViT blocks),
a cross-modal fusion encoder, and (pre-training only) one lightweight decoder per modality.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Literal


@dataclass(frozen=True)
class HiCMAEConfig:
    # --- inputs ---------------------------------------------------------------------------------------
    img_size: int = 160                 # video frames are img_size x img_size RGB face crops
    num_frames: int = 16                # frames per clip window
    patch_size: int = 16                # video patch (pixels)
    tubelet_size: int = 2               # video patch (frames)
    audio_frames: int = 256             # log-mel frames (10 ms hop) per window
    audio_mel_bins: int = 128
    audio_patch_size: int = 16          # square patches over (time, mel)

    # --- modality encoders ----------------------------------------------------------------------------
    embed_dim: int = 512                # video encoder width
    depth: int = 10
    num_heads: int = 8
    audio_embed_dim: int = 512
    audio_depth: int = 10
    audio_num_heads: int = 8
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0         # linear over each stack of blocks (fine-tuning uses 0.1)

    # --- cross-modal fusion encoder -------------------------------------------------------------------
    fusion_depth: int = 2               # layers; each has one video and one audio cross+self block
    fusion_num_heads: int = 8

    # --- pre-training decoders (one per modality) -----------------------------------------------------
    decoder_embed_dim: int = 384
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    audio_decoder_embed_dim: int = 384
    audio_decoder_depth: int = 4
    audio_decoder_num_heads: int = 6
    # 0-based encoder blocks whose normed outputs feed the contrastive levels and the decoder skips
    # (blocks 4, 7, 10); decoder block i >= 1 cross-attends to level[-i].
    hierarchy_layers: tuple[int, ...] = (3, 6, 9)
    decoder_skip_connections: bool = True

    # --- pre-training objective -----------------------------------------------------------------------
    mask_ratio: float = 0.9             # video tube masking
    audio_mask_ratio: float = 0.8       # audio random patch masking
    norm_pix_target: bool = True        # per-patch normalised reconstruction targets
    frame_diff_target: bool = True      # video target = [n(f0), n(f1) - n(f0)] per tubelet
    contrastive_weight: float = 0.0025  # weight of the hierarchical contrastive loss (0 turns it off)
    contrastive_temperature: float = 0.07

    # --- fine-tuning ------------------------------------------------------------------------------------
    modality: Literal["audio_visual", "video", "audio"] = "audio_visual"
    feature_fusion: Literal["hierarchical", "last"] = "hierarchical"
    head_activation: Literal["none", "sigmoid", "tanh", "relu"] = "none"

    # --- derived sizes ----------------------------------------------------------------------------------
    @property
    def video_grid(self) -> tuple[int, int, int]:
        """(T', H', W') token grid of the video."""
        side = self.img_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(time, mel) token grid of the audio."""
        return self.audio_frames // self.audio_patch_size, self.audio_mel_bins // self.audio_patch_size

    @property
    def num_video_tokens(self) -> int:
        t, h, w = self.video_grid
        return t * h * w

    @property
    def num_audio_tokens(self) -> int:
        t, f = self.audio_grid
        return t * f

    @property
    def num_video_masked(self) -> int:
        """Tube masking: the same int(ratio * H'W') spatial positions are masked in every time slice."""
        t, h, w = self.video_grid
        return int(self.mask_ratio * h * w) * t

    @property
    def num_audio_masked(self) -> int:
        return int(self.audio_mask_ratio * self.num_audio_tokens)

    @property
    def video_patch_dim(self) -> int:
        return self.tubelet_size * self.patch_size**2 * 3

    @property
    def audio_patch_dim(self) -> int:
        return self.audio_patch_size**2

    def __post_init__(self) -> None:
        checks = {
            "img_size must be a multiple of patch_size": self.img_size % self.patch_size == 0,
            "num_frames must be a multiple of tubelet_size": self.num_frames % self.tubelet_size == 0,
            "audio_frames must be a multiple of audio_patch_size": self.audio_frames % self.audio_patch_size == 0,
            "audio_mel_bins must be a multiple of audio_patch_size":
                self.audio_mel_bins % self.audio_patch_size == 0,
            "embed_dim must be divisible by num_heads": self.embed_dim % self.num_heads == 0,
            "audio_embed_dim must be divisible by audio_num_heads":
                self.audio_embed_dim % self.audio_num_heads == 0,
            "fusion needs embed_dim divisible by fusion_num_heads": self.embed_dim % self.fusion_num_heads == 0,
            "decoder_embed_dim must be divisible by decoder_num_heads":
                self.decoder_embed_dim % self.decoder_num_heads == 0,
            "audio_decoder_embed_dim must be divisible by audio_decoder_num_heads":
                self.audio_decoder_embed_dim % self.audio_decoder_num_heads == 0,
            "hierarchy_layers must be encoder block indices":
                all(0 <= i < min(self.depth, self.audio_depth) for i in self.hierarchy_layers),
            "decoder skips need decoder_depth - 1 == len(hierarchy_layers)":
                not self.decoder_skip_connections
                or (self.decoder_depth - 1 == len(self.hierarchy_layers)
                    and self.audio_decoder_depth - 1 == len(self.hierarchy_layers)),
            "mask ratios must be in [0, 1)": 0 <= self.mask_ratio < 1 and 0 <= self.audio_mask_ratio < 1,
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ValueError("invalid HiCMAE config: " + "; ".join(failed))

    def to_dict(self) -> dict:
        return asdict(self)


ARCHITECTURE_FIELDS = tuple(f.name for f in fields(HiCMAEConfig))

# The paper's three sizes differ only in width. The reference ships no tiny pre-training decoder; ours keeps
# small's ratio (decoder width C/2) and the 64-dim heads of every other stack: 128 wide, 2 heads.
SIZES: dict[str, HiCMAEConfig] = {
    "hicmae_tiny": HiCMAEConfig(
        embed_dim=256, num_heads=4, audio_embed_dim=256, audio_num_heads=4, fusion_num_heads=4,
        decoder_embed_dim=128, decoder_num_heads=2, audio_decoder_embed_dim=128, audio_decoder_num_heads=2,
    ),
    "hicmae_small": HiCMAEConfig(
        embed_dim=384, num_heads=6, audio_embed_dim=384, audio_num_heads=6, fusion_num_heads=6,
        decoder_embed_dim=192, decoder_num_heads=3, audio_decoder_embed_dim=192, audio_decoder_num_heads=3,
    ),
    "hicmae_base": HiCMAEConfig(),
    # For tests only, not a model to train: every part of HiCMAE (three levels, skip decoders, fusion) at width
    # 32, on the real input shapes; a pre-training step on two clips takes about 0.1 s on one CPU core.
    "hicmae_test": HiCMAEConfig(
        embed_dim=32, num_heads=1, audio_embed_dim=32, audio_num_heads=1, fusion_num_heads=1,
        depth=3, audio_depth=3, fusion_depth=1, hierarchy_layers=(0, 1, 2),
        decoder_embed_dim=16, decoder_num_heads=1, audio_decoder_embed_dim=16, audio_decoder_num_heads=1,
    ),
}


def get_config(name: str, **overrides) -> HiCMAEConfig:
    """A registered size with any field overridden, e.g. ``get_config("hicmae_base", depth=4)``."""
    if name not in SIZES:
        raise KeyError(f"unknown HiCMAE size {name!r}; known: {', '.join(SIZES)}")
    unknown = sorted(set(overrides) - set(ARCHITECTURE_FIELDS))
    if unknown:
        raise TypeError(f"unknown HiCMAE config field(s): {', '.join(unknown)}")
    if "hierarchy_layers" in overrides:
        overrides["hierarchy_layers"] = tuple(overrides["hierarchy_layers"])
    return replace(SIZES[name], **overrides)


__all__ = ["HiCMAEConfig", "SIZES", "get_config", "ARCHITECTURE_FIELDS"]
