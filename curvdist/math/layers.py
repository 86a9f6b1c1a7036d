"""Supported layer kinds and their row views.  Pure: tensors in, tensors out.

A layer is a module whose weight acts as a matrix W (m × n) on rows:

- ``nn.Linear``: W = weight (out, in); rows are all leading positions of the input (tokens, samples).
- transformers' GPT-2 ``Conv1D``: weight is stored (in, out), so W = weightᵀ.
- ``nn.Conv2d`` (groups=1, zero padding): W = weight flattened to C_out × (C_in·k_h·k_w); rows are the spatial
  output positions of every image, with the input unfolded (im2col) so that s_i = W a_i.

The bias is never part of W (a_i has no appended 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers' GPT-2 Conv1D
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency, but keep the math importable without it
    Conv1D = ()  # type: ignore[assignment]


def is_supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if Conv1D and isinstance(module, Conv1D):
        return True
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            return False
        # padding="same" is only the symmetric im2col padding for odd kernels
        return module.padding != "same" or all(k % 2 == 1 for k in module.kernel_size)
    return False


def shape(module: nn.Module) -> tuple[int, int]:
    """(m, n) of the layer's matrix."""
    w = module.weight
    if isinstance(module, nn.Conv2d):
        return w.shape[0], w[0].numel()
    if Conv1D and isinstance(module, Conv1D):
        return w.shape[1], w.shape[0]
    return w.shape[0], w.shape[1]


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """W as an (m, n) view of the module's weight (out, in)."""
    w = module.weight
    if isinstance(module, nn.Conv2d):
        return w.reshape(w.shape[0], -1)
    if Conv1D and isinstance(module, Conv1D):
        return w.t()
    return w


def matrix_to_weight(module: nn.Module, M: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_matrix`: an (m, n) matrix in the layout of ``module.weight``."""
    if isinstance(module, nn.Conv2d):
        return M.reshape(module.weight.shape)
    if Conv1D and isinstance(module, Conv1D):
        return M.t()
    return M


def _unfold(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # (B, C_in·kh·kw, P) with P the output positions in row-major order
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same": only symmetric cases are supported by unfold
            k = module.kernel_size
            d = module.dilation
            padding = tuple(d[i] * (k[i] - 1) // 2 for i in range(2))
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)


def _output_hw(module: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    pad = module.padding
    if isinstance(pad, str):
        pad = (0, 0) if pad == "valid" else tuple(module.dilation[i] * (module.kernel_size[i] - 1) // 2 for i in range(2))
    return tuple((x.shape[2 + i] + 2 * pad[i] - module.dilation[i] * (module.kernel_size[i] - 1) - 1)
                 // module.stride[i] + 1 for i in range(2))  # type: ignore[return-value]


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input rows a_i: (R, n)."""
    if isinstance(module, nn.Conv2d):
        u = _unfold(module, x)  # (B, n, P)
        return u.transpose(1, 2).reshape(-1, u.shape[1])
    return x.reshape(-1, x.shape[-1])


def output_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Rows of a tensor shaped like the layer's output (errors δ_i, or outputs s_i): (R, m)."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


def rows_per_item(module: nn.Module, x: torch.Tensor) -> int:
    """How many rows each leading item (sample) of the input contributes (T for sequences, P for conv)."""
    return input_rows(module, x[:1]).shape[0]


def directional_output(module: nn.Module, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Tangent of the layer output along W → W + t u_k v_kᵀ for k = 1..K: (K, *output_shape).

    ``U`` (K, m), ``V`` (K, n).  ṡ_i = (v_kᵀ a_i) u_k, so the tangent of each row is rank one.
    """
    U = U.to(x.dtype)
    V = V.to(x.dtype)
    if isinstance(module, nn.Conv2d):
        u = _unfold(module, x)  # (B, n, P)
        c = torch.einsum("bnp,kn->kbp", u, V)  # (K, B, P)
        out = torch.einsum("kbp,km->kbmp", c, U)  # (K, B, m, P)
        h_out, w_out = _output_hw(module, x)
        return out.reshape(U.shape[0], x.shape[0], U.shape[1], h_out, w_out)
    c = torch.einsum("...n,kn->k...", x, V)  # (K, ...)
    return c[..., None] * U.reshape(U.shape[0], *([1] * (x.dim() - 1)), U.shape[1])
