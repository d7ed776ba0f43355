"""The reference path against independent arithmetic: explicit loops over taps in numpy."""

import numpy as np
import pytest
import torch

from casa_kernels import reference
from casa_kernels.weights import ScoreAttentionWeights


def conv_stride2(x, w, b):
    """Conv1d, stride 2, padding k//2, written as loops: x [C, L], w [O, C, k] -> [O, L/2]."""
    _, length = x.shape
    out_ch, _, k = w.shape
    p = k // 2
    out = np.tile(b[:, None], (1, length // 2)).astype(np.float64)
    for t in range(length // 2):
        for j in range(k):
            pos = 2 * t + j - p
            if 0 <= pos < length:
                out[:, t] += w[:, :, j] @ x[:, pos]
    return out


def conv_transpose_stride2(x, w, b):
    """ConvTranspose1d, stride 2, padding k//2, output_padding 1: x [C, L], w [C, O, k] -> [O, 2L]."""
    _, length = x.shape
    _, out_ch, k = w.shape
    p = k // 2
    out = np.tile(b[:, None], (1, 2 * length)).astype(np.float64)
    for i in range(length):
        for j in range(k):
            o = 2 * i - p + j
            if 0 <= o < 2 * length:
                out[:, o] += w[:, :, j].T @ x[:, i]
    return out


def naive_attention(x, w):
    """docs/design.md §2 for one batch element x [N, D], all in float64 numpy."""
    W = {name: t.detach().double().numpy() for name, t in zip(w._fields, w)}
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    h = relu(conv_stride2(x, W["enc0_weight"], W["enc0_bias"]))
    h = relu(conv_stride2(h, W["enc1_weight"], W["enc1_bias"]))
    h = relu(conv_stride2(h, W["enc2_weight"], W["enc2_bias"]))
    h = relu(conv_transpose_stride2(h, W["dec0_weight"], W["dec0_bias"]))
    h = relu(conv_transpose_stride2(h, W["dec1_weight"], W["dec1_bias"]))
    h = 1 / (1 + np.exp(-conv_transpose_stride2(h, W["dec2_weight"], W["dec2_bias"])))
    score = h + x
    e = np.exp(score - score.max(axis=0, keepdims=True))
    soft = e / e.sum(axis=0, keepdims=True)
    return soft * (x @ W["value_weight"].T + W["value_bias"]) + x


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
@pytest.mark.parametrize("n_vars,d_model", [(1, 8), (3, 16), (5, 24)])
def test_reference_matches_loops(problem, kernel, n_vars, d_model):
    x, w = problem(2, n_vars, d_model, kernel, dtype=torch.float64)
    got = reference.score_attention(x, w)
    for b in range(2):
        np.testing.assert_allclose(
            got[b].numpy(), naive_attention(x[b].numpy(), w), rtol=1e-10, atol=1e-12
        )


def test_softmax_sums_to_one_over_variates(problem):
    x, w = problem(3, 6, 16, 3, dtype=torch.float64)
    weights = torch.softmax(reference.score_network(x, w), dim=1)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3, 16, dtype=torch.float64))


def test_zero_value_projection_leaves_only_the_skip(problem):
    x, w = problem(2, 4, 16, 3)
    w = w._replace(
        value_weight=torch.zeros_like(w.value_weight), value_bias=torch.zeros_like(w.value_bias)
    )
    assert torch.equal(reference.score_attention(x, w), x)


def test_value_projection_of_one_variate_passes_whole(problem):
    # With N = 1 the softmax over variates is exactly 1: y = x Wvᵀ + bv + x.
    x, w = problem(2, 1, 8, 3, dtype=torch.float64)
    expected = x @ w.value_weight.T + w.value_bias + x
    torch.testing.assert_close(reference.score_attention(x, w), expected)


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_lengths_through_the_autoencoder(problem, kernel):
    from casa_kernels import ScoreNetwork

    net = ScoreNetwork(n_vars=3, d_model=32, kernel=kernel)
    lengths = []
    for layer in [*net.encoder, *net.decoder]:
        layer.register_forward_hook(lambda m, i, o: lengths.append(o.shape[-1]))
    out = net(torch.randn(2, 3, 32))
    assert out.shape == (2, 3, 32)
    assert lengths == [16, 16, 8, 8, 4, 4, 8, 8, 16, 16, 32, 32]


def test_random_weights_have_the_documented_shapes():
    w = ScoreAttentionWeights.random(5, 16, 3)
    assert (w.n_vars, w.d_model, w.kernel) == (5, 16, 3)
    assert w.enc0_weight.shape == (4, 5, 3) and w.dec2_weight.shape == (4, 5, 3)
    assert w.enc2_weight.shape == (16, 8, 3) and w.dec0_weight.shape == (16, 8, 3)
