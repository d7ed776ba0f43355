"""The drop-in for the paper's harness (casa_kernels/official.py), built from a namespace
like the one the official run.py's argparse gives."""

import argparse
import copy

import pytest
import torch

import casa_kernels as ck
from casa_kernels import official


def _run_py_args(**overrides) -> argparse.Namespace:
    # The official run.py's arguments (Traffic script values, sizes cut down for a test).
    args = dict(
        task_name="long_term_forecast",
        is_training=1,
        model_id="traffic_24_12",
        model="CASA",
        data="custom",
        root_path="./dataset/traffic/",
        data_path="traffic.csv",
        features="M",
        target="OT",
        freq="h",
        checkpoints="./checkpoints/",
        seq_len=24,
        label_len=12,
        pred_len=12,
        seasonal_patterns="Monthly",
        enc_in=9,
        dec_in=9,
        c_out=9,
        d_model=16,
        d_core=16,
        e_layers=2,
        d_layers=1,
        d_ff=64,
        moving_avg=25,
        factor=1,
        distil=True,
        dropout=0.0,
        embed="timeF",
        activation="gelu",
        output_attention=False,
        attention_type="full",
        use_norm=True,
        use_denoise=False,
        kernel=3,
        num_workers=0,
        itr=1,
        train_epochs=1,
        batch_size=4,
        patience=3,
        learning_rate=1e-3,
        des="test",
        loss="MSE",
        lradj="type1",
        use_amp=False,
        use_gpu=False,
        gpu=0,
        use_multi_gpu=False,
        devices="0",
        save_model=False,
    )
    args.update(overrides)
    return argparse.Namespace(**args)


def _batch(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(args.batch_size, args.seq_len, args.enc_in, generator=g)
    y = torch.randn(args.batch_size, args.pred_len, args.enc_in, generator=g)
    marks = torch.randn(args.batch_size, args.seq_len, 4, generator=g)
    dec = torch.zeros(args.batch_size, args.label_len + args.pred_len, args.enc_in)
    return x, marks, dec, y


def test_model_from_run_py_arguments_is_the_official_model():
    args = _run_py_args()
    torch.manual_seed(0)
    model = official.Model(args)
    assert (model.seq_len, model.pred_len, model.enc_in, model.d_model) == (24, 12, 9, 16)
    twin = ck.CASAModel(
        n_vars=9, d_model=16, kernel=3, seq_len=24, pred_len=12, e_layers=2, backend="reference"
    )
    twin.load_state_dict(model.state_dict(), strict=True)  # official keys both ways
    model.load_state_dict(twin.state_dict(), strict=True)
    assert "model.2.0.score.encoder.0.weight" in model.state_dict()
    x, marks, dec, _ = _batch(args)
    with torch.no_grad():
        out = model(x, marks, dec, marks)  # the official call
        torch.testing.assert_close(out, twin(x), rtol=1e-4, atol=1e-5)
    assert out.shape == (args.batch_size, args.pred_len, args.enc_in)


def test_training_like_the_harness_matches_the_reference_backend():
    # The official loop: MSE on the forecast, Adam, a few steps; the fused backend and the
    # reference end with the same weights.
    args = _run_py_args(backend="cpu")
    torch.manual_seed(0)
    model = official.Model(args)
    twin = copy.deepcopy(model)
    for block in twin.model[2:-1]:
        block[0].backend = "reference"
    opts = [torch.optim.Adam(m.parameters(), lr=args.learning_rate) for m in (model, twin)]
    for step in range(3):
        x, marks, dec, y = _batch(args, seed=step)
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x, marks, dec, marks), y)
            loss.backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_checkpoint_saved_by_the_drop_in_loads_into_the_drop_in(tmp_path):
    args = _run_py_args()
    model = official.Model(args)
    torch.save(model.state_dict(), tmp_path / "checkpoint.pth")
    again = official.Model(args)
    again.load_state_dict(torch.load(tmp_path / "checkpoint.pth"), strict=True)
    x, marks, dec, _ = _batch(args)
    with torch.no_grad():
        assert torch.equal(again(x, marks, dec, marks), model(x, marks, dec, marks))


def test_kernel_and_backend_default_and_missing_fields_are_named():
    args = _run_py_args()
    del args.kernel
    assert official.Model(args).model[2][0].kernel == 3
    assert official.Model(args).model[2][0].backend == "auto"
    del args.enc_in
    with pytest.raises(AttributeError, match=r"configs: expected a field 'enc_in'.*--enc_in"):
        official.Model(args)
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        official.Model(_run_py_args(backend="fused"))


def test_official_layer_classes_take_the_official_arguments():
    block = official.MLP_attention(16, 9, 3)
    assert (block.n_vars, block.d_model, block.kernel) == (9, 16, 3)
    assert set(block.state_dict()) == set(ck.CASABlock(n_vars=9, d_model=16).state_dict())
    score = official.ScoreNetwork(9, 16)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        assert score(x).shape == x.shape
