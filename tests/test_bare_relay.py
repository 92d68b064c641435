"""benchmarks/bare_relay.py and benchmarks/go_relay, the bare hops benchmarks/cluster.py measures
beside the router: each must relay faithfully (the same tokens as the router and the executor, errors
passed through), or what it measures is the cost of something else."""

from __future__ import annotations

import grpc
import pytest

from benchmarks.bare_relay import PYTHON_RELAY, build_go_relay, start_relay
from services.common.gen.openlora.v1 import common_pb2, executor_pb2_grpc, router_pb2_grpc
from services.synthetic import AdapterSpec, write_adapter
from tests.conftest import TINY
from tests.servers import deployment


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["python", "go"])
def test_bare_relay_answers_as_the_router_and_the_executor_do(kind, llama_dir, tmp_path):
    if kind == "go":
        built = build_go_relay(tmp_path / "go")
        if isinstance(built, str):
            pytest.skip(built)
        command = [str(built)]
    else:
        command = PYTHON_RELAY
    adapter = write_adapter(tmp_path / "adapter", TINY["llama"], AdapterSpec(seed=401))
    with deployment(tmp_path, llama_dir, {"relay/a": adapter}) as (_, executor, router):
        relay, address = start_relay(command, executor.address)
        try:
            request = common_pb2.GenerateRequest(adapter_id="relay/a", prompt_token_ids=[1, 5, 9, 13],
                                                 sampling=common_pb2.SamplingParams(max_new_tokens=6, ignore_eos=True))
            answers = {}
            for name, target, stub_of in (("executor", executor.address, executor_pb2_grpc.ExecutorStub),
                                          ("router", router.address, router_pb2_grpc.RouterStub),
                                          ("relay", address, router_pb2_grpc.RouterStub)):
                with grpc.insecure_channel(target) as ch:
                    stub = stub_of(ch)
                    chunks = list(stub.GenerateStream(request, timeout=60))
                    whole = stub.Generate(request, timeout=60)
                    with pytest.raises(grpc.RpcError) as err:
                        stub.Generate(common_pb2.GenerateRequest(adapter_id="relay/missing",
                                                                 prompt_token_ids=[1]), timeout=60)
                answers[name] = ([t for c in chunks for t in c.token_ids], list(whole.token_ids),
                                 chunks[-1].finish_reason, err.value.code(), err.value.details())
            tokens, whole_tokens, finish, code, details = answers["relay"]
            assert len(tokens) == 6 and tokens == whole_tokens
            assert finish == common_pb2.FINISH_REASON_LENGTH
            assert code == grpc.StatusCode.NOT_FOUND and "relay/missing" in details
            assert answers["relay"] == answers["router"] == answers["executor"]
        finally:
            relay.terminate()
            relay.wait(10)
