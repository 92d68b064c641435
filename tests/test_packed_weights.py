"""Prepacked fp32 base weights (ops.pack_weight, lora_linear_packed, linear_packed) on CPU.

The packed ops must give what lora_linear gives on the plain weight (the reference is the oracle),
refuse a buffer packed from any other weight, and leave longer calls to the plain-weight path.
Skipped where packing does not apply (the reference backend, a torch without MKL).
"""

from __future__ import annotations

import pytest
import torch
from test_kernel import ARGS, LAYOUTS, TOL, call, make_args

from services.executor import ops
from services.executor.ops import lora_linear_packed, lora_linear_ref, pack_weight

packing = pytest.mark.skipif(pack_weight(torch.ones(2, 2)) is None,
                             reason="weight packing needs the compiled extension and MKL")


def packed_call(args, packed):
    return lora_linear_packed(args["x"], args["weight"], packed,
                              *[args[k] for k in ARGS if k not in ("x", "weight")])


@packing
@pytest.mark.parametrize("layout", ["decode", "mixed", "base_only", "one_token", "empty_batch"])
@pytest.mark.parametrize("dims", [(64, 48, 16), (100, 75, 40), (512, 1376, 16)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("b_transposed", [False, True])
def test_matches_reference(layout, dims, bias, b_transposed):
    args = make_args(*LAYOUTS[layout], *dims, bias, torch.float32, "cpu", b_transposed=b_transposed)
    y = packed_call(args, pack_weight(args["weight"]))
    assert y.shape == (args["x"].shape[0], dims[1]) and not y.isnan().any()
    torch.testing.assert_close(y, call(lora_linear_ref, args), **TOL[torch.float32])


@packing
@pytest.mark.parametrize("tokens", [1, 3, 64, 320, 321, 700])   # past 320 the plain weight is used
def test_token_counts_either_side_of_the_packed_limit(tokens):
    args = make_args([tokens], [2], 96, 80, 16, True, torch.float32, "cpu")
    packed = pack_weight(args["weight"])
    torch.testing.assert_close(packed_call(args, packed), call(lora_linear_ref, args), **TOL[torch.float32])
    x, w, b = args["x"], args["weight"], args["bias"]
    torch.testing.assert_close(ops.linear_packed(x, w, packed, b), torch.addmm(b, x, w.T),
                               **TOL[torch.float32])
    torch.testing.assert_close(ops.linear_packed(x, w, packed), x @ w.T, **TOL[torch.float32])


@packing
def test_packed_equals_plain_kernel_bit_for_bit_at_decode():
    """At a decode batch the engine's fp32 outputs with and without packing are the same numbers."""
    args = make_args([1] * 64, [i % 6 for i in range(64)], 512, 512, 16, False, torch.float32, "cpu")
    plain = call(ops.lora_linear, args)
    torch.testing.assert_close(packed_call(args, pack_weight(args["weight"])), plain, rtol=1e-5, atol=1e-5)


@packing
def test_refuses_a_buffer_packed_from_another_weight():
    args = make_args(*LAYOUTS["mixed"], 64, 48, 16, True, torch.float32, "cpu")
    other = pack_weight(torch.randn(48, 64))
    with pytest.raises(RuntimeError, match="packed from another weight"):
        packed_call(args, other)
    same_shape = torch.randn_like(args["weight"])
    with pytest.raises(RuntimeError, match="packed from another weight"):
        ops.linear_packed(args["x"], same_shape, pack_weight(args["weight"]))
    changed = args["weight"].clone()
    packed = pack_weight(changed)
    changed[-1, -1] += 1            # the weight changed after packing: pack again
    with pytest.raises(RuntimeError, match="packed from another weight"):
        ops.linear_packed(args["x"], changed, packed)
    clone = args["weight"].clone()  # equal values elsewhere in memory: the same packing serves
    torch.testing.assert_close(ops.linear_packed(args["x"], clone, pack_weight(args["weight"])),
                               args["x"] @ clone.T, **TOL[torch.float32])
    with pytest.raises(RuntimeError, match="packed_weight must be the uint8 CPU tensor"):
        packed_call(args, torch.zeros(100))
    with pytest.raises(RuntimeError, match="not made by pack_weight"):
        packed_call(args, torch.zeros(1000, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="a copy of a packed buffer"):
        packed_call(args, pack_weight(args["weight"]).clone())


@packing
def test_refuses_other_dtypes():
    args = make_args(*LAYOUTS["mixed"], 64, 48, 16, False, torch.float32, "cpu")
    packed = pack_weight(args["weight"])
    bf16 = {k: (v.bfloat16() if k not in ("scalings",) and v is not None and v.is_floating_point() else v)
            for k, v in args.items()}
    with pytest.raises(RuntimeError, match="float32"):
        lora_linear_packed(bf16["x"], bf16["weight"], packed,
                           *[bf16[k] for k in ARGS if k not in ("x", "weight")])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.openlora.pack_weight.default(args["weight"].bfloat16())


def test_pack_weight_is_none_where_packing_does_not_apply():
    assert pack_weight(torch.ones(4, 4, dtype=torch.bfloat16)) is None
    assert pack_weight(torch.ones(4, 8).T) is None            # not contiguous
    assert pack_weight(torch.ones(0, 4)) is None


@packing
def test_opcheck_and_compile():
    args = make_args(*LAYOUTS["mixed"], 64, 48, 16, True, torch.float32, "cpu")
    packed = pack_weight(args["weight"])
    rest = tuple(args[k] for k in ARGS if k not in ("x", "weight"))
    # opcheck's other checks run the op on copies of its inputs, and a copy of a packed buffer is
    # refused (MKL's packed data is only valid where it was made); the fake kernels are checked below.
    only = ("test_autograd_registration",)
    torch.library.opcheck(torch.ops.openlora.lora_linear_packed.default,
                          (args["x"], args["weight"], packed) + rest, test_utils=only)
    torch.library.opcheck(torch.ops.openlora.linear_packed.default,
                          (args["x"], args["weight"], packed, args["bias"]), test_utils=only)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                for t in (args["x"], args["weight"], packed) + rest]
        assert torch.ops.openlora.lora_linear_packed.default(*fake).shape == (args["x"].shape[0], 48)
        assert torch.ops.openlora.linear_packed.default(*fake[:4]).shape == (args["x"].shape[0], 48)
    compiled = torch.compile(lora_linear_packed, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(args["x"], args["weight"], packed, *rest),
                               call(lora_linear_ref, args), **TOL[torch.float32])
