"""Video VAE: 4 RGB frames <-> one latent frame (16 channels, 8x smaller per side).

The decoder is conditioned on the previous latent frame (zeros before the first), so it is
stateless per call and streams: each latent frame decodes as soon as it exists, and its 4
frames continue smoothly from the previous ones. The encoder serves training and
image-to-video (the given image, repeated 4 times, becomes the first latent frame).
Pixels are float in [-1, 1] inside the model and uint8 outside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .schedule import centre_crop


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (the same parameters, the same numbers up to float rounding) whose
    statistics, under torch.compile, come from sums per channel. Inductor reduces each group
    of a channels-last tensor (which it picks for the convolutions) as a strided read, one
    program per group: at 14b's 1280x720 the decoder's last norm (32 groups of 4 channels of
    921,600 pixels) took 0.75 ms of the 4.1 ms decode on an H200, about 0.3 TB/s. Sums over
    the pixels of each channel read contiguous rows, in as many programs as Inductor splits
    them into. Eager calls, and ONNX export, stay ``nn.GroupNorm``'s."""

    def forward(self, x):
        if not torch.compiler.is_compiling():
            return super().forward(x)
        return group_norm_by_channels(self, x)


def group_norm_by_channels(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for x [B, C, H, W], its mean and variance (two passes, float32) summed per
    channel first, then per group."""
    b, c, h, w = x.shape
    per = c // norm.num_groups
    xf = x.float()

    def per_channel(group_sums):  # [B, G] -> [B, C, 1, 1]
        return group_sums.repeat_interleave(per, dim=1)[:, :, None, None] / (per * h * w)

    mean = per_channel(xf.sum((2, 3)).view(b, -1, per).sum(-1))
    centred = xf - mean
    var = per_channel(centred.square().sum((2, 3)).view(b, -1, per).sum(-1))
    y = centred * torch.rsqrt(var + norm.eps)
    if norm.affine:
        y = y * norm.weight.float()[:, None, None] + norm.bias.float()[:, None, None]
    return y.to(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1 = GroupNorm(min(32, ch // 4), ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = GroupNorm(min(32, ch // 4), ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = list(reversed(cfg.channels))  # pixel side first
        levels = int(math.log2(cfg.downsample))
        self.conv_in = nn.Conv2d(3 * cfg.frames_per_latent, chs[0], 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(levels):
            cin, cout = chs[min(i, len(chs) - 1)], chs[min(i + 1, len(chs) - 1)]
            self.down.append(nn.Sequential(ResBlock(cin), nn.Conv2d(cin, cout, 3, stride=2, padding=1)))
        self.mid = ResBlock(chs[-1])
        self.norm_out = GroupNorm(min(32, chs[-1] // 4), chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, frames):
        """frames [B, 4, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, C, H/8, W/8]."""
        b, t, c, h, w = frames.shape
        x = self.conv_in(frames.reshape(b, t * c, h, w))
        for layer in self.down:
            x = layer(x)
        x = self.conv_out(F.silu(self.norm_out(self.mid(x))))
        return x.chunk(2, dim=1)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.frames = cfg.frames_per_latent
        chs = list(cfg.channels)  # latent side first
        levels = int(math.log2(cfg.downsample))
        self.conv_in = nn.Conv2d(2 * cfg.latent_channels, chs[0], 3, padding=1)
        self.mid = ResBlock(chs[0])
        self.up = nn.ModuleList()
        for i in range(levels):
            cin, cout = chs[min(i, len(chs) - 1)], chs[min(i + 1, len(chs) - 1)]
            self.up.append(nn.ModuleDict({
                "res": ResBlock(cin), "conv": nn.Conv2d(cin, cout, 3, padding=1)}))
        self.norm_out = GroupNorm(min(32, chs[-1] // 4), chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], 3 * self.frames, 3, padding=1)

    def forward(self, latent, prev_latent):
        """latent, prev_latent [B, C, h, w] -> frames [B, 4, 3, 8h, 8w] in [-1, 1]."""
        x = self.mid(self.conv_in(torch.cat([latent, prev_latent], dim=1)))
        for level in self.up:
            x = F.interpolate(level["res"](x), scale_factor=2.0, mode="nearest")
            x = level["conv"](x)
        x = torch.tanh(self.conv_out(F.silu(self.norm_out(x))))
        b, _, h, w = x.shape
        return x.view(b, self.frames, 3, h, w)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def init_weights(self, generator: torch.Generator):
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))

    def encode(self, frames):
        return self.encoder(frames)[0]

    def decode(self, latent, prev_latent=None):
        if prev_latent is None:
            prev_latent = torch.zeros_like(latent)
        return self.decoder(latent, prev_latent)


def to_uint8(frames: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """[B, T, 3, H, W] in [-1, 1] -> [B, T, H, W, 3] uint8 on the CPU (``non_blocking``: from a
    GPU, the copy is queued on the current stream and the caller waits for it)."""
    x = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    # Channels last on the device, then one dense copy: a strided tensor would be reordered
    # element by element on the host. From a GPU the copy lands in pinned memory, which
    # PyTorch's host allocator recycles: fresh pageable memory costs page faults on every
    # frame (about 11 MB for 4 frames of 720p).
    x = x.permute(0, 1, 3, 4, 2).contiguous()
    if not x.is_cuda:
        return x
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=non_blocking)


def from_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[B, T, H, W, 3] uint8 -> [B, T, 3, H, W] in [-1, 1] float32."""
    return frames.permute(0, 1, 4, 2, 3).float() / 127.5 - 1


def fit_frames(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Frames [T, 3, H, W] (float) of any size -> [T, 3, height, width]: cropped at their centre
    to that aspect ratio (``helios.schedule.centre_crop``), then resized (bilinear). How a
    clip to continue is fitted."""
    rows, cols = centre_crop(*x.shape[-2:], height, width)
    return F.interpolate(x[..., rows, cols], size=(height, width), mode="bilinear",
                         align_corners=False)
