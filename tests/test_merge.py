"""Properties of the state merge (numpy reference) and agreement of the torch and TIR merges with it."""

import itertools

import numpy as np
import pytest
import torch
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lean_tvm.merge import merge_many_reference, merge_states, merge_states_reference

NINF = float("-inf")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (rtol, atol relative to max|o|): output rounding to the dtype plus fp32 arithmetic.
O_TOL = {"float32": (1e-5, 1e-5), "float16": (1e-3, 1e-3), "bfloat16": (8e-3, 8e-3)}
KERNEL_D = 16

lse_values = st.one_of(st.floats(-40, 40), st.just(NINF))  # -inf: an empty part
o_values = st.floats(-10, 10)


@st.composite
def stacked_states(draw, count=None, batch_shape=None):
    """count states over one batch shape: o [count, *batch, D], lse [count, *batch]."""
    count = count or draw(st.integers(1, 6))
    batch_shape = batch_shape or draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    d = draw(st.integers(1, 8))
    lse = draw(arrays(np.float64, (count, *batch_shape), elements=lse_values))
    o = draw(arrays(np.float64, (count, *batch_shape, d), elements=o_values))
    return o, lse


def with_garbage(o, lse):
    """An empty part's o is arbitrary: make it NaN so any use of it shows."""
    return np.where(np.isneginf(lse)[..., None], np.nan, o)


def assert_states_close(a, b, rtol=1e-9, atol=1e-12):
    np.testing.assert_allclose(a[0], b[0], rtol=rtol, atol=atol)
    np.testing.assert_allclose(a[1], b[1], rtol=rtol, atol=atol)


def softmax_state(scores, values):
    """Direct softmax over one list of logits: (o [D], lse); no rows -> (0, -inf)."""
    if len(scores) == 0:
        return np.zeros(values.shape[1]), NINF
    m = scores.max()
    e = np.exp(scores - m)
    return e @ values / e.sum(), m + np.log(e.sum())


# ---- numpy reference ------------------------------------------------------------------------


@given(stacked_states(count=3))
def test_reference_is_associative(states):
    (o_a, o_b, o_c), (l_a, l_b, l_c) = states
    left = merge_states_reference(*merge_states_reference(o_a, l_a, o_b, l_b), o_c, l_c)
    right = merge_states_reference(o_a, l_a, *merge_states_reference(o_b, l_b, o_c, l_c))
    assert_states_close(left, right)


@given(stacked_states(), st.randoms(use_true_random=False))
def test_reference_is_order_independent(states, rnd):
    o, lse = states
    perm = list(range(len(o)))
    rnd.shuffle(perm)
    assert_states_close(merge_many_reference(o[perm], lse[perm]), merge_many_reference(o, lse))


@given(stacked_states(count=2))
def test_reference_empty_part_is_identity(states):
    (o_a, o_e), (l_a, _) = states
    empty_lse = np.full_like(l_a, NINF)
    o_e = np.full_like(o_e, np.nan)
    for merged in (merge_states_reference(o_a, l_a, o_e, empty_lse), merge_states_reference(o_e, empty_lse, o_a, l_a)):
        live = ~np.isneginf(l_a)
        np.testing.assert_array_equal(merged[1], l_a)
        np.testing.assert_array_equal(merged[0][live], o_a[live])
        np.testing.assert_array_equal(merged[0][~live], 0.0)


def test_reference_all_empty_is_zero_not_nan():
    o, lse = merge_many_reference(np.full((4, 2, 3), np.nan), np.full((4, 2), NINF))
    np.testing.assert_array_equal(o, 0.0)
    assert np.isneginf(lse).all()


@given(st.lists(st.integers(0, 5), min_size=1, max_size=6), st.integers(1, 6), st.data())
def test_reference_equals_softmax_of_concatenation(chunk_lens, d, data):
    n = sum(chunk_lens)
    scores = data.draw(arrays(np.float64, n, elements=st.floats(-50, 50)))
    values = data.draw(arrays(np.float64, (n, d), elements=o_values))
    bounds = np.cumsum([0, *chunk_lens])
    parts = [softmax_state(scores[a:b], values[a:b]) for a, b in itertools.pairwise(bounds)]
    merged = merge_many_reference(np.stack([p[0] for p in parts]), np.array([p[1] for p in parts]))
    assert_states_close(merged, softmax_state(scores, values))


# ---- torch merge_states ---------------------------------------------------------------------


def torch_inputs(o, lse, dtype):
    """Garbage-filled torch states and the float64 numpy states they round to."""
    o_t = torch.from_numpy(with_garbage(o, lse)).to(TORCH_DTYPES[dtype])
    lse_t = torch.from_numpy(lse).float()
    return o_t, lse_t, o_t.double().numpy(), lse_t.double().numpy()


def check_against_reference(o_out, lse_out, o_in, lse_in, dtype):
    ref_o, ref_lse = merge_many_reference(o_in, lse_in)
    rtol, atol = O_TOL[dtype]
    scale = max(1.0, np.nanmax(np.abs(np.where(np.isnan(o_in), 0, o_in))))
    assert not torch.isnan(o_out).any() and not torch.isnan(lse_out).any()
    np.testing.assert_allclose(o_out.double().numpy(), ref_o, rtol=rtol, atol=atol * scale)
    np.testing.assert_allclose(lse_out.double().numpy(), ref_lse, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@given(states=stacked_states())
def test_torch_merge_matches_reference(dtype, states):
    o_t, lse_t, o_in, lse_in = torch_inputs(*states, dtype)
    o_out, lse_out = merge_states(o_t, lse_t)
    assert o_out.dtype == o_t.dtype and lse_out.dtype == torch.float32
    assert o_out.shape == o_t.shape[1:] and lse_out.shape == lse_t.shape[1:]
    check_against_reference(o_out, lse_out, o_in, lse_in, dtype)


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
def test_torch_merge_is_deterministic(dtype):
    gen = torch.Generator().manual_seed(0)
    o = torch.randn(8, 4, 32, 128, generator=gen).to(TORCH_DTYPES[dtype])
    lse = torch.randn(8, 4, 32, generator=gen) * 10
    lse[2, 1] = NINF
    first = merge_states(o, lse)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        second = merge_states(o.clone(), lse.clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ---- TIR kernel (llvm) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def merge_kernels():
    from lean_tvm.compute import make_merge_states

    built = {}
    for dtype in TORCH_DTYPES:
        name = f"merge_states_{dtype}_d{KERNEL_D}"
        built[dtype] = tvm.compile(make_merge_states(dtype, KERNEL_D), target="llvm")[name]
    return built


def run_kernel(kernel, o_t, lse_t):
    o_out = torch.empty(o_t.shape[1:], dtype=o_t.dtype)
    lse_out = torch.empty(lse_t.shape[1:], dtype=torch.float32)
    kernel(o_t, lse_t, o_out, lse_out)
    return o_out, lse_out


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@settings(max_examples=40, deadline=None)
@given(count=st.integers(1, 6), batch=st.integers(1, 3), heads=st.integers(1, 4), data=st.data())
def test_tir_merge_matches_reference(merge_kernels, dtype, count, batch, heads, data):
    lse = data.draw(arrays(np.float64, (count, batch, heads), elements=lse_values))
    o = data.draw(arrays(np.float64, (count, batch, heads, KERNEL_D), elements=o_values))
    o_t, lse_t, o_in, lse_in = torch_inputs(o, lse, dtype)
    check_against_reference(*run_kernel(merge_kernels[dtype], o_t, lse_t), o_in, lse_in, dtype)


def test_tir_merge_empty_parts(merge_kernels):
    o = torch.randn(3, 2, 2, KERNEL_D)
    lse = torch.tensor([[[NINF, NINF], [1.5, NINF]], [[NINF, NINF], [NINF, NINF]], [[NINF, 0.25], [NINF, NINF]]])
    o[torch.isneginf(lse)] = float("nan")
    o_out, lse_out = run_kernel(merge_kernels["float32"], o, lse)
    assert torch.equal(o_out[0, 0], torch.zeros(KERNEL_D)) and lse_out[0, 0] == NINF  # all empty
    assert lse_out[1, 1] == NINF and torch.equal(o_out[1, 1], torch.zeros(KERNEL_D))
    torch.testing.assert_close(o_out[1, 0], o[0, 1, 0], rtol=1e-6, atol=1e-6)  # single live part
    torch.testing.assert_close(o_out[0, 1], o[2, 0, 1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse_out[1, 0], torch.tensor(1.5))
    torch.testing.assert_close(lse_out[0, 1], torch.tensor(0.25))
