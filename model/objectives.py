"""Pre-training objectives: per-patch normalised reconstruction targets and the hierarchical contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .constants import IMAGENET_MEAN, IMAGENET_STD

TARGET_STD_EPS = 1e-6


def patchify_video(video: torch.Tensor, tubelet_size: int, patch_size: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, tubelet*patch*patch, C), tokens in (t, h, w) order, pixels in (p0, p1, p2)."""
    b, c, t, h, w = video.shape
    p0, p = tubelet_size, patch_size
    x = video.reshape(b, c, t // p0, p0, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)                          # B, t, h, w, p0, p1, p2, C
    return x.reshape(b, (t // p0) * (h // p) * (w // p), p0 * p * p, c)


def patchify_audio(audio: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 1, T, F) -> (B, N, patch*patch), tokens in (time, mel) order, values in (p1, p2) order."""
    b, c, t, f = audio.shape
    p = patch_size
    x = audio.reshape(b, c, t // p, p, f // p, p).permute(0, 2, 4, 3, 5, 1)   # B, t, f, p1, p2, C
    return x.reshape(b, (t // p) * (f // p), p * p * c)


def normalize_patches(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(x - mean) / (unbiased std + 1e-6) over ``dim``."""
    mean = x.mean(dim=dim, keepdim=True)
    std = x.var(dim=dim, unbiased=True, keepdim=True).sqrt()
    return (x - mean) / (std + TARGET_STD_EPS)


def video_target(video: torch.Tensor, tubelet_size: int, patch_size: int, normalize: bool = True,
                 frame_diff: bool = True) -> torch.Tensor:
    """Reconstruction target for every video token, (B, N, tubelet*patch*patch*3).

    video: ImageNet-normalised (B, 3, T, H, W). Pixels are un-normalised to [0, 1], cut into tubelets and
    normalised per tubelet and channel. With ``frame_diff`` every frame after the first of a tubelet is
    replaced by its difference to the previous frame ([n(f0), n(f1) - n(f0)] for tubelets of 2).
    Flattened as (p0, p1, p2, c), channel fastest.
    """
    mean = video.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = video.new_tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    patches = patchify_video(video * std + mean, tubelet_size, patch_size)   # (B, N, p0*p*p, 3)
    if normalize:
        patches = normalize_patches(patches, dim=-2)
    if frame_diff:
        b, n, _, c = patches.shape
        frames = patches.view(b, n, tubelet_size, patch_size * patch_size, c)
        diffs = frames[:, :, 1:] - frames[:, :, :-1]
        patches = torch.cat((frames[:, :, :1], diffs), dim=2)
    return patches.reshape(patches.shape[0], patches.shape[1], -1)


def audio_target(audio: torch.Tensor, patch_size: int, normalize: bool = True) -> torch.Tensor:
    """Reconstruction target for every audio token, (B, N, patch*patch), normalised per patch."""
    patches = patchify_audio(audio, patch_size)
    return normalize_patches(patches, dim=-1) if normalize else patches


def contrastive_logits(video_tokens: torch.Tensor, audio_tokens: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """Mean-pooled, L2-normalised features -> (B, B) video-to-audio similarity logits / temperature."""
    video = F.normalize(video_tokens.float().mean(dim=1), dim=-1)
    audio = F.normalize(audio_tokens.float().mean(dim=1), dim=-1)
    return video @ audio.t() / temperature


def symmetric_info_nce(logits_per_video: torch.Tensor) -> torch.Tensor:
    """0.5 * (CE(s, diag) + CE(s^T, diag)) with in-batch negatives."""
    labels = torch.arange(logits_per_video.shape[0], device=logits_per_video.device)
    return 0.5 * (F.cross_entropy(logits_per_video, labels) + F.cross_entropy(logits_per_video.t(), labels))
