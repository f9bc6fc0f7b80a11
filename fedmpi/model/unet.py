"""The denoising UNet ("The Annotated Diffusion Model" family used by FedDiffuse).

The network's top-level children are named by communication region, so a region is
a prefix of parameter names (see `fedmpi.model.regions`):

- ``encoder``: initial conv, sinusoidal time embedding + MLP, every down-sampling level
- ``bottleneck``: middle ConvNeXt block, full attention, ConvNeXt block
- ``decoder``: the up-sampling levels and the final block + 1x1 conv

As in the reference code only ``len(dim_mults) - 1`` decoder levels are built, so the
skip from the first encoder level is unused. With dim=28, dim_mults=(1, 2, 4) and one
input channel this gives exactly the paper's 1,280,642 / 999,376 / 716,297 parameters.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from fedmpi.config import CHOICES


class SinusoidalTimeEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class ConvNextBlock(nn.Module):
    """Depthwise 7x7 conv, time conditioning, then an inverted-bottleneck conv pair."""

    def __init__(self, dim: int, dim_out: int, time_dim: int | None = None, mult: int = 2):
        super().__init__()
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(time_dim, dim)) if time_dim else None
        self.ds_conv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.net = nn.Sequential(
            nn.GroupNorm(1, dim),
            nn.Conv2d(dim, dim_out * mult, 3, padding=1),
            nn.GELU(),
            nn.GroupNorm(1, dim_out * mult),
            nn.Conv2d(dim_out * mult, dim_out, 3, padding=1),
        )
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, t=None):
        h = self.ds_conv(x)
        if self.mlp is not None and t is not None:
            h = h + self.mlp(t)[:, :, None, None]
        return self.net(h) + self.res_conv(x)


class Attention(nn.Module):
    """Full softmax self-attention over pixels (bottleneck only: quadratic in pixels)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1))
        out = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), scale=self.scale
        )
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


class LinearAttention(nn.Module):
    """Linear attention (Shen et al.): softmax over features, linear in pixels."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class PreNormResidual(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.GroupNorm(1, dim)
        self.fn = fn

    def forward(self, x):
        return x + self.fn(self.norm(x))


class Level(nn.Module):
    """Two ConvNeXt blocks, linear attention, then a resampling layer."""

    def __init__(self, dim_in, dim_out, time_dim, mult, heads, dim_head, resample: nn.Module):
        super().__init__()
        self.block1 = ConvNextBlock(dim_in, dim_out, time_dim, mult)
        self.block2 = ConvNextBlock(dim_out, dim_out, time_dim, mult)
        self.attn = PreNormResidual(dim_out, LinearAttention(dim_out, heads, dim_head))
        self.resample = resample

    def forward(self, x, t):
        x = self.attn(self.block2(self.block1(x, t), t))
        return x, self.resample(x)


class Encoder(nn.Module):
    def __init__(self, channels, init_dim, dims, time_dim, dim, mult, heads, dim_head):
        super().__init__()
        self.init_conv = nn.Conv2d(channels, init_dim, 7, padding=3)
        self.channels_last = False  # set through UNet.channels_last
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(dim),
            nn.Linear(dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )
        pairs = list(zip(dims[:-1], dims[1:]))
        self.levels = nn.ModuleList(
            Level(
                a,
                b,
                time_dim,
                mult,
                heads,
                dim_head,
                nn.Conv2d(b, b, 4, 2, 1) if i < len(pairs) - 1 else nn.Identity(),
            )
            for i, (a, b) in enumerate(pairs)
        )

    def forward(self, x, time):
        t = self.time_mlp(time)
        x = self.init_conv(x)
        if self.channels_last:  # NHWC activations from here on (the input has 1-3 channels)
            x = x.contiguous(memory_format=torch.channels_last)
        skips = []
        for level in self.levels:
            skip, x = level(x, t)
            skips.append(skip)
        return x, t, skips


class Bottleneck(nn.Module):
    def __init__(self, mid_dim, time_dim, mult, heads, dim_head):
        super().__init__()
        self.block1 = ConvNextBlock(mid_dim, mid_dim, time_dim, mult)
        self.attn = PreNormResidual(mid_dim, Attention(mid_dim, heads, dim_head))
        self.block2 = ConvNextBlock(mid_dim, mid_dim, time_dim, mult)

    def forward(self, x, t):
        return self.block2(self.attn(self.block1(x, t)), t)


class Decoder(nn.Module):
    def __init__(self, dims, time_dim, dim, out_channels, mult, heads, dim_head):
        super().__init__()
        pairs = list(zip(dims[:-1], dims[1:]))[1:]  # the level-0 skip is unused (reference)
        self.levels = nn.ModuleList(
            Level(b * 2, a, time_dim, mult, heads, dim_head, nn.ConvTranspose2d(a, a, 4, 2, 1))
            for a, b in reversed(pairs)
        )
        self.final_block = ConvNextBlock(dim, dim, None, mult)
        self.final_conv = nn.Conv2d(dim, out_channels, 1)

    def forward(self, x, t, skips):
        for level in self.levels:
            _, x = level(torch.cat((x, skips.pop()), dim=1), t)
        return self.final_conv(self.final_block(x))


class UNet(nn.Module):
    """Epsilon-prediction UNet whose children `encoder`, `bottleneck`, `decoder` are regions."""

    def __init__(
        self,
        dim=28,
        init_dim=None,
        dim_mults=(1, 2, 4),
        channels=1,
        convnext_mult=2,
        attn_heads=4,
        attn_dim_head=32,
    ):
        super().__init__()
        if len(dim_mults) < 2:
            raise ValueError("model.dim_mults needs at least two levels")
        init_dim = init_dim or dim // 3 * 2
        dims = [init_dim, *(dim * m for m in dim_mults)]
        time_dim = dim * 4
        if dims[1] != dim:
            # The decoder ends at `dim` channels and upsamples back to the input size.
            raise ValueError("model.dim_mults must start with 1")
        self.channels = channels
        self.downsample_factor = 2 ** (len(dim_mults) - 1)
        self.encoder = Encoder(
            channels, init_dim, dims, time_dim, dim, convnext_mult, attn_heads, attn_dim_head
        )
        self.bottleneck = Bottleneck(dims[-1], time_dim, convnext_mult, attn_heads, attn_dim_head)
        self.decoder = Decoder(
            dims, time_dim, dim, channels, convnext_mult, attn_heads, attn_dim_head
        )

    @property
    def channels_last(self) -> bool:
        """Activations in channels-last (NHWC) memory layout (`train.channels_last`): the
        same numbers up to float rounding, faster convolutions on CPUs (oneDNN: about 1.25x
        for training the quickstart UNet on one core) and on tensor cores. The weights keep
        their layout, so the regions' flat buffers are unchanged."""
        return self.encoder.channels_last

    @channels_last.setter
    def channels_last(self, value: bool) -> None:
        self.encoder.channels_last = bool(value)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, t_emb, skips = self.encoder(x, t)
        h = self.bottleneck(h, t_emb)
        return self.decoder(h, t_emb, skips)


def build_unet(model_cfg, channels: int, image_size: int) -> UNet:
    """The UNet for a `ModelCfg` and the dataset's channels / image size."""
    net = UNet(
        dim=model_cfg.dim,
        init_dim=model_cfg.init_dim,
        dim_mults=tuple(model_cfg.dim_mults),
        channels=channels,
        convnext_mult=model_cfg.convnext_mult,
        attn_heads=model_cfg.attn_heads,
        attn_dim_head=model_cfg.attn_dim_head,
    )
    if image_size % net.downsample_factor:
        raise ValueError(
            f"image size {image_size} is not divisible by "
            f"2^(len(model.dim_mults)-1) = {net.downsample_factor}"
        )
    return net


# The modules compile_unet returned with CUDA graphs ("reduce-overhead", "max-autotune";
# the compiled wrappers themselves: an attribute set on a wrapper would land on the
# wrapped UNet).
_CUDAGRAPH_MODULES: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def compile_unet(model: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """torch.compile of the UNet (train.compile, train.compile_mode), for training and
    sampling alike. "reduce-overhead" replays each call's kernels as CUDA graphs: at batch
    128 the paper UNet's step is mostly kernel launches on an H100 (bench/speed.py); on a
    CPU it is the default mode. Samplers and training steps begin a new graph step before
    each call of such a module (`cudagraph_step`).

    A model with `channels_last` set is compiled with inductor's channels-last layout
    forced: left to its heuristic, inductor keeps NCHW for this UNet (its decoder
    convolutions halve the channels), so cuDNN transposes around every convolution and the
    depthwise 7 x 7 convolutions fall to PyTorch's slower NCHW kernels (on an H100 these
    were 9% and 29% of a bf16 CUDA-graph step)."""
    modes = CHOICES["train.compile_mode"]
    if mode not in modes:
        raise ValueError(f"unknown compile mode '{mode}' ({' | '.join(modes)})")
    from torch._inductor import list_mode_options  # what torch.compile(mode=...) applies

    options = dict(list_mode_options(mode))
    if getattr(model, "channels_last", False):
        options["force_layout_optimization"] = True
    net = torch.compile(model, options=options or None)
    if options.get("triton.cudagraphs"):
        _CUDAGRAPH_MODULES.add(net)
    return net


def cudagraph_step(model) -> None:
    """Before each call of a sampling loop and each training step: a CUDA-graph compiled
    model may then overwrite its previous outputs (consumed by then) instead of keeping
    them alive. Once any step is marked this way, torch relies on the marks alone, so
    every caller of such a module marks its steps."""
    if model in _CUDAGRAPH_MODULES:
        torch.compiler.cudagraph_mark_step_begin()
