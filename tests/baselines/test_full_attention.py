"""The full-attention baselines: einsum (as published) and SDPA compute the same function."""

import torch

from casa_kernels.baselines import FullAttention, ITransformerModel


def test_einsum_matches_explicit_softmax_attention():
    layer = FullAttention(d_model=16, n_heads=4).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    q, k, v = (
        p(x).view(2, 5, 4, 4).transpose(1, 2)
        for p in (layer.query_projection, layer.key_projection, layer.value_projection)
    )
    attn = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = layer.out_projection((attn @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(layer(x), expected)


def test_sdpa_matches_einsum():
    einsum = FullAttention(d_model=32, n_heads=8, implementation="einsum")
    sdpa = FullAttention(d_model=32, n_heads=8, implementation="sdpa")
    sdpa.load_state_dict(einsum.state_dict())
    x = torch.randn(3, 37, 32)
    torch.testing.assert_close(sdpa(x), einsum(x), rtol=1e-5, atol=1e-5)


def test_itransformer_model_shapes_and_implementations_agree():
    kwargs = dict(n_vars=7, d_model=16, seq_len=24, pred_len=6, e_layers=2)
    einsum = ITransformerModel(**kwargs, implementation="einsum")
    sdpa = ITransformerModel(**kwargs, implementation="sdpa")
    sdpa.load_state_dict(einsum.state_dict())
    x = torch.randn(2, 24, 7)
    out = einsum(x)
    assert out.shape == (2, 6, 7)
    torch.testing.assert_close(sdpa(x), out, rtol=1e-5, atol=1e-5)
