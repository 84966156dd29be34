"""Weight algebra for structural re-parameterization: pure numpy, no ONNX, all in float64.

BatchNorm is the per-channel affine map y = x * s + t with s = gamma / sqrt(var + eps) and
t = beta - mean * s. An affine map after a linear layer folds into it: W' = W * s along the output
channel axis, b' = b * s + t. Parallel linear branches on one input sum to one layer: kernels are
zero-padded to a common size (embedding), regrouped to a common group count, then added; the bare
input is the identity kernel and a per-channel scaling is a diagonal kernel.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

from .errors import Refused


def bn_affine(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
              eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns (scale, shift) with BN(x) = x * scale + shift per channel."""
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(eps))
    return scale, np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * scale


def scale_conv_weight(weight: np.ndarray, scale: np.ndarray, dtype: DTypeLike = np.float64) -> np.ndarray:
    """Conv weight (C_out, C_in/g, k...): output channels are axis 0."""
    return _scaled(weight, np.asarray(scale, np.float64).reshape((-1,) + (1,) * (weight.ndim - 1)), dtype)


def scale_conv_transpose_weight(weight: np.ndarray, scale: np.ndarray, groups: int,
                                dtype: DTypeLike = np.float64) -> np.ndarray:
    """ConvTranspose weight (C_in, C_out/g, k...): output channel g_idx * C_out/g + j is axis 1 of
    the rows of group g_idx, so the scale is laid out per group."""
    c_in, out_per_group = weight.shape[:2]
    spatial = weight.shape[2:]
    grouped = weight.reshape((groups, c_in // groups, out_per_group) + spatial)
    per_group = np.asarray(scale, np.float64).reshape((groups, 1, out_per_group) + (1,) * len(spatial))
    return _scaled(grouped, per_group, dtype).reshape(weight.shape)


def scale_matrix_weight(weight: np.ndarray, scale: np.ndarray, out_axis: int,
                        dtype: DTypeLike = np.float64) -> np.ndarray:
    """2-D weight of a Gemm/MatMul whose output features run along ``out_axis``."""
    return _scaled(weight, np.asarray(scale, np.float64).reshape((-1, 1) if out_axis == 0 else (1, -1)), dtype)


def _scaled(weight: np.ndarray, scale: np.ndarray, dtype: DTypeLike) -> np.ndarray:
    """weight * scale computed in float64 and rounded once to ``dtype``, element by element: no
    float64 copy of the whole weight is made."""
    return np.multiply(weight, scale, dtype=np.float64, out=np.empty(np.broadcast_shapes(weight.shape, scale.shape),
                                                                     dtype), casting="same_kind")


def per_channel(const: np.ndarray, channels: int, axis: int, rank: int | None) -> np.ndarray:
    """The constant as a vector over the channel axis of an output of rank ``rank`` (``axis`` counted
    from the end); raises Refused where it is not one: ONNX broadcasting aligns shapes from the right."""
    if const.ndim > 1 and (rank is None or const.ndim > rank):
        raise Refused(f"constant of shape {list(const.shape)} may broadcast the output to a larger rank")
    pos = const.ndim + axis
    for i, size in enumerate(const.shape):
        if i != pos and size != 1:
            raise Refused(f"constant of shape {list(const.shape)} varies along a non-channel axis")
    if pos >= 0 and const.shape[pos] not in (1, channels):
        raise Refused(f"constant has {const.shape[pos]} channels, the layer {channels}")
    return np.broadcast_to(np.asarray(const, np.float64).reshape(-1), (channels,)).copy()


def fold_bias(bias: np.ndarray | float, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Bias after applying y * scale + shift to the layer's output."""
    return np.asarray(bias, np.float64) * scale + shift


def regroup_kernel(weight: np.ndarray, groups: int, new_groups: int) -> np.ndarray:
    """Rewrites a kernel with ``groups`` groups as an equal one with ``new_groups`` groups, which
    must divide ``groups``: each group's block is placed at its input offset, zeros elsewhere."""
    if groups % new_groups:
        raise ValueError(f"{new_groups} groups do not divide {groups}")
    if groups == new_groups:
        return weight
    c_out, in_per_group = weight.shape[:2]
    c_in = in_per_group * groups
    new_in_per_group = c_in // new_groups
    out_per_group = c_out // groups
    result = np.zeros((c_out, new_in_per_group) + weight.shape[2:], np.float64)
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        first_input = g * in_per_group
        start = first_input - (first_input // new_in_per_group) * new_in_per_group
        result[rows, start:start + in_per_group] = weight[rows]
    return result


def diagonal_kernel(scale: np.ndarray, groups: int, spatial_rank: int) -> np.ndarray:
    """1x..x1 kernel with ``groups`` groups computing y[c] = x[c] * scale[c]."""
    scale = np.asarray(scale, np.float64)
    channels = scale.shape[0]
    per_group = channels // groups
    kernel = np.zeros((channels, per_group) + (1,) * spatial_rank, np.float64)
    index = np.arange(channels)
    kernel[(index, index % per_group) + (0,) * spatial_rank] = scale
    return kernel


def average_kernel(channels: int, kernel: tuple[int, ...]) -> np.ndarray:
    """Depthwise kernel of an average pool over ``kernel`` taps (padding counted)."""
    return np.full((channels, 1) + tuple(kernel), 1.0 / np.prod(kernel))


def compose_pointwise(outer: np.ndarray, outer_groups: int, inner: np.ndarray,
                      inner_groups: int) -> tuple[np.ndarray, int] | None:
    """Kernel and group count of outer(inner(x)) where ``inner`` is a 1x..x1 conv: per group
    W[o, c] = sum_m outer[o, m] * inner[m, c]. Exact as one grouped conv when both have the same
    groups, or when one of them is depthwise with one channel per group (then the other's grouping
    stays); None otherwise."""
    outer = np.asarray(outer, np.float64)
    inner = np.asarray(inner, np.float64).reshape(tuple(inner.shape[:2]))
    middle = inner.shape[0]
    if outer.shape[1] == 1 and outer_groups == middle == outer.shape[0]:  # outer depthwise
        return outer * inner.reshape(inner.shape + (1,) * (outer.ndim - 2)), inner_groups
    if inner.shape[1] == 1 and inner_groups == middle:  # inner depthwise: scales the outer's inputs
        return scale_conv_input(outer, outer_groups, inner.reshape(-1)), outer_groups
    if outer_groups != inner_groups:
        return None
    out_per_group, mid_per_group = outer.shape[0] // outer_groups, middle // inner_groups
    result = np.empty((outer.shape[0], inner.shape[1]) + outer.shape[2:])
    for g in range(outer_groups):
        rows, mids = slice(g * out_per_group, (g + 1) * out_per_group), slice(g * mid_per_group, (g + 1) * mid_per_group)
        result[rows] = np.einsum("om...,mc->oc...", outer[rows], inner[mids])
    return result, outer_groups


def pointwise_after(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Kernel of outer(inner(x)) where ``outer`` is a 1x..x1 conv and both have one group:
    W[o, c, ...] = sum_m outer[o, m] * inner[m, c, ...]."""
    outer = np.asarray(outer, np.float64).reshape(outer.shape[:2])
    return np.einsum("om,mc...->oc...", outer, np.asarray(inner, np.float64))


def scale_conv_input(weight: np.ndarray, groups: int, scale: np.ndarray) -> np.ndarray:
    """The (grouped) conv weight that reads x * scale (one scale per input channel) from x, in
    float64: each kernel column times the scale of the input channel it reads."""
    in_index = input_channels(weight.shape[0], weight.shape[1], groups)
    return np.asarray(weight, np.float64) * np.asarray(scale, np.float64)[in_index].reshape(
        in_index.shape + (1,) * (weight.ndim - 2))


def input_shift_bias(weight: np.ndarray, groups: int, shift: np.ndarray) -> np.ndarray:
    """What conv(x + shift) adds to conv(x) when no tap reads padding: per output channel, the
    kernel's taps summed against the shift of the input channel each reads."""
    in_index = input_channels(weight.shape[0], weight.shape[1], groups)
    tap_sums = np.asarray(weight, np.float64).reshape(weight.shape[:2] + (-1,)).sum(axis=2)
    return (tap_sums * np.asarray(shift, np.float64)[in_index]).sum(axis=1)


def input_channels(out_channels: int, in_per_group: int, groups: int) -> np.ndarray:
    """For each (output channel, column) of a grouped kernel, the input channel it reads."""
    group_of_row = np.arange(out_channels) // (out_channels // groups)
    return group_of_row[:, None] * in_per_group + np.arange(in_per_group)[None, :]


def dilate_kernel(weight: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """The kernel with ``factor - 1`` zeros between taps on each spatial axis: a conv with dilation
    d * factor equals one with dilation d and this kernel (UniRepLKNet's dilated branches)."""
    spatial = weight.shape[2:]
    result = np.zeros(weight.shape[:2] + tuple((k - 1) * f + 1 for k, f in zip(spatial, factors)))
    result[(slice(None), slice(None)) + tuple(slice(None, None, f) for f in factors)] = weight
    return result


def conv_as_matrix(weight: np.ndarray, spatial: tuple[int, ...], strides: tuple[int, ...],
                   pads: tuple[int, ...], dilations: tuple[int, ...], row_scale: np.ndarray | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
    """The matrix M with conv(x).ravel() == M @ x.ravel() for one sample x of shape (C, *spatial)
    (one group: ``weight`` is (O, C, *k)): RepMLP's conv applied to the identity basis, built tap by
    tap. Rows are (O, *out) and columns (C, *spatial) in C order. Row i is multiplied by
    ``row_scale[i]``; with ``out`` (a view of a larger matrix) M is added into it, in place."""
    out_channels, in_channels, *kernel = weight.shape
    n = len(spatial)
    sizes = tuple(conv_output_length(spatial[a], kernel[a], pads[a], pads[a + n], strides[a], dilations[a])
                  for a in range(n))
    rows_count, cols_count = out_channels * int(np.prod(sizes)), in_channels * int(np.prod(spatial))
    scale = np.ones(rows_count) if row_scale is None else np.asarray(row_scale, np.float64)
    if all(s == 1 for s in spatial) and all(k == 1 for k in kernel) and not any(pads):  # an FC as a 1x1 conv
        return scaled_rows(weight.reshape(out_channels, in_channels), scale, out)
    if out is None:
        out = np.zeros((rows_count, cols_count))
    # In the (O, *out, C, *spatial) layout (a view of ``out``, never a copy) the entries of one tap
    # lie on a diagonal of each (output, input) axis pair, input = output * stride + shift: one
    # strided view per tap, added to in place (no entry appears twice in it).
    grid = np.reshape(out, (out_channels,) + sizes + (in_channels,) + tuple(spatial), copy=False)
    scale = scale.reshape((out_channels,) + sizes)
    weight = np.asarray(weight, np.float64)
    steps = grid.strides
    for taps in itertools.product(*(range(k) for k in kernel)):
        first_out, first_in, lengths, diagonal = [], [], [], []
        for a in range(n):
            shift = taps[a] * dilations[a] - pads[a]
            low = max(0, -(shift // strides[a]))
            high = min(sizes[a] - 1, (spatial[a] - 1 - shift) // strides[a])
            first_out.append(low)
            first_in.append(low * strides[a] + shift)
            lengths.append(high - low + 1)
            diagonal.append(steps[1 + a] + strides[a] * steps[2 + n + a])
        if any(k <= 0 for k in lengths):
            continue  # the tap only ever meets padding
        corner = grid[(slice(None),) + tuple(first_out) + (slice(None),) + tuple(first_in)]
        view = np.lib.stride_tricks.as_strided(corner, (out_channels, *lengths, in_channels),
                                               (steps[0], *diagonal, steps[1 + n]), writeable=True)
        tap = weight[(slice(None), slice(None)) + taps].reshape((out_channels,) + (1,) * n + (in_channels,))
        rows = scale[(slice(None),) + tuple(slice(o, o + k) for o, k in zip(first_out, lengths))]
        view += tap * rows[..., None]
    return out


def scaled_rows(matrix: np.ndarray, scale: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``matrix`` with row i multiplied by ``scale[i]``, in float64; added into ``out`` when given
    (a few rows at a time: a temporary as large as the matrix would be fresh memory, page by page)."""
    scale = np.asarray(scale, np.float64)[:, None]
    if out is None:
        return np.multiply(matrix, scale, dtype=np.float64)
    step = max(1, (1 << 20) // max(matrix.shape[1], 1))  # rows of about 8 MB in float64
    for start in range(0, matrix.shape[0], step):
        rows = slice(start, start + step)
        out[rows] += np.multiply(matrix[rows], scale[rows], dtype=np.float64)
    return out


def add_embedded(target: np.ndarray, weight: np.ndarray, offsets: tuple[int, ...], factor: float) -> None:
    """target += factor * weight, with ``weight`` zero-padded so that it sits at ``offsets`` (in
    taps) on the spatial axes of ``target``. Accumulates in place: no padded copy is made."""
    window = (slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(offsets, weight.shape[2:]))
    if factor == 1:
        target[window] += weight
    else:
        target[window] += factor * np.asarray(weight, np.float64)


def conv_output_length(length: int, kernel: int, pad_begin: int, pad_end: int, stride: int,
                       dilation: int) -> int:
    return (length + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True)
class AxisBranch:
    """One branch on one spatial axis: kernel taps and the pads it reads with."""
    kernel: int
    pad_begin: int
    pad_end: int


@dataclass(frozen=True)
class AxisPlan:
    """The merged conv on one axis, and where each branch's taps start inside it."""
    kernel: int
    pad_begin: int
    pad_end: int
    offsets: tuple[int, ...]


def plan_axis(branches: list[AxisBranch], stride: int, dilation: int,
              length: int | None) -> AxisPlan:
    """Finds one kernel size and padding that holds every branch on this axis; raises Refused
    where there is none.

    Branch i reads input position o*stride - pb_i + j*dilation; the merged conv reads
    o*stride - PB + j*dilation, so branch i sits at tap offset (PB - pb_i) / dilation. The merged
    end pad must give the same output length as the branches: either every branch implies the same
    PE (PE - pe_i = (K - k_i - offset_i) * dilation), or the input length is known and the lengths
    are checked directly.
    """
    pad_begin = max(b.pad_begin for b in branches)
    offsets = []
    for b in branches:
        gap = pad_begin - b.pad_begin
        if gap % dilation:
            raise Refused(f"begin pads {b.pad_begin} and {pad_begin} differ by a non-multiple of dilation {dilation}")
        offsets.append(gap // dilation)
    kernel = max(o + b.kernel for o, b in zip(offsets, branches))
    implied_ends = {b.pad_end + (kernel - b.kernel - o) * dilation for o, b in zip(offsets, branches)}
    if len(implied_ends) == 1:
        return AxisPlan(kernel, pad_begin, implied_ends.pop(), tuple(offsets))
    if length is None:
        raise Refused(f"end pads {sorted(implied_ends)} disagree and the input length is unknown")
    lengths = {conv_output_length(length, b.kernel, b.pad_begin, b.pad_end, stride, dilation)
               for b in branches}
    if len(lengths) != 1:
        raise Refused(f"branches give output lengths {sorted(lengths)}")
    target = lengths.pop()
    for pad_end in sorted(implied_ends):
        if conv_output_length(length, kernel, pad_begin, pad_end, stride, dilation) == target:
            return AxisPlan(kernel, pad_begin, pad_end, tuple(offsets))
    raise Refused(f"no end pad in {sorted(implied_ends)} gives output length {target}")


def same_pads(length: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    """Explicit (begin, end) pads of ONNX auto_pad SAME_UPPER / SAME_LOWER."""
    total = max((-(-length // stride) - 1) * stride + (kernel - 1) * dilation + 1 - length, 0)
    small, large = total // 2, total - total // 2
    return (small, large) if upper else (large, small)
