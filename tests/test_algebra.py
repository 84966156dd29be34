"""The weight algebra against direct convolutions in PyTorch (float64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_reparam import algebra
from onnx_reparam.errors import Refused

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick

F = torch.nn.functional


def conv(x, w, groups=1, stride=1, padding=0, dilation=1):
    return F.conv2d(torch.from_numpy(x), torch.from_numpy(w), None, stride, padding, dilation, groups).numpy()


def test_bn_affine_matches_batchnorm():
    rng = np.random.default_rng(0)
    gamma, beta, mean = rng.standard_normal((3, 5))
    var = rng.uniform(0.5, 2, 5)
    x = rng.standard_normal((2, 5, 3, 3))
    scale, shift = algebra.bn_affine(gamma, beta, mean, var, 1e-3)
    expected = F.batch_norm(torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(var),
                            torch.from_numpy(gamma), torch.from_numpy(beta), eps=1e-3).numpy()
    np.testing.assert_allclose(x * scale[:, None, None] + shift[:, None, None], expected, rtol=1e-12)


@given(st.sampled_from([(8, 4, 2), (8, 8, 1), (8, 8, 4), (12, 6, 3), (6, 6, 6)]), st.integers(0, 10**6))
@settings(max_examples=30, deadline=None)
def test_regroup_kernel_computes_the_same_conv(groups_pair, seed):
    c, groups, new_groups = groups_pair
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c, c // groups, 3, 3))
    x = rng.standard_normal((1, c, 5, 5))
    regrouped = algebra.regroup_kernel(w, groups, new_groups)
    np.testing.assert_allclose(conv(x, regrouped, new_groups), conv(x, w, groups), atol=1e-10)


def test_regroup_refuses_a_non_divisor():
    with pytest.raises(ValueError):
        algebra.regroup_kernel(np.zeros((6, 2, 1, 1)), 3, 2)


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_diagonal_kernel_scales_each_channel(groups):
    rng = np.random.default_rng(1)
    scale = rng.standard_normal(6)
    x = rng.standard_normal((2, 6, 4, 4))
    out = conv(x, algebra.diagonal_kernel(scale, groups, 2), groups)
    np.testing.assert_allclose(out, x * scale[None, :, None, None], atol=1e-12)


def test_embedded_kernel_with_offsets_equals_the_small_conv():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 3, 1, 3))  # a 1x3 kernel with pads (0, 1)
    x = rng.standard_normal((1, 3, 6, 6))
    big = np.zeros((3, 3, 3, 3))
    algebra.add_embedded(big, w, (1, 0), 1.0)
    np.testing.assert_allclose(conv(x, big, padding=1), conv(x, w, padding=(0, 1)), atol=1e-12)


def test_per_channel_broadcast_rules():
    assert np.array_equal(algebra.per_channel(np.full((1, 3, 1, 1), 2.0), 3, -3, 4), [2, 2, 2])
    assert np.array_equal(algebra.per_channel(np.array(5.0), 3, -3, 4), [5, 5, 5])
    for shape, reason in (((3, 2, 1), "non-channel"), ((1, 1, 3, 1, 1), "larger rank"), ((4, 1, 1), "channels")):
        with pytest.raises(Refused, match=reason):
            algebra.per_channel(np.ones(shape), 3, -3, 4)


@pytest.mark.parametrize("length,kernel,stride,dilation", [(7, 3, 1, 1), (8, 3, 2, 1), (9, 3, 2, 2), (5, 4, 3, 1)])
@pytest.mark.parametrize("upper", [True, False])
def test_same_pads_keep_ceil_length(length, kernel, stride, dilation, upper):
    begin, end = algebra.same_pads(length, kernel, stride, dilation, upper)
    assert algebra.conv_output_length(length, kernel, begin, end, stride, dilation) == -(-length // stride)
    assert abs(begin - end) <= 1 and (begin <= end) == upper or begin == end


@given(st.lists(st.tuples(st.sampled_from([1, 3, 5]), st.integers(0, 3)), min_size=1, max_size=4),
       st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.integers(6, 12), st.integers(0, 10**6))
@settings(max_examples=80, deadline=None)
def test_plan_axis_is_exact_or_refuses(branches, stride, dilation, length, seed):
    """Whatever the branches, a returned plan computes their sum; else it raises Refused."""
    rng = np.random.default_rng(seed)
    specs = [algebra.AxisBranch(k, p, p) for k, p in branches]
    out_lengths = {algebra.conv_output_length(length, b.kernel, b.pad_begin, b.pad_end, stride, dilation)
                   for b in specs}
    if len(out_lengths) != 1 or min(out_lengths) < 1:
        return
    try:
        plan = algebra.plan_axis(specs, stride, dilation, length)
    except Refused:
        return
    x = rng.standard_normal((1, 1, 1, length))
    total, merged = 0, np.zeros((1, 1, 1, plan.kernel))
    for spec, offset in zip(specs, plan.offsets):
        w = rng.standard_normal((1, 1, 1, spec.kernel))
        padded = np.pad(x, [(0, 0)] * 3 + [(spec.pad_begin, spec.pad_end)])
        total = total + conv(padded, w, stride=(1, stride), dilation=(1, dilation))
        algebra.add_embedded(merged, w, (0, offset), 1.0)
    padded = np.pad(x, [(0, 0)] * 3 + [(plan.pad_begin, plan.pad_end)])
    np.testing.assert_allclose(conv(padded, merged, stride=(1, stride), dilation=(1, dilation)), total,
                               atol=1e-10)


@pytest.mark.parametrize("kernel,stride,pads,dilation", [
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), ((5, 3), (2, 1), (2, 0, 1, 1), (1, 2)), ((1, 1), (1, 1), (0,) * 4, (1, 1)),
    ((3, 1), (1, 2), (0, 0, 2, 0), (2, 1))])
def test_conv_as_matrix_is_the_conv(kernel, stride, pads, dilation):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2) + kernel)
    x = rng.standard_normal((1, 2, 6, 5))
    matrix = algebra.conv_as_matrix(w, (6, 5), stride, pads, dilation)
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    expected = conv(padded, w, stride=stride, dilation=dilation)
    np.testing.assert_allclose(matrix @ x.ravel(), expected.ravel(), atol=1e-12)
    # Row-scaled and added into a block of a larger matrix, in place.
    scale = rng.standard_normal(matrix.shape[0])
    larger = np.ones((matrix.shape[0] + 3, matrix.shape[1] + 5))
    block = larger[1:1 + matrix.shape[0], 2:2 + matrix.shape[1]]
    assert algebra.conv_as_matrix(w, (6, 5), stride, pads, dilation, scale, block) is block
    np.testing.assert_allclose(block, 1 + scale[:, None] * matrix, atol=1e-12)
    assert larger[0].sum() == larger.shape[1] and larger[:, :2].sum() == 2 * larger.shape[0]


@pytest.mark.parametrize("c_in,mid,c_out,inner_groups,outer_groups,composes", [
    (4, 4, 6, 1, 1, True), (4, 8, 6, 2, 2, True), (4, 8, 8, 4, 8, True),  # outer depthwise
    (6, 6, 4, 6, 2, True),  # inner depthwise (a BN): scales the outer's inputs
    (4, 8, 8, 2, 4, False)])
def test_compose_pointwise_is_the_sequence(c_in, mid, c_out, inner_groups, outer_groups, composes):
    rng = np.random.default_rng(1)
    inner = rng.standard_normal((mid, c_in // inner_groups, 1, 1))
    outer = rng.standard_normal((c_out, mid // outer_groups, 3, 3))
    result = algebra.compose_pointwise(outer, outer_groups, inner, inner_groups)
    if not composes:
        assert result is None
        return
    weight, groups = result
    x = rng.standard_normal((1, c_in, 6, 6))
    expected = conv(conv(x, inner, inner_groups), outer, outer_groups)
    np.testing.assert_allclose(conv(x, weight, groups), expected, atol=1e-10)


def test_input_shift_bias_is_what_a_shift_adds():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 2, 3, 3))
    shift = rng.standard_normal(4)
    x = rng.standard_normal((1, 4, 5, 5))
    delta = conv(x + shift[None, :, None, None], w, 2) - conv(x, w, 2)
    np.testing.assert_allclose(delta[0, :, 1, 1], algebra.input_shift_bias(w, 2, shift), atol=1e-10)


def test_dilate_kernel_moves_the_dilation_into_the_taps():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 2, 3, 2))
    x = rng.standard_normal((1, 2, 11, 11))
    dense = algebra.dilate_kernel(w, (3, 2))
    np.testing.assert_allclose(conv(x, dense, dilation=(1, 2)), conv(x, w, dilation=(3, 4)), atol=1e-10)

