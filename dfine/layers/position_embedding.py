"""Fixed 2D sine-cosine position embedding of the AIFI encoder layer (RT-DETR, D-FINE)."""

from __future__ import annotations

import torch
from torch import Tensor


def sine_cosine_2d(width: int, height: int, embed_dim: int = 256, temperature: float = 10000.0) -> Tensor:
    """Sine-cosine embedding of a ``width`` x ``height`` grid, [1, width * height, embed_dim], float32 on the CPU.

    The channels are four equal blocks: sin and cos of the first grid coordinate ``a`` times the frequencies
    ``temperature ** (-k / (embed_dim / 4))``, then sin and cos of the second coordinate ``b``. Token ``t``
    has ``a = t // height`` (``a < width``) and ``b = t % height``, exactly as the reference orders them, so
    that released weights see the embedding they were trained with. Feature maps are flattened row-major
    ([H, W] -> H * W), so on a square map ``a`` is the row and ``b`` the column.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"the 2D sine-cosine embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    freqs = 1.0 / (temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coord_a, coord_b = torch.meshgrid(
        torch.arange(int(width), dtype=torch.float32), torch.arange(int(height), dtype=torch.float32), indexing="ij"
    )
    angles_a = coord_a.flatten()[:, None] @ freqs[None]
    angles_b = coord_b.flatten()[:, None] @ freqs[None]
    return torch.cat([angles_a.sin(), angles_a.cos(), angles_b.sin(), angles_b.cos()], dim=1)[None]
