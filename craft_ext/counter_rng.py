"""A counter-based random generator whose state is a device tensor: traceable and capturable.

``torch.Generator`` objects cannot be traced by Dynamo (a compiled training step breaks its
graph around a reactivation that draws from one) and must be registered with every CUDA graph
that captures a draw. :class:`CounterGenerator` keeps its state as an int64 tensor
``[seed, offset]`` on the device and draws with plain tensor ops:

* value ``j`` of a draw of ``n`` numbers is ``h(seed, offset + j)`` with ``h`` three rounds
  of a 32-bit integer hash (``lowbias32``: xor-shift / multiply, C. Wellons 2018) over the
  64-bit counter and key; all integer arithmetic stays below 2^49 in int64, so it is exact
  (and identical) on every device and under Inductor;
* ``rand``: ``(h >> 8) * 2^-24``, float32 uniform in [0, 1) on a 2^-24 grid (as ``torch.rand``);
* ``randn``: Box-Muller on pairs of uniforms, ``sqrt(-2 log(1 - u1)) * (cos, sin)(2 pi u2)``
  in float32 (values are bit-identical between eager runs on one device; compiled code may
  evaluate log / cos / sin to a different last bit);
* after a draw, ``offset += count`` in place on the device (no host synchronisation), so the
  next draw continues the stream, in eager mode, in a compiled graph or in CUDA-graph replays.

It is meant for what reactivation needs (a random order of filters, donor draws, initial
weights), not for cryptography. :class:`craft_ext.Reactivator` uses one per device with
``rng="counter"``; :func:`craft_ext.reactivate_` accepts one as ``generator``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["CounterGenerator"]

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, m: int) -> Tensor:
    """(x * m) mod 2^32 for int64 x in [0, 2^32) and m < 2^32, with products below 2^49."""
    hi = ((x >> 16) * m) & 0xFFFF  # the bits of (x_hi * m) that land below 2^32 after << 16
    return ((hi << 16) + (x & 0xFFFF) * m) & _M32


def _hash32(x: Tensor) -> Tensor:
    """lowbias32 (Wellons): a 32-bit integer hash with low bias, on int64 values < 2^32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash(state: Tensor, n: int) -> Tensor:
    """int64 [n] in [0, 2^32): h(seed, offset + j) for j < n (state = [seed, offset])."""
    seed = state[0]
    k0 = _hash32(seed & _M32)
    k1 = _hash32((seed >> 32) ^ 0x9E3779B9)
    c = state[1] + torch.arange(n, device=state.device, dtype=torch.int64)
    h = _hash32((c & _M32) ^ k0)
    h = _hash32(h ^ (c >> 32) ^ k1)
    return _hash32(h ^ k0)


class CounterGenerator:
    """Counter-based generator with its state ``[seed, offset]`` as an int64 tensor on
    ``device`` (see the module docs). Not thread-safe, like ``torch.Generator``."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.state = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> CounterGenerator:
        """Restart the stream of ``seed`` (any int; taken modulo 2^63)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.state.copy_(torch.tensor([seed % (1 << 63), 0], dtype=torch.int64))
        return self

    def get_state(self) -> Tensor:
        """A CPU copy of ``[seed, offset]`` (int64 [2]); reads the device."""
        return self.state.detach().to("cpu", copy=True)

    def set_state(self, state: Tensor) -> None:
        """Restore :meth:`get_state` output."""
        if not isinstance(state, Tensor) or state.dtype != torch.int64 or state.shape != (2,):
            got = (
                f"{state.dtype} {tuple(state.shape)}"
                if isinstance(state, Tensor)
                else type(state).__name__
            )
            raise ValueError(f"CounterGenerator state must be int64 [seed, offset], got {got}")
        self.state.copy_(state)

    def _draw(self, n: int) -> Tensor:
        h = _hash(self.state, n)
        self.state[1:].add_(n)
        return (h >> 8).to(torch.float32) * (2.0**-24)

    def rand(self, *size: int) -> Tensor:
        """float32 uniform [0, 1) of shape ``size``; advances the offset by its numel."""
        shape = torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int) else size)
        return self._draw(shape.numel()).view(shape)

    def randn(self, *size: int) -> Tensor:
        """float32 standard normal of shape ``size`` (Box-Muller; advances the offset by
        2 * ceil(numel / 2))."""
        shape = torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int) else size)
        m = shape.numel()
        p = (m + 1) // 2
        u = self._draw(2 * p)
        r = torch.sqrt(-2.0 * torch.log1p(-u[:p]))
        t = u[p:] * (2.0 * math.pi)
        return torch.cat([r * torch.cos(t), r * torch.sin(t)])[:m].view(shape)

    def __repr__(self) -> str:
        return f"CounterGenerator(device={self.device})"
