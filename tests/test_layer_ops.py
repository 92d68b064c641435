"""The decoder layer's elementwise ops (torch.ops.openlora.{rms_norm, add_rms_norm, silu_mul, rotary})
against their pure-PyTorch references, which are Hugging Face's eager code.

bf16 must match bit for bit where the op is elementwise (the C++ rounds where eager PyTorch rounds),
and within two bf16 ulps for the norms (their fp32 sums run in another order, which can move a value
across a rounding boundary); fp32 within a few fp32 ulps. Each check runs on CPU, and on CUDA (the references) where a
GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from services.executor import ops
from services.executor.ops import add_rms_norm_ref, rms_norm_ref, rotary_ref, silu_mul_ref

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float32, torch.bfloat16]


def assert_matches(got, want, exact_bf16=True):
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.bfloat16 and not exact_bf16:
        torch.testing.assert_close(got, want, rtol=2 ** -6, atol=1e-6)  # a flip before w's product
    elif got.dtype == torch.bfloat16:
        assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} differ"
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def randn(*shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype)


def _check_norms(device, dtype, rows, n):
    x = randn(rows, n, dtype=dtype, device=device, seed=1, scale=3.0)
    res = randn(rows, n, dtype=dtype, device=device, seed=2)
    w = randn(n, dtype=dtype, device=device, seed=3) + 1
    assert_matches(ops.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), exact_bf16=False)
    (y, h), (y_ref, h_ref) = ops.add_rms_norm(x, res, w, 1e-5), add_rms_norm_ref(x, res, w, 1e-5)
    assert_matches(h, h_ref)
    assert_matches(y, y_ref, exact_bf16=False)
    assert torch.equal(h, x + res)  # the residual stream is exactly eager's x + residual


def _check_silu_mul(device, dtype, rows, n):
    gate = randn(rows, n, dtype=dtype, device=device, seed=4, scale=4.0)
    up = randn(rows, n, dtype=dtype, device=device, seed=5)
    assert_matches(ops.silu_mul(gate, up), silu_mul_ref(gate, up))


def _check_rotary(device, dtype, rows, heads, head_dim):
    x = randn(rows, heads, head_dim, dtype=dtype, device=device, seed=6)
    pos = torch.arange(rows, dtype=torch.float32)[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat((pos * inv, pos * inv), -1)
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    assert_matches(ops.rotary(x, cos, sin), rotary_ref(x, cos, sin))


SIZES = [(1, 512), (64, 512), (7, 1376), (2048, 64), (3, 5), (0, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SIZES)
def test_norms_cpu(dtype, rows, n):
    _check_norms("cpu", dtype, rows, n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SIZES)
def test_silu_mul_cpu(dtype, rows, n):
    _check_silu_mul("cpu", dtype, rows, n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,heads,head_dim", [(1, 8, 64), (64, 4, 64), (33, 2, 128), (5, 3, 6), (0, 2, 8)])
def test_rotary_cpu(dtype, rows, heads, head_dim):
    _check_rotary("cpu", dtype, rows, heads, head_dim)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_layer_ops_cuda(dtype):
    _check_norms("cuda", dtype, 64, 512)
    _check_silu_mul("cuda", dtype, 64, 1376)
    _check_rotary("cuda", dtype, 64, 8, 64)


def test_non_contiguous_inputs_cpu():
    x = randn(16, 64, dtype=torch.float32, device="cpu", seed=7).t()   # [64, 16], strided
    w = randn(16, dtype=torch.float32, device="cpu", seed=8)
    assert_matches(ops.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    q = randn(8, 64, 2, dtype=torch.float32, device="cpu", seed=9).transpose(1, 2)  # [8, 2, 64]
    cos = randn(8, 64, dtype=torch.float32, device="cpu", seed=10)
    assert_matches(ops.rotary(q, cos, cos), rotary_ref(q, cos, cos))


@pytest.mark.parametrize("call,message", [
    (lambda: ops.rms_norm(torch.ones(2, 8), torch.ones(7), 1e-6), "weight must be [8]"),
    (lambda: ops.rms_norm(torch.ones(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6), "weight must have x's dtype"),
    (lambda: ops.rms_norm(torch.ones(2, 8, dtype=torch.int32), torch.ones(8, dtype=torch.int32), 1e-6),
     "x must be float32 or bfloat16"),
    (lambda: ops.rms_norm(torch.ones(2, 8), torch.ones(8), -1.0), "eps must be >= 0"),
    (lambda: ops.add_rms_norm(torch.ones(2, 8), torch.ones(3, 8), torch.ones(8), 1e-6), "residual must have x's shape"),
    (lambda: ops.silu_mul(torch.ones(2, 8), torch.ones(2, 9)), "up must have gate's shape"),
    (lambda: ops.rotary(torch.ones(2, 8), torch.ones(2, 8), torch.ones(2, 8)), "x must be [T, H, D]"),
    (lambda: ops.rotary(torch.ones(2, 1, 8), torch.ones(3, 8), torch.ones(2, 8)), "cos must be [T, D]"),
    (lambda: ops.rotary(torch.ones(2, 1, 7), torch.ones(2, 7), torch.ones(2, 7)), "must be even"),
])
def test_bad_input_names_the_argument_cpu(call, message):
    if ops.kernel_backend() != "cpp":
        pytest.skip("the references do not check arguments")
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


@pytest.mark.parametrize("name,args", [
    ("rms_norm", (torch.randn(4, 16), torch.randn(16), 1e-6)),
    ("add_rms_norm", (torch.randn(4, 16), torch.randn(4, 16), torch.randn(16), 1e-6)),
    ("silu_mul", (torch.randn(4, 16), torch.randn(4, 16))),
    ("rotary", (torch.randn(4, 2, 16), torch.randn(4, 16), torch.randn(4, 16))),
])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.openlora, name).default, args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_extremes_cpu(dtype):
    """Large activations (where e^-g underflows: the C++ flushes it to 0 rather than make denormals),
    infinities and NaN give eager PyTorch's results."""
    gate = torch.tensor([[-1e4, -200.0, -100.0, -88.0, -87.0, -86.5, 86.5, 87.5, 100.0, 1e4,
                          float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 3.0]]).to(dtype)
    up = torch.linspace(-2, 2, gate.shape[1])[None].to(dtype)
    torch.testing.assert_close(ops.silu_mul(gate, up), silu_mul_ref(gate, up), equal_nan=True,
                               rtol=0 if dtype == torch.bfloat16 else 1e-6, atol=0)
