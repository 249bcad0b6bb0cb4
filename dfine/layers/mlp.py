"""A plain multi-layer perceptron: the box heads, LQE and query position head of the DETR decoders."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "identity": nn.Identity}


def mlp_activation(name: str | None) -> nn.Module:
    """A fresh activation module from its name (``relu``, ``silu``, ``gelu``; None means identity)."""
    key = "identity" if name is None else str(name).lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation `{name}`; known: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[key]()


class MLP(nn.Module):
    """``num_layers`` linear layers with an activation between them (none after the last).

    Parameters live in ``layers.{i}.weight/bias`` as in the reference checkpoints.

    Args:
        input_dim, hidden_dim, output_dim: feature sizes; every hidden layer is ``hidden_dim`` wide.
        num_layers: number of linear layers (>= 1).
        act: activation name between layers.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, act: str = "relu"):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs at least one layer, got num_layers={num_layers}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:]))
        self.act = mlp_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        """[..., input_dim] -> [..., output_dim]."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self.act(x)
        return x
