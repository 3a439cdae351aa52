"""The training recipe against QuEST's formulas (reference section 5a): per-row RMS scales, the centred grid,
the trust mask, block Hadamard in the rotated domain. Test vectors in data/quest_parity.npz follow the
formulas and agree with the public QuEST quantizers (ints to 1e-8, fp4 to 1.2e-6)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from capscale import capacity
from capscale.capacity.structure import fwht
from capscale.trainers.compression_config import Compression
from capscale.trainers.layers import CompressedLinear, compress_with_mask

VECTORS = np.load(Path(__file__).parent / "data" / "quest_parity.npz")
SPECS = {"int1": "int1", "int2": "int2", "int3": "int3", "int4": "int4", "int8": "int8", "fp4": "fp4_e2m1"}
C_B = {1: 0.7978845587, 2: 1.4935346200, 3: 2.0510683541, 4: 2.5139305786, 8: 3.8849386788}


def quest_direct(v: np.ndarray, name: str):
    """Section 5a written out in numpy, float64: (quantized values, gradient mask)."""
    std = np.sqrt((v ** 2).mean(-1, keepdims=True))
    if name == "fp4":
        levels = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6.0])
        levels = np.concatenate([-levels[:0:-1], levels])
        scale = 0.48707976 * std
        xq = levels[np.abs((v / scale)[..., None] - levels).argmin(-1)] * scale
        return xq, np.abs(xq - v) <= 0.48707976 * std
    b = int(name[3:])
    scale = C_B[b] * std
    step = 2 * scale / (2 ** b - 1)
    xq = (np.round(np.clip(v, -scale, scale) / step + 0.5) - 0.5) * step
    return xq, np.abs(xq - v) <= C_B[b] / (2 ** b - 1) * std


@pytest.mark.parametrize("rotation", ["none", "had128"])
@pytest.mark.parametrize("name", list(SPECS))
def test_quantizer_and_trust_mask_match_quest_to_1e6(name, rotation):
    x = torch.tensor(VECTORS["x"])  # 16 x 256, rows 100x apart in scale
    v = fwht(x, 128) if rotation == "had128" else x  # the vectors rotate by x @ blockdiag(H128, H128)
    assert np.allclose(v.numpy(), VECTORS["x"] @ np.kron(np.eye(2), VECTORS["H128"]) if rotation == "had128" else x)
    q, mask = compress_with_mask(v.float(), capacity.parse(SPECS[name]), Compression(SPECS[name]))
    rms = np.sqrt((v.numpy() ** 2).mean(-1, keepdims=True))
    ref_q, ref_mask = VECTORS[f"{name}_{rotation}_xq"], VECTORS[f"{name}_{rotation}_mask"].astype(bool)
    assert (np.abs(q.double().numpy() - ref_q) / rms).max() < 1e-6  # relative to each row's scale
    assert np.array_equal(mask.numpy(), ref_mask)
    direct_q, direct_mask = quest_direct(v.numpy(), name)
    assert np.allclose(direct_q, ref_q, atol=1e-9 * rms.max()) and np.array_equal(direct_mask, ref_mask)


@pytest.mark.parametrize("name", ["int2", "int4", "int8", "fp4"])
@pytest.mark.parametrize("rotate", [True, False])
def test_layer_forward_and_weight_gradient_follow_the_recipe(name, rotate):
    """A W/A layer: forward = Q(x H) Q(W H)^T; dL/dW = (mask_w * dL/dQ(W H)) H, all per section 5a."""
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 256, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, 24, dtype=torch.float64)[:, None]
    x = torch.randn(6, 256, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, 6, dtype=torch.float64)[:, None]
    layer = CompressedLinear(256, 24, Compression(spec, spec, rotate=rotate))
    assert layer.hadamard_block == (128 if rotate else 0)
    layer.weight.data = weight.float()
    inputs = x.float().requires_grad_(True)
    y = layer(inputs)
    grad_y = torch.randn(y.shape, generator=gen)
    y.backward(grad_y)

    H = np.kron(np.eye(2), VECTORS["H128"]) if rotate else np.eye(256)
    wq, wmask = quest_direct(weight.numpy() @ H, name)
    xq, xmask = quest_direct(x.numpy() @ H, name)
    scale = np.abs(xq).max() * np.abs(wq).max() * 256
    assert np.abs(y.detach().double().numpy() - xq @ wq.T).max() / scale < 1e-6
    grad_w = ((grad_y.double().numpy().T @ xq) * wmask) @ H.T
    grad_x = ((grad_y.double().numpy() @ wq) * xmask) @ H.T
    assert np.abs(layer.weight.grad.double().numpy() - grad_w).max() / np.abs(grad_w).max() < 1e-5
    assert np.abs(inputs.grad.double().numpy() - grad_x).max() / np.abs(grad_x).max() < 1e-5


def test_rows_100x_apart_each_get_the_gaussian_error_per_row_but_not_per_tensor():
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.01, 0.1, 1.0, 100.0]).repeat_interleave(8)[:, None]  # 8 rows at each scale
    weight = torch.randn(32, 4096, generator=gen) * scales
    gaussian = capacity.gmse("int4", exact=True).gmse

    def relative_mse_per_scale(spec):
        q = capacity.parse(spec)(weight)
        return (((q - weight) ** 2).mean(-1) / (weight ** 2).mean(-1)).reshape(4, 8).mean(-1)

    per_row = relative_mse_per_scale("int4")
    assert torch.allclose(per_row, torch.full_like(per_row, gaussian), rtol=0.05)
    per_tensor = relative_mse_per_scale("int4(group=tensor)")
    assert per_tensor[:3].min() > 10 * gaussian  # all but the largest rows round to the innermost levels


def test_gmse_on_the_models_row_length():
    """Per-row scales take each row's own RMS: on short rows it follows the sample (and its largest values),
    which lowers the error. GMSE is measured at the model's real row length on request."""
    long_rows = capacity.gmse("int4", samples=1 << 20)
    short_rows = capacity.gmse("int4", samples=1 << 20, row_length=32)
    assert long_rows.shape == (64, 1024) and short_rows.shape[-1] == 32
    assert long_rows.gmse == pytest.approx(0.01151, rel=0.01)  # section 5a: per-row RMS rule on the Gaussian
    assert short_rows.gmse < long_rows.gmse - 10 * (short_rows.stderr + long_rows.stderr)


def test_rotation_under_bf16_autocast_is_exact_to_float32():
    from capscale.capacity.structure import hadamard_matrix
    from capscale.trainers.layers import rotate
    x = torch.randn(64, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = rotate(x, hadamard_matrix(128))
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, fwht(x.double(), 128).float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["int2", "int4", "fp4"])
def test_a_weight_only_layer_leaves_the_activation_unrotated_as_quest_does(name):
    """QuEST's weight-only runs (a_quant NoQuantizer, which returns its input as it is) compute y = x Q(W H)^T: the
    weight rotated and quantized, the activation NOT rotated (reference section 5b). `both` keeps capscale 0.2's
    (x H) Q(W H)^T, which the shipped CPU studies were trained with."""
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(24, 256, generator=gen, dtype=torch.float64)
    x = torch.randn(6, 256, generator=gen, dtype=torch.float64)
    H = np.kron(np.eye(2), VECTORS["H128"])
    wq, _ = quest_direct(weight.numpy() @ H, name)
    for setting, expected in (("weight", x.numpy() @ wq.T), ("both", (x.numpy() @ H) @ wq.T)):
        layer = CompressedLinear(256, 24, Compression(spec, None, weight_only_rotation=setting))
        layer.weight.data = weight.float()
        y = layer(x.float()).detach().double().numpy()
        assert np.abs(y - expected).max() / np.abs(expected).max() < 1e-5, setting
    assert Compression(spec).weight_only_rotation == "weight"  # QuEST's, the default for new runs


def test_quests_data_order_and_step_rounding():
    """Windows drawn without replacement per epoch, shuffled by a data seed apart from the model's; TOKENS //
    tokens-per-step steps and a warm-up of ITERATIONS // 10 steps (QuEST's train.sh and src/data/utils.py)."""
    from capscale.trainers.config import TrainConfig
    from capscale.trainers.data import epoch_batch
    from capscale.trainers.train import _lr_at
    tokens = np.arange(1001)  # each token its own position
    drawn = [int(x[0]) for step in range(10) for x in epoch_batch(tokens, 10, 10, step, 1337)[0]]
    assert sorted(drawn) == list(range(0, 1000, 10))  # one epoch of 100 windows: each exactly once
    assert torch.equal(epoch_batch(tokens, 10, 10, 12, 1337)[0], epoch_batch(tokens, 10, 10, 12, 1337)[0])
    assert not torch.equal(epoch_batch(tokens, 10, 10, 12, 1337)[0], epoch_batch(tokens, 10, 10, 12, 7)[0])
    quest = TrainConfig(tokens=3_000_000_000, context=512, batch_size=512, step_rounding="quest")
    assert quest.steps() == 11_444  # the 30M model's 3B tokens, as QuEST's runs record
    lr = [_lr_at(s, 11_444, 1.0, 0.1, "onecycle", whole=True) for s in (1142, 1143)]
    assert lr[0] < 1.0 and lr[1] == pytest.approx(1.0)  # the peak after ITERATIONS // 10 = 1,144 warm-up steps
    assert TrainConfig().key() == TrainConfig(sampling="random", step_rounding="ceil").key()  # old runs keep keys
