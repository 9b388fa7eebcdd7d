"""The two HarMA adapter modules: the multimodal gated adapter (MGA) and the shared mini adapter (MMS).

Shapes: every module here takes and returns ``(batch, tokens, width)`` when ``batch_first`` is
true and ``(tokens, batch, width)`` otherwise; only the self-attention cares which.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The API (its page lists these, in this order); the other functions serve the package.
__all__ = [
    "MultimodalGatedAdapter",
    "MiniAdapter",
    "SelfAttention",
    "compile_adapters",
]


class SelfAttention(nn.Module):
    """Multi-head self-attention over the token axis, unmasked or causal.

    Parameters are laid out exactly as `torch.nn.MultiheadAttention`'s (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``) so that the reference checkpoints
    load key for key, but the forward pass calls ``scaled_dot_product_attention`` directly: at
    a 128-dim bottleneck the generic module's argument checks and reshapes cost more than the
    attention itself.
    """

    def __init__(self, dim: int, heads: int, batch_first: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention heads ({heads}) must divide the width ({dim})")
        self.dim = dim
        self.heads = heads
        self.batch_first = batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The initialisation nn.MultiheadAttention uses, so fresh adapters match the reference's.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """``x``: ``(batch, tokens, dim)`` (or ``(tokens, batch, dim)``); ``causal``: token ``t``
        attends to tokens ``<= t`` only."""
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch, tokens, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if qkv.is_cuda:
            query, key, value = qkv.view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            attended = F.scaled_dot_product_attention(query, key, value, is_causal=causal).transpose(1, 2)
        else:
            attended = _matmul_attention(qkv, self.heads, causal)
        out = self.out_proj(attended.reshape(batch, tokens, self.dim))
        return out if self.batch_first else out.transpose(0, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, batch_first={self.batch_first}"


def _matmul_attention(qkv: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """Softmax attention from packed projections ``qkv`` ``(batch, tokens, 3 * dim)`` (query, key,
    value, each ``heads`` heads wide); returns ``(batch, tokens, heads, dim // heads)``.

    PyTorch's CPU flash kernel is slower than plain matrix products at these head widths (8-16)
    and sequence lengths (50-77): 10.6 against 6.7 ms forward and backward at (8, 8, 77, 16). The
    three operands are laid out head-major in one copy (one kernel, not one per product), and the
    scale (and the causal mask) enter the score product itself rather than as passes of their own.
    """
    batch, tokens, _ = qkv.shape
    head_dim = qkv.shape[-1] // (3 * heads)
    query, key, value = (
        qkv.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).reshape(3, batch * heads, tokens, head_dim)
    ).unbind(0)
    if causal:
        # -inf above the diagonal: beta=1 adds it to the scaled products, as masked_fill would set it.
        bias = torch.full((tokens, tokens), float("-inf"), dtype=qkv.dtype, device=qkv.device).triu(1)
    else:
        bias = qkv.new_zeros(()).expand(batch * heads, tokens, tokens)  # ignored with beta=0
    scores = torch.baddbmm(bias, query, key.transpose(1, 2), beta=1 if causal else 0, alpha=head_dim**-0.5)
    attended = torch.bmm(scores.softmax(dim=-1), value)
    return attended.view(batch, heads, tokens, head_dim).transpose(1, 2)


class MiniAdapter(nn.Module):
    """MMS, the shared mini adapter (reference name ``BiShareAdapter``).

    ``out = y + W2 (sigmoid(g) * MHA(u) + (1 - sigmoid(g)) * u)`` with ``u = W1 y``; ``W2`` starts
    at zero so a fresh MMS is the identity. Input and output: ``(..., dim)``.
    """

    def __init__(
        self, dim: int, bottleneck: int, heads: int, gate_init: float, batch_first: bool = True
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.attn = SelfAttention(bottleneck, heads, batch_first)
        self.up = nn.Linear(bottleneck, dim)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor, causal: bool = False) -> torch.Tensor:
        u = self.down(y)
        v = self.attn(u, causal)
        # lerp(u, v, g) = g * v + (1 - g) * u in one kernel (and one autograd node).
        return y + self.up(torch.lerp(u, v, torch.sigmoid(self.gate)))


class MultimodalGatedAdapter(nn.Module):
    """MGA, the multimodal gated adapter (reference name ``MMadapter``), with its block gate.

    Applied to the output ``m`` of a transformer block's MLP (or attention sublayer), of shape
    ``(batch, tokens, width)`` (``(tokens, batch, width)`` when not ``batch_first``):

        h = GELU(W_down m)
        a = MHA(MMS(MHA(h)))                      # the same MHA twice; MMS only if attached
        z = sigmoid(g) * h + (1 - sigmoid(g)) * a
        returns m + sigmoid(g_block) * W_up z

    With ``attention_passes=1`` the second MHA is skipped (``a = MMS(MHA(h))``); with ``causal``
    every attention inside the adapter, the MMS's included, is causal over the tokens.

    which equals the reference's ``sigmoid(g_block) * MGA(m) + (1 - sigmoid(g_block)) * m``
    with ``MGA(m) = m + W_up z``, but is exactly ``m`` while ``W_up`` is zero (no rounding from
    the convex mix), which is what makes a freshly patched model compute what it did before.

    ``mini_adapter`` may be the same `MiniAdapter` instance in several MGAs (the paper
    layout); it is then registered under each of them, like tied weights.
    """

    # Class defaults of the switches set in __init__: a whole model pickled by an earlier harma,
    # whose adapters lack "active", still runs.
    enabled: bool = True
    active: bool = True
    # Set by harma.mixed_adapter_batch only: ``(indices, batch size)``, the rows of each batch that
    # this adapter's set adapts (whether or not it is the active set).
    rows: tuple[torch.Tensor, int] | None = None

    def __init__(
        self,
        width: int,
        bottleneck: int,
        heads: int,
        gate_init: float,
        block_gate_init: float,
        mini_adapter: MiniAdapter | None = None,
        batch_first: bool = True,
        attention_passes: int = 2,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if attention_passes not in (1, 2):
            raise ValueError(f"attention_passes must be 1 or 2, got {attention_passes!r}")
        self.width = width
        self.attention_passes = attention_passes
        # Per adapter, not per MMS: a shared MMS attends causally for a text MGA and fully for
        # an image MGA of the same layer.
        self.causal = causal
        self.down = nn.Linear(width, bottleneck)
        self.attn = SelfAttention(bottleneck, heads, batch_first)
        self.up = nn.Linear(bottleneck, width)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.block_gate = nn.Parameter(torch.tensor(float(block_gate_init)))
        self.mini_adapter = mini_adapter
        # Plain attributes so that torch.compile guards on them: ``enabled`` is switched by
        # harma.disable_adapters(), ``active`` by harma.set_adapter() (one set runs at a time).
        self.enabled = True
        self.active = True
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return self._adapt_rows(m) if self.enabled else m
        if not (self.enabled and self.active):
            return m
        return self._adapt(m)

    def _adapt(self, m: torch.Tensor) -> torch.Tensor:
        """``m + sigmoid(g_block) * W_up z`` for every row of ``m``, in ``m``'s dtype.

        Adapters may be kept in float32 on a half-precision backbone (``autocast_adapter_dtype``
        of `harma.inject_harma_adapters`). Under autocast the products are cast as usual; outside
        it the adapter runs in its own dtype and only its contribution is cast to ``m``'s.
        """
        gate = torch.sigmoid(self.block_gate)
        if m.dtype != self.up.weight.dtype and not torch.is_autocast_enabled(m.device.type):
            return m + (gate * self.up(self._bottleneck(m.to(self.up.weight.dtype)))).to(m.dtype)
        return _gated_residual(m, self._bottleneck(m), gate, self.up)

    def _bottleneck(self, m: torch.Tensor) -> torch.Tensor:
        """``z``: the gated mix of the down-projection and its attention, ``(..., bottleneck)``."""
        h = F.gelu(self.down(m))
        a = self.attn(h, self.causal)
        if self.mini_adapter is not None:
            a = self.mini_adapter(a, self.causal)
        if self.attention_passes == 2:
            a = self.attn(a, self.causal)
        return torch.lerp(a, h, torch.sigmoid(self.gate))  # g * h + (1 - g) * a

    def _adapt_rows(self, m: torch.Tensor) -> torch.Tensor:
        """`_adapt` on the rows of the batch ``self.rows`` names, the other rows as they are."""
        index, size = self.rows
        batch_dim = 0 if self.attn.batch_first else 1
        if m.shape[batch_dim] != size:
            raise ValueError(
                f"harma.mixed_adapter_batch names an adapter for each of {size} rows, but a batch of "
                f"{m.shape[batch_dim]} rows reached the adapters (each tower's batch must have one row per name)"
            )
        if index.numel() == 0:
            return m
        index = index.to(m.device)
        return m.index_copy(batch_dim, index, self._adapt(m.index_select(batch_dim, index)))

    def extra_repr(self) -> str:
        return (
            f"width={self.width}, shared_mini_adapter={self.mini_adapter is not None}, "
            f"attention_passes={self.attention_passes}, causal={self.causal}"
        )


def _gated_residual(m: torch.Tensor, z: torch.Tensor, gate: torch.Tensor, up: nn.Linear) -> torch.Tensor:
    """``m + gate * up(z)`` for ``m`` ``(..., width)``, ``z`` ``(..., bottleneck)`` and a scalar ``gate``.

    The gate scales the small up-projection weight and bias instead of the ``(..., width)``
    product, and ``m`` enters the matrix product as its accumulator: one full-width pass instead
    of three, forward and backward, and still exactly ``m`` while ``up`` is zero. Under autocast
    (weights and activations of different dtypes) the plain form keeps the result in the dtype
    type promotion gives ``m + gate * up(z)``.
    """
    if not m.dtype == z.dtype == up.weight.dtype:
        return m + gate * up(z)
    width = m.shape[-1]
    out = torch.addmm(m.reshape(-1, width), z.reshape(-1, z.shape[-1]), (gate * up.weight).t())
    return out.add_(gate * up.bias).view(m.shape)


def apply_adapter_hook(
    adapter: MultimodalGatedAdapter, module: nn.Module, args: tuple, output: torch.Tensor
) -> torch.Tensor:
    """Forward hook placed on a block's MLP: its output goes through the block's adapter.

    A module-level function bound with `functools.partial` (not a closure) so that
    patched models can be deep-copied and pickled.
    """
    return adapter(output)


def apply_attention_adapter_hook(
    adapter: MultimodalGatedAdapter, module: nn.Module, args: tuple, output: Any
) -> Any:
    """Forward hook placed on a block's attention module: its output goes through the adapter.

    Attention modules return a tensor (timm, open_clip's custom blocks) or a tuple whose first
    item is the attended sequence (``nn.MultiheadAttention``, Hugging Face attention layers);
    only that sequence is adapted.
    """
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def compile_adapters(model: nn.Module, **compile_options: Any) -> nn.Module:
    """Compile the forward pass of every HarMA adapter in ``model`` with `torch.compile`, in place.

    Optional: the adapters compute the same function compiled or not. On the CPU the compiled
    adapters fuse their elementwise work (softmax, gates, GELU, bias adds) and reuse buffers,
    which in a training step of ViT-B-32 brings HarMA's time closer to its matrix-multiply limit
    (docs/performance.md). Each adapter shape compiles once, at its first forward and backward
    (on a 2-core CPU about two minutes for ViT-B-32's two shapes); adapters of the same shape share
    the compiled code. ``compile_options`` go to `torch.compile` (default ``dynamic=False``:
    the token count and width of a tower do not change between steps). `disable_adapters` keeps
    working (a guard recompiles once for the disabled state).

    Returns:
        ``model`` itself.
    """
    options = {"dynamic": False, **compile_options}
    for module in model.modules():
        if isinstance(module, MultimodalGatedAdapter):
            module.compile(**options)
    return model
