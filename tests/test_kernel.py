"""torch.ops.openlora.lora_linear against the pure-PyTorch reference (services.executor.ops.reference).

Each check is written once as _check_*(device) with a _cpu test and a skip-unless-CUDA _cuda test.
The extension is built (or loaded from cache) once, when services.executor.ops is imported.
"""

from __future__ import annotations

import os

import pytest
import torch

from services.executor.ops import kernel_backend, lora_linear, lora_linear_async, lora_linear_ref

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU_DTYPES = [torch.float32, torch.bfloat16]
CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=6e-2),
       torch.float16: dict(rtol=5e-3, atol=1e-2)}
ARGS = ["x", "weight", "bias", "lora_a", "lora_b", "scalings", "ranks", "seg_indptr", "seg_slots"]

# (segment lengths, slot per segment), with S = 6 slots whose ranks are RANKS[:6] scaled to r_max
LAYOUTS = {
    "decode": ([1] * 6 + [1, 1], [0, 1, 2, 3, 4, 5, -1, 2]),
    "mixed": ([5, 0, 17, 64, 1, 130, 3], [1, 3, -1, 2, 5, 0, 4]),
    "one_segment": ([300], [2]),
    "base_only": ([7, 9], [-1, -1]),
    "one_token": ([1], [5]),
    "rank0_only": ([4, 12], [4, 4]),
    "empty_batch": ([], []),
}
DIMS = [(64, 48, 16), (100, 75, 40), (256, 512, 32)]  # (d_in, d_out, r_max)


def make_args(seg_lens, seg_slots, d_in, d_out, r_max, bias, dtype, device, seed=0, b_transposed=False):
    """Inputs for lora_linear; entries of lora_a/lora_b past each slot's rank are NaN. b_transposed:
    lora_b is the [S, d_out, r_max] view of [S, r_max, d_out] memory, as the CPU adapter pool keeps it."""
    g = torch.Generator().manual_seed(seed)
    ranks = [r_max, 1, 7, r_max // 2, 0, 3]  # slot s has rank ranks[s]
    S, T = len(ranks), sum(seg_lens)
    lora_a = torch.randn(S, r_max, d_in, generator=g) * 0.1
    lora_b = torch.randn(S, d_out, r_max, generator=g) * 0.1
    for s, r in enumerate(ranks):
        lora_a[s, r:] = float("nan")
        lora_b[s, :, r:] = float("nan")
    indptr = torch.tensor([0] + seg_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    args = dict(
        x=torch.randn(T, d_in, generator=g), weight=torch.randn(d_out, d_in, generator=g) * 0.1,
        bias=torch.randn(d_out, generator=g) if bias else None, lora_a=lora_a, lora_b=lora_b,
        scalings=torch.rand(S, generator=g) + 0.5, ranks=torch.tensor(ranks, dtype=torch.int32),
        seg_indptr=indptr, seg_slots=torch.tensor(seg_slots, dtype=torch.int32))
    for k, v in args.items():
        if v is not None:
            args[k] = v.to(device=device, dtype=dtype if v.is_floating_point() and k != "scalings" else v.dtype)
    if b_transposed:
        args["lora_b"] = args["lora_b"].transpose(1, 2).contiguous().transpose(1, 2)
        assert not args["lora_b"].is_contiguous() or min(args["lora_b"].shape[1:]) <= 1
    return args


def call(fn, args):
    return fn(*[args[k] for k in ARGS])


def test_extension_is_built():
    if os.environ.get("OPENLORA_KERNEL") != "reference":
        assert kernel_backend() == "cpp"


# --- matches the reference; NaN past each rank never reaches y ---------------------------------


def _check_matches_reference(device, dtype, layout, dims, bias, layout_args=None, b_transposed=False,
                             op=lora_linear):
    args = make_args(*(layout_args or LAYOUTS[layout]), *dims, bias, dtype, device,
                     b_transposed=b_transposed)
    y, want = call(op, args), call(lora_linear_ref, args)
    assert y.dtype == dtype and y.shape == (args["x"].shape[0], dims[1]) and y.device == args["x"].device
    assert not y.isnan().any()
    torch.testing.assert_close(y, want, **TOL[dtype])


@pytest.mark.parametrize("b_layout", ["rows", "transposed"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_matches_reference_cpu(dtype, layout, dims, bias, b_layout):
    _check_matches_reference("cpu", dtype, layout, dims, bias, b_transposed=b_layout == "transposed")


@cuda_only
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_matches_reference_cuda(dtype, layout, dims, bias):
    _check_matches_reference("cuda", dtype, layout, dims, bias)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_async_matches_reference_cpu(dtype, layout, dims):  # on CPU the same kernel as lora_linear
    _check_matches_reference("cpu", dtype, layout, dims, True, op=lora_linear_async)


@cuda_only
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_async_matches_reference_cuda(dtype, layout, dims):  # no host copy; long segments in the kernels
    _check_matches_reference("cuda", dtype, layout, dims, True, op=lora_linear_async)


@pytest.mark.parametrize("b_layout", ["rows", "transposed"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dims", [(64, 200, 16), (40, 83, 80), (96, 1376 // 4, 64)])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_work_split_between_threads_cpu(dtype, dims, threads, b_layout):
    """The CPU kernel splits shrink and expand work by cost, cutting segments mid-way; any thread
    count, d_out % 16 != 0 and r_max > 64 (wider transposed tiles) must give the same result."""
    lens = [1, 2, 9, 0, 33, 1, 1, 70, 4, 8, 2, 17, 1, 3]
    slots = [0, 1, 2, 3, 5, 4, -1, 0, 3, 1, 2, 5, 0, 3]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (True, False):
            _check_matches_reference("cpu", dtype, None, dims, bias, layout_args=(lens, slots),
                                     b_transposed=b_layout == "transposed")
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("interleave", ["1", "0"])
@pytest.mark.parametrize("b_layout", ["rows", "transposed"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 64, 512, 513])
def test_interleaved_base_matmul_cpu(tokens, threads, b_layout, interleave):
    """fp32 calls of up to 512 tokens may run the base matmul in column blocks between the LoRA phases
    (set_cpu_kernels(interleave="1") forces it, "0" turns it off: the executor's --interleave); at and
    around that size, with d_out not a multiple of the block, the result is the same either way."""
    from services.executor import ops
    ops.set_cpu_kernels(interleave=interleave)
    lens = [1] * min(tokens, 40) + ([tokens - 40] if tokens > 40 else [])
    slots = [(i % 7) - 1 for i in range(len(lens))]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (True, False):
            _check_matches_reference("cpu", torch.float32, None, (96, 300, 32), bias,
                                     layout_args=(lens, slots), b_transposed=b_layout == "transposed")
    finally:
        torch.set_num_threads(old)
        ops.set_cpu_kernels(interleave="auto")


def _check_matches_by_hand(device):
    """One adapter, written out: y = x W^T + b + 2 * (x A^T) B^T on rows 1..2 only."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], device=device)
    w = torch.eye(2, device=device)
    a = torch.tensor([[[1.0, 1.0]]], device=device)  # [S=1, r=1, d_in=2]
    b = torch.tensor([[[1.0], [-1.0]]], device=device)  # [S=1, d_out=2, r=1]
    i32 = dict(dtype=torch.int32, device=device)
    y = lora_linear(x, w, torch.ones(2, device=device), a, b, torch.tensor([2.0], device=device),
                    torch.tensor([1], **i32), torch.tensor([0, 1, 3], **i32), torch.tensor([-1, 0], **i32))
    want = torch.tensor([[2.0, 3.0], [4.0 + 14, 5.0 - 14], [6.0 + 22, 7.0 - 22]], device=device)
    torch.testing.assert_close(y, want)


def test_matches_by_hand_cpu():
    _check_matches_by_hand("cpu")


@cuda_only
def test_matches_by_hand_cuda():
    _check_matches_by_hand("cuda")


def _check_non_contiguous(device):
    args = make_args(*LAYOUTS["mixed"], 64, 48, 16, True, torch.float32, device)
    args["x"] = torch.cat([args["x"], args["x"]], dim=1)[:, ::2]  # same values, stride 2
    args["weight"] = args["weight"].t().contiguous().t()
    torch.testing.assert_close(call(lora_linear, args), call(lora_linear_ref, args), **TOL[torch.float32])


def test_non_contiguous_cpu():
    _check_non_contiguous("cpu")


@cuda_only
def test_non_contiguous_cuda():
    _check_non_contiguous("cuda")


# --- torch.library: schema, fake kernel, torch.compile -----------------------------------------


def _check_opcheck(device):
    for layout, dims, bias in [("mixed", DIMS[0], True), ("decode", DIMS[1], False),
                               ("empty_batch", DIMS[0], True)]:
        args = make_args(*LAYOUTS[layout], *dims, bias, torch.float32, device)
        torch.library.opcheck(torch.ops.openlora.lora_linear.default, tuple(args[k] for k in ARGS))


def test_opcheck_cpu():
    _check_opcheck("cpu")


@cuda_only
def test_opcheck_cuda():
    _check_opcheck("cuda")


def test_torch_compile_traces_the_op():
    args = make_args(*LAYOUTS["mixed"], *DIMS[0], True, torch.float32, "cpu")
    compiled = torch.compile(lora_linear, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(call(compiled, args), call(lora_linear_ref, args), **TOL[torch.float32])


# --- bad inputs raise, naming the argument -----------------------------------------------------


def _set(name, value):
    return lambda a: {**a, name: value(a)}


BAD_INPUTS = {
    "x_1d": ("x", _set("x", lambda a: a["x"][0])),
    "weight_d_in": ("weight", _set("weight", lambda a: a["weight"][:, 1:])),
    "weight_dtype": ("weight", _set("weight", lambda a: a["weight"].double())),
    "bias_shape": ("bias", _set("bias", lambda a: a["bias"][1:])),
    "bias_dtype": ("bias", _set("bias", lambda a: a["bias"].double())),
    "lora_a_d_in": ("lora_a", _set("lora_a", lambda a: a["lora_a"][:, :, 1:])),
    "lora_a_2d": ("lora_a", _set("lora_a", lambda a: a["lora_a"][0])),
    "lora_b_r_max": ("lora_b", _set("lora_b", lambda a: a["lora_b"][:, :, 1:])),
    "lora_b_slots": ("lora_b", _set("lora_b", lambda a: a["lora_b"][1:])),
    "scalings_dtype": ("scalings", _set("scalings", lambda a: a["scalings"].double())),
    "scalings_len": ("scalings", _set("scalings", lambda a: a["scalings"][1:])),
    "ranks_dtype": ("ranks", _set("ranks", lambda a: a["ranks"].long())),
    "ranks_above_r_max": ("ranks", _set("ranks", lambda a: a["ranks"] + 1)),
    "ranks_negative": ("ranks", _set("ranks", lambda a: a["ranks"] - 8)),
    "seg_indptr_dtype": ("seg_indptr", _set("seg_indptr", lambda a: a["seg_indptr"].long())),
    "seg_indptr_start": ("seg_indptr", _set("seg_indptr", lambda a: a["seg_indptr"] + 1)),
    "seg_indptr_end": ("seg_indptr", _set("seg_indptr", lambda a: torch.cat([a["seg_indptr"][:-1], a["seg_indptr"][-1:] + 1]))),
    "seg_indptr_decreasing": ("seg_indptr", _set("seg_indptr", lambda a: a["seg_indptr"][[0, 1, 3, 2, 4, 5, 6, 7]])),
    "seg_indptr_empty": ("seg_indptr", _set("seg_indptr", lambda a: a["seg_indptr"][:0])),
    "seg_slots_too_big": ("seg_slots", _set("seg_slots", lambda a: a["seg_slots"] + 6)),
    "seg_slots_below_minus_1": ("seg_slots", _set("seg_slots", lambda a: a["seg_slots"] - 7)),
    "seg_slots_len": ("seg_slots", _set("seg_slots", lambda a: a["seg_slots"][1:])),
    "seg_slots_dtype": ("seg_slots", _set("seg_slots", lambda a: a["seg_slots"].long())),
}


def _check_bad_input(device, case):
    name, mutate = BAD_INPUTS[case]
    args = mutate(make_args(*LAYOUTS["mixed"], 64, 48, 16, True, torch.float32, device))
    for fn in (lora_linear, lora_linear_ref):
        with pytest.raises((RuntimeError, ValueError), match=name):
            call(fn, args)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_cpu(case):
    _check_bad_input("cpu", case)


@cuda_only
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_cuda(case):
    _check_bad_input("cuda", case)


@cuda_only
def test_index_tensor_on_wrong_device_cuda():
    args = make_args(*LAYOUTS["mixed"], 64, 48, 16, True, torch.float32, "cuda")
    with pytest.raises((RuntimeError, ValueError), match="ranks"):
        call(lora_linear, {**args, "ranks": args["ranks"].cpu()})


def test_unsupported_cpu_dtype_names_x():
    if kernel_backend() != "cpp":
        pytest.skip("the reference computes any floating dtype")
    args = make_args(*LAYOUTS["mixed"], 64, 48, 16, True, torch.float16, "cpu")
    with pytest.raises(RuntimeError, match="x must be"):
        call(lora_linear, args)


def test_failed_build_raises_with_compiler_message(tmp_path, monkeypatch):
    from services.executor.ops import build

    broken = tmp_path / "broken.cpp"
    broken.write_text("int main() { return undeclared_name_42; }\n")
    monkeypatch.setattr(build, "CPU_SOURCES", [broken])
    monkeypatch.setattr(build, "ISA_FLAGS", {})
    monkeypatch.setattr(build, "cuda_buildable", lambda: False)
    monkeypatch.setenv("OPENLORA_BUILD_DIR", str(tmp_path / "build"))
    with pytest.raises(build.KernelBuildError, match="undeclared_name_42"):
        build.build()


@pytest.mark.parametrize("dims", [(33, 17, 8), (100, 75, 40), (512, 1376 // 8, 64), (70, 40, 96)])
def test_bf16_lora_update_rounded_once_cpu(dims):
    """bf16 on CPU: every segment length (1..70, short and long paths), every rank incl. 1 and r_max,
    d_in not a multiple of 32 and d_out % 16 != 0. y may differ from the fp32 reference of the same
    bf16 inputs only by the rounding of the base layer's output and one final rounding to bf16
    (half an ulp each, plus a little fp32 accumulation error), never by a bf16-rounded LoRA term."""
    lens = [1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 70, 1, 12]
    slots = [0, 1, 2, 3, 5, 0, 1, 2, 3, 5, 0, 1, 2]
    args = make_args(lens, slots, *dims, True, torch.bfloat16, "cpu", seed=1)
    y = call(lora_linear, args).float()
    ref = lora_linear_ref(*[args[k].float() if k != "scalings" and args[k] is not None
                            and args[k].is_floating_point() else args[k] for k in ARGS])
    base = torch.addmm(args["bias"].float(), args["x"].float(), args["weight"].float().t())
    assert not y.isnan().any()
    bound = 2.0 ** -8 * (base.abs() + ref.abs()) * 1.05 + 1e-4 * (1 + ref.abs())
    assert ((y - ref).abs() <= bound).all(), float(((y - ref).abs() - bound).max())


@pytest.mark.slow
def test_a_build_killed_midway_does_not_block_later_builds(tmp_path, monkeypatch):
    """torch's `lock` file left by a killed build is removed under our flock (no live builder holds
    it), so the next build (or cached load) goes on instead of waiting for it forever."""
    import threading

    from services.executor.ops import build
    monkeypatch.setenv("OPENLORA_BUILD_DIR", str(tmp_path / "builds"))
    src = tmp_path / "tiny.cpp"
    src.write_text('#include <torch/library.h>\nTORCH_LIBRARY(openlora_lock_test, m) {}\n')
    build._load("lock_test", [src], (), False)
    (directory,) = (tmp_path / "builds").iterdir()
    (directory / "lock").write_text("")             # what a build killed mid-way leaves behind
    done = threading.Event()
    t = threading.Thread(target=lambda: (build._load("lock_test", [src], (), False), done.set()),
                         daemon=True)
    t.start()
    assert done.wait(300), "the build waited on a stale lock"
    assert not (directory / "lock").exists()
