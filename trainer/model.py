"""A decoder-only transformer: RoPE, RMSNorm, SwiGLU, optional tied embeddings.

The model is built on the meta device and materialised after sharding (``init_weights``),
so a 7B model never exists whole in one process's memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    seq_len: int = 2048
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int | None = None  # None: 8/3 * dim rounded up to a multiple of 256
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE")
        if self.ffn_dim is None:
            self.ffn_dim = 256 * math.ceil(8 * self.dim / 3 / 256)


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean and the bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position times each rotary frequency, shape (seq_len, head_dim/2)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of x (batch, heads, seq, head_dim) by its position's angle."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = False  # recompute each block's activations in backward
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab) for token ids (batch, seq)."""
        seq = tokens.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.embed(tokens)
        for block in self.blocks:
            if self.activation_checkpointing:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.head(self.norm(x))

    def initial_value(self, name: str, generator: torch.Generator) -> torch.Tensor:
        """The full initial tensor of parameter ``name``: normal(0, std), residual projections
        scaled by 1/sqrt(2 * n_layers) as in GPT-2, norm weights at one."""
        param = self.get_parameter(name)
        if name.endswith("norm.weight"):
            return torch.ones(param.shape, device=generator.device)
        std = self.cfg.init_std
        if name.endswith(("attn.out.weight", "mlp.down.weight")):
            std /= math.sqrt(2 * self.cfg.n_layers)
        value = torch.empty(param.shape, device=generator.device)
        return value.normal_(0.0, std, generator=generator)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the RoPE tables (after ``to_empty`` left them uninitialised)."""
        head_dim = self.cfg.dim // self.cfg.n_heads
        cos, sin = rope_tables(head_dim, self.cfg.seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters in matrix multiplies: all but the input embedding table)."""
    dim, ffn = cfg.dim, cfg.ffn_dim
    block = 4 * dim * dim + 3 * dim * ffn + 2 * dim
    table = cfg.vocab_size * dim
    total = table + cfg.n_layers * block + dim + (0 if cfg.tie_embeddings else table)
    return total, total - (0 if cfg.tie_embeddings else table)


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token: 6 * N + 12 * L * D * T (PaLM appendix B).

    N counts the parameters that take part in matrix multiplies (the input embedding is a
    lookup); 6 = 2 (multiply-add) x 3 (forward, and backward for inputs and weights).
    12 * L * D * T is attention's QK^T and AV over T positions, D = heads x head dim,
    counted without the causal mask's halving, as in the published MFU figures.
    """
    _, matmul_params = count_params(cfg)
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.dim * cfg.seq_len
