"""The OneVision Encoder with the published checkpoint's layout, on dense batches: the reference the
packed model is checked against (the hub's ``OneVisionEncoderModel`` is remote code for
transformers 4.57, whose non-persistent RoPE buffers transformers 5 leaves uninitialised).

``LlavaViTModel(config)`` builds random weights; ``save_pretrained`` / ``from_pretrained`` write
and read the published layout (``config.json`` of ``model_type`` ``onevision_encoder`` and
``embeddings.patch_embedding``, ``encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ...; a leading
``onevision_encoder.`` or ``llava_vit.`` in the tensor names is accepted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import read_config_dict, read_state_dict, resolve_checkpoint, strip_prefix, write_checkpoint
from ..layers import ACTIVATIONS, RMSNorm
from ..models.base import default_dtype
from ..models.llava_vit import PUBLISHED_PREFIXES, LlavaViTConfig, norm_layer

__all__ = ["LlavaViTModel", "DenseVisionOutput"]


@dataclass
class DenseVisionOutput:
    """``last_hidden_state [B, L, D]``, ``pooler_output [B, D]`` or ``None``, ``hidden_states``."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.last_hidden_state, self.pooler_output, self.hidden_states) if v is not None)


def _rope_freqs(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Angles ``[..., head_dim / 2]`` for positions ``[..., 3]``: [t w_t | r w_h | c w_w]."""
    unit = head_dim // 2 // 16
    sizes = (4 * unit, 6 * unit, 6 * unit)
    ladders = [1.0 / (theta ** (torch.arange(size, dtype=torch.float32, device=positions.device) / size)) for size in sizes]
    positions = positions.float()
    return torch.cat([positions[..., axis, None] * ladders[axis] for axis in range(3)], dim=-1)


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """``rot(x)[2i] = -x[2i+1]``, ``rot(x)[2i+1] = x[2i]``."""
    x_even, x_odd = x[..., ::2], x[..., 1::2]
    return torch.stack((-x_odd, x_even), dim=-1).flatten(-2)


def _apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``x [B, H, L, hd]``, ``freqs [B, L, hd/2]``: ``x cos(a) + rot(x) sin(a)``, ``a = [f | f]``,
    cos and sin cast to ``x.dtype`` first (as the published class does)."""
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, hd]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    return x * cos + _rotate_interleaved(x) * sin


class LlavaViTEmbeddings(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        p = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Images ``[B, C, H, W]`` or videos ``[B, C, T, H, W]`` → ``([B, T*h*w, D], (T, h, w))``."""
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(2)
        batch, channels, frames, height, width = pixel_values.shape
        # [B, C, T, H, W] → [B*T, C, H, W]: the conv runs per frame
        frames_flat = pixel_values.transpose(1, 2).reshape(batch * frames, channels, height, width)
        embedded = self.patch_embedding(frames_flat.to(self.patch_embedding.weight.dtype))  # [B*T, D, h, w]
        h, w = embedded.shape[-2:]
        # [B*T, D, h, w] → [B*T, h*w, D] → [B, T*h*w, D]
        return embedded.flatten(2).transpose(1, 2).reshape(batch, frames * h * w, -1), (frames, h, w)


class LlavaViTAttention(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, dim // config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        # [B, L, D] → [B, H, L, hd]
        q, k, v = (proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _apply_rope(q, freqs), _apply_rope(k, freqs)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class LlavaViTMLP(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LlavaViTEncoderLayer(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.layer_norm1 = norm_layer(config)
        self.self_attn = LlavaViTAttention(config)
        self.layer_norm2 = norm_layer(config)
        self.mlp = LlavaViTMLP(config)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), freqs)
        return x + self.mlp(self.layer_norm2(x))


class LlavaViTEncoder(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(LlavaViTEncoderLayer(config) for _ in range(config.num_hidden_layers))


class LlavaViTPoolingHead(nn.Module):
    """``out = a + mlp(norm(a))`` with ``a = MultiheadAttention(probe, x, x)``; ``[B, L, D]`` → ``[B, D]``."""

    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        dim = config.hidden_size
        self.probe = nn.Parameter(torch.randn(1, 1, dim) * config.initializer_range)
        self.attention = nn.MultiheadAttention(dim, config.num_attention_heads, batch_first=True)
        self.norm = RMSNorm(dim, eps=config.layer_norm_eps)
        self.mlp = LlavaViTMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1)  # [B, 1, D]
        attended = self.attention(probe, x, x, need_weights=False)[0]
        return (attended + self.mlp(self.norm(attended)))[:, 0]


class LlavaViTModel(nn.Module):
    """The OneVision Encoder with the published checkpoint's layout, on dense batches.

    ``model(pixel_values)`` with images ``[B, C, H, W]`` or videos ``[B, C, T, H, W]``; optional
    ``visible_indices [B, L]`` (flat indices ``t*h*w + r*w + c`` into a ``rope_temporal_size x h x w``
    grid: they select the RoPE positions, and the tokens too when L differs from T*h*w) and
    ``patch_positions [B, L, 3]`` (explicit (t, row, column), overriding both). Without either, frame
    i of a video sits at t = i.
    """

    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.embeddings = LlavaViTEmbeddings(config)
        self.layernorm_pre = norm_layer(config)
        self.encoder = LlavaViTEncoder(config)
        if config.use_head:
            self.layernorm_post = norm_layer(config)
            self.head = LlavaViTPoolingHead(config)

    @classmethod
    def from_pretrained(cls, ckpt, dtype=None) -> "LlavaViTModel":
        """A published-layout checkpoint (directory or hub id), in ``dtype`` (default float32), on the CPU."""
        directory = resolve_checkpoint(ckpt)
        config = LlavaViTConfig.from_dict(read_config_dict(directory))
        state = {k: v for k, v in strip_prefix(read_state_dict(directory), PUBLISHED_PREFIXES).items()
                 if not k.startswith("video_rope.")}
        with torch.device("meta"):
            model = cls(config)
        expected = set(model.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"{directory} is not a published-layout OneVision Encoder checkpoint of its config: missing "
                f"{sorted(expected - set(state))[:6]}, unexpected {sorted(set(state) - expected)[:6]}"
            )
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(default_dtype(torch.device("cpu"), dtype)).eval()

    def save_pretrained(self, directory) -> None:
        write_checkpoint(Path(directory), self.config.to_dict(), self.state_dict())

    def _rope_freqs(self, grid: tuple[int, int, int], batch: int, visible_indices, patch_positions, device) -> torch.Tensor:
        """RoPE angles ``[B, L, hd/2]``."""
        frames, h, w = grid
        if patch_positions is not None:
            return _rope_freqs(patch_positions.to(device), self.head_dim, self.config.rope_theta)
        if visible_indices is not None:
            t, r, c = torch.meshgrid(torch.arange(self.config.rope_temporal_size), torch.arange(h), torch.arange(w), indexing="ij")
            grid_positions = torch.stack([t, r, c], dim=-1).reshape(-1, 3).to(device)  # [64*h*w, 3]
            return _rope_freqs(grid_positions, self.head_dim, self.config.rope_theta)[visible_indices.to(device)]
        t, r, c = torch.meshgrid(torch.arange(frames), torch.arange(h), torch.arange(w), indexing="ij")
        positions = torch.stack([t, r, c], dim=-1).reshape(1, -1, 3).expand(batch, -1, -1).to(device)
        return _rope_freqs(positions, self.head_dim, self.config.rope_theta)

    def forward(self, pixel_values: torch.Tensor, visible_indices: torch.Tensor | None = None,
                patch_positions: torch.Tensor | None = None, output_hidden_states: bool = False,
                return_dict: bool = True) -> DenseVisionOutput | tuple:
        x, grid = self.embeddings(pixel_values)  # [B, T*h*w, D]
        batch, total, dim = x.shape
        if visible_indices is not None and visible_indices.shape[1] != total:
            x = torch.gather(x, 1, visible_indices.to(x.device)[..., None].expand(-1, -1, dim))  # [B, L, D]
        freqs = self._rope_freqs(grid, batch, visible_indices, patch_positions, x.device)
        x = self.layernorm_pre(x)
        all_hidden = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = layer(x, freqs)
            if output_hidden_states:
                all_hidden.append(x)
        pooled = None
        if self.config.use_head:
            x = self.layernorm_post(x)
            pooled = self.head(x)  # [B, D]
        output = DenseVisionOutput(x, pooled, tuple(all_hidden) if all_hidden else None)
        return output if return_dict else output.to_tuple()
