"""HiCMAE pre-training model: masked audio-visual autoencoding with hierarchical skips and contrast."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import HiCMAEConfig
from .encoders import (
    Decoder,
    ModalityEncoder,
    audio_decoder,
    audio_encoder,
    fusion_encoder,
    video_decoder,
    video_encoder,
)
from .layers import init_xavier
from .masking import gather_tokens, mask_to_ids
from .objectives import audio_target, contrastive_logits, symmetric_info_nce, video_target


@dataclass
class PretrainOutput:
    loss: torch.Tensor                      # () total = video + audio + weight * contrastive
    loss_video: torch.Tensor                # () MSE on masked video tokens
    loss_audio: torch.Tensor                # () MSE on masked audio tokens
    loss_contrastive: torch.Tensor          # () sum over levels, unweighted
    loss_contrastive_levels: torch.Tensor   # (L,)
    pred_video: torch.Tensor                # (B, N_masked_v, 1536)
    pred_audio: torch.Tensor                # (B, N_masked_a, 256)
    target_video: torch.Tensor              # same shapes as the predictions
    target_audio: torch.Tensor
    logits_per_video: list[torch.Tensor]    # L x (B, B)
    levels_video: list[torch.Tensor]        # L x (B, N_vis_v, C) normed encoder features
    levels_audio: list[torch.Tensor]        # L x (B, N_vis_a, C)
    encoder_video: torch.Tensor             # (B, N_vis_v, C) final video encoder output
    encoder_audio: torch.Tensor
    fusion_video: torch.Tensor              # (B, N_vis_v, C) fusion encoder output
    fusion_audio: torch.Tensor


class HiCMAEPretrain(nn.Module):
    def __init__(self, cfg: HiCMAEConfig):
        super().__init__()
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.mask_token_audio = nn.Parameter(torch.zeros(1, 1, cfg.audio_decoder_embed_dim))
        # Created in the reference's order, which is the state dict's order and the order of random init.
        self.encoder = video_encoder(cfg)
        self.decoder = video_decoder(cfg)
        self.encoder_to_decoder = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim, bias=False)
        self.encoder_audio = audio_encoder(cfg)
        self.decoder_audio = audio_decoder(cfg)
        self.encoder_to_decoder_audio = nn.Linear(cfg.audio_embed_dim, cfg.audio_decoder_embed_dim, bias=False)
        self.encoder_fusion = fusion_encoder(cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        # As the reference: xavier in the encoders and decoders; the encoder->decoder projections and the
        # patch embeddings keep PyTorch's default init; mask tokens truncated-normal(0.02).
        for stack in (self.encoder.blocks, self.encoder.norm, self.encoder_audio.blocks, self.encoder_audio.norm,
                      self.encoder_fusion, self.decoder, self.decoder_audio):
            stack.apply(init_xavier)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.mask_token_audio, std=0.02)

    def encode(self, encoder: ModalityEncoder, x: torch.Tensor, ids_visible: torch.Tensor):
        """Visible tokens through one modality encoder -> (normed hierarchy levels, final normed output)."""
        outputs = encoder(x, ids_visible)
        levels = [encoder.norm(outputs[i]) for i in self.cfg.hierarchy_layers]
        last = len(outputs) - 1
        final = levels[-1] if self.cfg.hierarchy_layers[-1] == last else encoder.norm(outputs[last])
        return levels, final

    @staticmethod
    def decode(decoder: Decoder, project: nn.Linear, mask_token: torch.Tensor, fused: torch.Tensor,
               levels: list[torch.Tensor], ids_visible: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """Fused visible tokens + mask tokens (+ skips from the encoder levels) -> masked-token predictions."""
        batch, num_masked = ids_masked.shape
        pos = decoder.pos_embed.expand(batch, -1, -1)
        pos_visible = gather_tokens(pos, ids_visible)                   # (B, N_vis, D)
        pos_masked = gather_tokens(pos, ids_masked)                     # (B, N_mask, D)
        x = torch.cat((project(fused) + pos_visible, mask_token + pos_masked), dim=1)   # (B, N, D)
        skips = [project(level) + pos_visible for level in levels]
        return decoder(x, skips, num_masked)

    def forward(self, video: torch.Tensor, audio: torch.Tensor, mask_video: torch.Tensor,
                mask_audio: torch.Tensor) -> PretrainOutput:
        """video (B, 3, T, H, W) ImageNet-normalised; audio (B, 1, 256, 128) normalised log-mel;
        mask_video (B, N_v) / mask_audio (B, N_a) bool, True = masked, fixed count per sample."""
        cfg = self.cfg
        vis_v, masked_v = mask_to_ids(mask_video, cfg.num_video_masked)
        vis_a, masked_a = mask_to_ids(mask_audio, cfg.num_audio_masked)

        levels_v, enc_v = self.encode(self.encoder, video, vis_v)
        levels_a, enc_a = self.encode(self.encoder_audio, audio, vis_a)
        fused_v, fused_a = self.encoder_fusion(enc_v, enc_a)

        pred_v = self.decode(self.decoder, self.encoder_to_decoder, self.mask_token, fused_v, levels_v,
                             vis_v, masked_v)
        pred_a = self.decode(self.decoder_audio, self.encoder_to_decoder_audio, self.mask_token_audio, fused_a,
                             levels_a, vis_a, masked_a)

        with torch.no_grad():
            target_v = gather_tokens(video_target(video.float(), cfg.tubelet_size, cfg.patch_size,
                                                  cfg.norm_pix_target, cfg.frame_diff_target), masked_v)
            target_a = gather_tokens(audio_target(audio.float(), cfg.audio_patch_size, cfg.norm_pix_target),
                                     masked_a)
        loss_v = F.mse_loss(pred_v.float(), target_v)
        loss_a = F.mse_loss(pred_a.float(), target_a)

        logits = [contrastive_logits(v, a, cfg.contrastive_temperature)
                  for v, a in zip(levels_v, levels_a, strict=True)]
        loss_levels = torch.stack([symmetric_info_nce(s) for s in logits])
        loss_contrastive = loss_levels.sum()
        loss = loss_v + loss_a + cfg.contrastive_weight * loss_contrastive

        return PretrainOutput(
            loss=loss, loss_video=loss_v, loss_audio=loss_a, loss_contrastive=loss_contrastive,
            loss_contrastive_levels=loss_levels, pred_video=pred_v, pred_audio=pred_a, target_video=target_v,
            target_audio=target_a, logits_per_video=logits, levels_video=levels_v, levels_audio=levels_a,
            encoder_video=enc_v, encoder_audio=enc_a, fusion_video=fused_v, fusion_audio=fused_a,
        )
