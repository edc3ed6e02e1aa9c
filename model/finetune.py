"""HiCMAE fine-tuning model: modality encoders, fusion encoder, hierarchical feature fusion and a head.

Audio-visual (the paper):
    e_v = sum_l softmax(w_v)_l * mean_tokens(LN_v(block_l))          over all encoder blocks
    e_a = the same for audio
    f_v, f_a = FusionEncoder(LN_v(block_last), LN_a(block_last))
    logits = head(fc_norm(concat[e_v, e_a, mean(f_v), mean(f_a)]))
Single modality (``modality='video'`` or ``'audio'``): no fusion encoder; the fused stream is replaced by the
modality's own last layer, so the head sees concat[e_m, mean(LN_m(block_last))] (half the width).
``feature_fusion='last'`` (ablation) uses the last layer instead of the learned mix over layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import HiCMAEConfig
from .encoders import ModalityEncoder, audio_encoder, fusion_encoder, video_encoder
from .layers import init_trunc_normal

HEAD_ACTIVATIONS = {"none": nn.Identity, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


@dataclass
class FinetuneFeatures:
    layer_means: dict[str, torch.Tensor]     # modality -> (B, L, C): mean over tokens of each normed layer
    weighted: dict[str, torch.Tensor]        # modality -> (B, C): clip embedding from the encoder hierarchy
    last_tokens: dict[str, torch.Tensor]     # modality -> (B, N, C): normed last encoder layer
    fused_tokens: dict[str, torch.Tensor]    # modality -> (B, N, C): fusion encoder output (or last_tokens)
    embedding: torch.Tensor                  # (B, D) head input before fc_norm
    embedding_normed: torch.Tensor           # (B, D) after fc_norm


class HiCMAEClassifier(nn.Module):
    """Fine-tuning model for classification (``num_classes`` logits) or regression (``num_classes`` outputs)."""

    def __init__(self, cfg: HiCMAEConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.modalities = ("video", "audio") if cfg.modality == "audio_visual" else (cfg.modality,)
        hierarchical = cfg.feature_fusion == "hierarchical"
        if hierarchical and "video" in self.modalities:
            self.video_layer_weights = nn.Parameter(torch.full((cfg.depth,), 1.0 / cfg.depth))
        if hierarchical and "audio" in self.modalities:
            self.audio_layer_weights = nn.Parameter(torch.full((cfg.audio_depth,), 1.0 / cfg.audio_depth))
        if "video" in self.modalities:
            self.encoder = video_encoder(cfg)
        if "audio" in self.modalities:
            self.encoder_audio = audio_encoder(cfg)
        if len(self.modalities) == 2:
            self.encoder_fusion = fusion_encoder(cfg)
        width = {"video": cfg.embed_dim, "audio": cfg.audio_embed_dim}
        self.embed_dim = 2 * sum(width[m] for m in self.modalities)
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=cfg.norm_eps)
        self.head = nn.Linear(self.embed_dim, num_classes)
        self.head_activation = HEAD_ACTIVATIONS[cfg.head_activation]()
        for name in ("encoder", "encoder_audio", "encoder_fusion"):
            if hasattr(self, name):  # only matters when training from scratch; pre-trained weights replace it
                getattr(self, name).apply(init_trunc_normal)
        # fc_norm and head keep PyTorch's default init, as in the reference.

    def _encoders(self) -> dict[str, ModalityEncoder]:
        return {m: self.encoder if m == "video" else self.encoder_audio for m in self.modalities}

    def forward_features(self, video: torch.Tensor | None, audio: torch.Tensor | None) -> FinetuneFeatures:
        """video (B, 3, T, H, W), audio (B, 1, 256, 128); the unused one may be None in unimodal modes."""
        inputs = {"video": video, "audio": audio}
        layer_means, weighted, last_tokens = {}, {}, {}
        for modality, encoder in self._encoders().items():
            if inputs[modality] is None:
                raise ValueError(f"a {self.cfg.modality} model needs the {modality} input")
            outputs = encoder(inputs[modality])                                   # L x (B, N, C)
            layer_means[modality] = torch.stack([encoder.norm(x).mean(dim=1) for x in outputs], dim=1)
            last_tokens[modality] = encoder.norm(outputs[-1])                     # (B, N, C)
            if self.cfg.feature_fusion == "hierarchical":
                weights = getattr(self, f"{modality}_layer_weights").softmax(dim=0)  # (L,)
                weighted[modality] = torch.einsum("l,blc->bc", weights, layer_means[modality])
            else:
                weighted[modality] = layer_means[modality][:, -1]
        if len(self.modalities) == 2:
            fused_video, fused_audio = self.encoder_fusion(last_tokens["video"], last_tokens["audio"])
            fused = {"video": fused_video, "audio": fused_audio}
        else:
            fused = dict(last_tokens)
        parts = [weighted[m] for m in self.modalities] + [fused[m].mean(dim=1) for m in self.modalities]
        embedding = torch.cat(parts, dim=-1)                                       # (B, 2 * sum C)
        return FinetuneFeatures(layer_means, weighted, last_tokens, fused, embedding, self.fc_norm(embedding))

    def head_output(self, features: FinetuneFeatures) -> torch.Tensor:
        """-> (B, num_classes) logits (or regression outputs) of features from ``forward_features``."""
        return self.head_activation(self.head(features.embedding_normed))

    def forward(self, video: torch.Tensor | None, audio: torch.Tensor | None) -> torch.Tensor:
        """-> (B, num_classes) logits (or regression outputs)."""
        return self.head_output(self.forward_features(video, audio))
