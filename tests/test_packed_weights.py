"""Prepacked fp32 base weights (ops.pack_weight, linear_packed: the engine's base GEMM on CPU) .

linear_packed must give x @ weight.T + bias, refuse a buffer packed from any other weight, and leave
longer calls to the plain-weight path. Skipped where packing does not apply (the reference backend,
a torch without MKL).
"""

from __future__ import annotations

import pytest
import torch

from services.executor import ops
from services.executor.ops import pack_weight

TOL = dict(rtol=1e-4, atol=1e-4)
packing = pytest.mark.skipif(pack_weight(torch.ones(2, 2)) is None,
                             reason="weight packing needs the compiled extension and MKL")


def make(tokens, d_in, d_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, d_in, generator=g), torch.randn(d_out, d_in, generator=g) * 0.1,
            torch.randn(d_out, generator=g))


@packing
@pytest.mark.parametrize("tokens", [0, 1, 3, 64, 320, 321, 700])   # past 320 the plain weight is used
@pytest.mark.parametrize("dims", [(96, 80), (512, 1376), (33, 17)])
def test_matches_the_plain_matmul(tokens, dims):
    x, w, b = make(tokens, *dims)
    packed = pack_weight(w)
    torch.testing.assert_close(ops.linear_packed(x, w, packed, b), torch.addmm(b, x, w.T), **TOL)
    torch.testing.assert_close(ops.linear_packed(x, w, packed), x @ w.T, **TOL)


@packing
def test_refuses_a_buffer_packed_from_another_weight():
    x, w, b = make(5, 64, 48)
    with pytest.raises(RuntimeError, match="packed from another weight"):
        ops.linear_packed(x, w, pack_weight(torch.randn(48, 64)), b)
    with pytest.raises(RuntimeError, match="packed from another weight"):
        ops.linear_packed(x, torch.randn_like(w), pack_weight(w))
    changed = w.clone()
    packed = pack_weight(changed)
    changed[-1, -1] += 1            # the weight changed after packing: pack again
    with pytest.raises(RuntimeError, match="packed from another weight"):
        ops.linear_packed(x, changed, packed)
    clone = w.clone()  # equal values elsewhere in memory: the same packing serves
    torch.testing.assert_close(ops.linear_packed(x, clone, pack_weight(w)), x @ clone.T, **TOL)
    with pytest.raises(RuntimeError, match="packed_weight must be the uint8 CPU tensor"):
        ops.linear_packed(x, w, torch.zeros(100), b)
    with pytest.raises(RuntimeError, match="not made by pack_weight"):
        ops.linear_packed(x, w, torch.zeros(1000, dtype=torch.uint8), b)
    with pytest.raises(RuntimeError, match="a copy of a packed buffer"):
        ops.linear_packed(x, w, pack_weight(w).clone(), b)


@packing
def test_refuses_other_dtypes():
    x, w, b = make(5, 64, 48)
    packed = pack_weight(w)
    with pytest.raises(RuntimeError, match="float32"):
        ops.linear_packed(x.bfloat16(), w, packed, b)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.openlora.pack_weight.default(w.bfloat16())


def test_pack_weight_is_none_where_packing_does_not_apply():
    assert pack_weight(torch.ones(4, 4, dtype=torch.bfloat16)) is None
    assert pack_weight(torch.ones(4, 8).T) is None            # not contiguous
    assert pack_weight(torch.ones(0, 4)) is None


@packing
def test_opcheck_and_compile():
    x, w, b = make(7, 64, 48)
    packed = pack_weight(w)
    # opcheck's other checks run the op on copies of its inputs, and a copy of a packed buffer is
    # refused (MKL's packed data is only valid where it was made); the fake kernel is checked below.
    torch.library.opcheck(torch.ops.openlora.linear_packed.default, (x, w, packed, b),
                          test_utils=("test_autograd_registration",))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = [mode.from_tensor(t) for t in (x, w, packed, b)]
        assert torch.ops.openlora.linear_packed.default(*fake).shape == (7, 48)
    compiled = torch.compile(ops.linear_packed, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, packed, b), torch.addmm(b, x, w.T), **TOL)
