"""The module layer: official parameter names, the block and model math, state_dict, gradients."""

import io

import pytest
import torch
import torch.nn.functional as F

from casa_kernels import CASAAttention, CASABlock, CASAModel, ScoreNetwork, reference

ATTENTION_KEYS = [
    "value.weight",
    "value.bias",
    *(f"score.encoder.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")),
    *(f"score.decoder.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")),
]
BLOCK_KEYS = (
    ATTENTION_KEYS
    + [f"mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    + ["norm.weight", "norm.bias"]
)


def official_model_keys(e_layers):
    """The state_dict keys of the official ``Model`` (docs/design.md §3)."""
    keys = ["model.0.weight", "model.0.bias"]
    for i in range(2, e_layers + 2):
        keys += [f"model.{i}.0.{k}" for k in BLOCK_KEYS]
    return keys + [f"model.{e_layers + 2}.weight", f"model.{e_layers + 2}.bias"]


def test_parameter_names_are_the_official_layout():
    assert sorted(CASAAttention(n_vars=3, d_model=8).state_dict()) == sorted(ATTENTION_KEYS)
    assert sorted(CASABlock(n_vars=3, d_model=8).state_dict()) == sorted(BLOCK_KEYS)
    model = CASAModel(n_vars=3, d_model=8, seq_len=12, pred_len=4, e_layers=3)
    assert sorted(model.state_dict()) == sorted(official_model_keys(3))


def test_score_network_module_equals_reference_functional():
    attn = CASAAttention(n_vars=5, d_model=16, kernel=5).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(attn.score(x), reference.score_network(x, attn.weights()))
    assert isinstance(attn.score, ScoreNetwork)


def test_attention_module_equals_reference(problem):
    attn = CASAAttention(n_vars=5, d_model=16, backend="reference").double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    expected = torch.softmax(attn.score(x), dim=1) * attn.value(x) + x
    torch.testing.assert_close(attn(x), expected)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_parametrized_weights_are_used_as_computed(backend):
    # A parametrized weight is no registered parameter: the modules read it as the attribute.
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    block = CASABlock(n_vars=4, d_model=16, backend=backend)
    x = torch.randn(2, 4, 16)
    for module in (block.value, block.score.decoder[4], block.mlp[0]):
        parametrize.register_parametrization(module, "weight", Doubled())
    with torch.no_grad():
        weights = block.weights()
        assert torch.equal(weights.value_weight, 2 * block.value.parametrizations.weight.original)
        computed = {
            "value.weight": block.value.weight,
            "score.decoder.4.weight": block.score.decoder[4].weight,
            "mlp.0.weight": block.mlp[0].weight,
        }
        eager = CASABlock(n_vars=4, d_model=16, backend="reference")
        eager.load_state_dict({**block.state_dict(), **computed}, strict=False)
        torch.testing.assert_close(block(x), eager(x), rtol=2e-5, atol=2e-5)


def test_block_uses_one_layer_norm_twice():
    block = CASABlock(n_vars=4, d_model=16, backend="reference").double()
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    ln = lambda t: F.layer_norm(t, (16,), block.norm.weight, block.norm.bias)  # noqa: E731
    z = ln(reference.score_attention(x, block.weights()))
    expected = ln(block.mlp[2](torch.relu(block.mlp[0](z))) + z)
    torch.testing.assert_close(block(x), expected)


def test_model_normalises_with_unbiased_variance_and_denormalises():
    model = CASAModel(
        n_vars=3, d_model=8, seq_len=12, pred_len=4, e_layers=2, backend="reference"
    ).double()
    x = torch.randn(2, 12, 3, dtype=torch.float64) * 5 + 2
    mean = x.mean(1, keepdim=True)
    std = torch.sqrt(x.var(1, keepdim=True, unbiased=True) + 1e-5)
    h = torch.relu(model.model[0](((x - mean) / std).permute(0, 2, 1)))
    for i in range(2, 4):
        h = torch.relu(model.model[i][0](h))
    expected = model.model[4](h).permute(0, 2, 1) * std + mean
    out = model(x)
    assert out.shape == (2, 4, 3)
    torch.testing.assert_close(out, expected)


def test_model_accepts_the_official_four_argument_call():
    # exp_long_term_forecasting calls model(batch_x, batch_x_mark, dec_inp, batch_y_mark).
    model = CASAModel(n_vars=3, d_model=8, seq_len=12, pred_len=4, e_layers=1, backend="reference")
    x, x_mark = torch.randn(2, 12, 3), torch.randn(2, 12, 4)
    dec_inp, y_mark = torch.randn(2, 10, 3), torch.randn(2, 10, 4)
    expected = model(x)
    assert torch.equal(model(x, x_mark, dec_inp, y_mark), expected)
    assert torch.equal(model(x, x_mark, dec_inp, y_mark, None), expected)
    assert torch.equal(model(x, None, None, None), expected)


def test_state_dict_round_trip_gives_identical_outputs():
    kwargs = dict(n_vars=4, d_model=16, kernel=3, seq_len=24, pred_len=8, e_layers=2)
    src = CASAModel(**kwargs)
    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    dst = CASAModel(**kwargs)
    dst.load_state_dict(torch.load(buffer), strict=True)
    x = torch.randn(2, 24, 4)
    assert torch.equal(src(x), dst(x))


def test_checkpoint_with_official_keys_loads_strictly():
    model = CASAModel(n_vars=3, d_model=8, seq_len=12, pred_len=4, e_layers=1)
    official = {key: torch.randn_like(t) for key, t in model.state_dict().items()}
    assert sorted(official) == sorted(official_model_keys(1))
    model.load_state_dict(official, strict=True)
    assert torch.equal(
        model.model[2][0].score.encoder[0].weight, official["model.2.0.score.encoder.0.weight"]
    )


@pytest.mark.parametrize("kernel", [1, 3])
def test_gradcheck_float64(kernel):
    attn = CASAAttention(n_vars=3, d_model=8, kernel=kernel, backend="reference").double()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, *w: reference.score_attention(x, type(attn.weights())(*w)), (x, *attn.weights())
    )
    block = CASABlock(n_vars=3, d_model=8, kernel=kernel, backend="reference").double()
    assert torch.autograd.gradcheck(block, (x,))


@pytest.mark.parametrize("backend, through_cpu_linear", [("cpu", 2), ("reference", 0)])
def test_model_embedding_and_head_in_bfloat16_go_through_the_cpu_linear(
    monkeypatch, backend, through_cpu_linear
):
    # bfloat16 on the CPU: the forecaster's two Linears take the cpu backend's linear
    # (fp32 GEMMs where the CPU has no bfloat16 ones), except with backend="reference".
    from casa_kernels import modules

    calls = []
    original = modules.cpu_linear
    monkeypatch.setattr(modules, "cpu_linear", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    model = CASAModel(n_vars=5, d_model=16, seq_len=12, pred_len=4, e_layers=1, backend=backend)
    model = model.bfloat16()
    x = torch.randn(2, 12, 5).bfloat16()
    with torch.no_grad():
        out = model(x)
    assert len(calls) == through_cpu_linear
    expected = model.float()(x.float())
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
