"""The weight algebra against direct convolutions in PyTorch (float64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_reparam import algebra

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
    assert "non-channel" in algebra.per_channel(np.ones((3, 2, 1)), 3, -3, 4)
    assert "larger rank" in algebra.per_channel(np.ones((1, 1, 3, 1, 1)), 3, -3, 4)
    assert "channels" in algebra.per_channel(np.ones((4, 1, 1)), 3, -3, 4)


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
    """Whatever the branches, a returned plan computes their sum; a refusal is a string."""
    rng = np.random.default_rng(seed)
    specs = [algebra.AxisBranch(k, p, p) for k, p in branches]
    out_lengths = {algebra.conv_output_length(length, b.kernel, b.pad_begin, b.pad_end, stride, dilation)
                   for b in specs}
    if len(out_lengths) != 1 or min(out_lengths) < 1:
        return
    plan = algebra.plan_axis(specs, stride, dilation, length)
    if isinstance(plan, str):
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
