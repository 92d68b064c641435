"""AdapterRegistry over gRPC: protobuf <-> core, nothing else. Blocking core work runs in threads."""

from __future__ import annotations

import asyncio

import grpc

from services.common.errors import Cancelled, InvalidArgument
from services.common.gen.openlora.v1 import registry_pb2 as pb
from services.common.gen.openlora.v1 import registry_pb2_grpc
from services.registry.core import AdapterRegistry
from services.registry.metrics import RegistryMetrics
from services.registry.stores import AdapterRecord

FETCH_BATCH = 8                                     # chunks pread inline (page cache) per batch


def to_pb(r: AdapterRecord) -> pb.Adapter:
    msg = pb.Adapter(
        adapter_id=r.adapter_id, version=r.version, base_model=r.base_model, rank=r.rank,
        lora_alpha=r.alpha, target_modules=list(r.target_modules), use_rslora=r.use_rslora,
        digest=r.digest, size_bytes=r.size_bytes, source=r.source, labels=r.labels,
        files=[pb.AdapterFile(name=f.name, size_bytes=f.size, sha256=f.sha256) for f in r.files])
    msg.created_at.FromNanoseconds(int(r.created_at * 1e9))
    return msg


class AdapterRegistryServicer(registry_pb2_grpc.AdapterRegistryServicer):
    def __init__(self, core: AdapterRegistry, metrics: RegistryMetrics | None = None):
        self.core = core
        self.metrics = metrics

    async def RegisterAdapter(self, request: pb.RegisterAdapterRequest, context) -> pb.Adapter:
        record = await asyncio.to_thread(self.core.register, request.adapter_id, request.source,
                                         request.base_model, dict(request.labels))
        return to_pb(record)

    async def UploadAdapter(self, request_iterator, context) -> pb.Adapter:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("item") != "header":
            raise InvalidArgument("an upload starts with a header message (adapter_id, ...)")
        h = first.header
        session = self.core.begin_upload(h.adapter_id, h.base_model, dict(h.labels))
        try:
            async for msg in request_iterator:
                if msg.WhichOneof("item") != "chunk":
                    raise InvalidArgument("only the first upload message may be a header")
                await asyncio.to_thread(session.write, msg.chunk.file_name, msg.chunk.data)
            record = await asyncio.to_thread(session.prepare)
            # A cut-off client stream can look like a normal end: commit only if still wanted.
            if context.done() or context.cancelled():
                raise Cancelled("the client went away before the upload completed")
            return to_pb(await asyncio.to_thread(session.commit, record))
        finally:
            await asyncio.to_thread(session.abort)

    async def GetAdapter(self, request: pb.GetAdapterRequest, context) -> pb.Adapter:
        return to_pb(await asyncio.to_thread(self.core.get, request.adapter_id, request.version))

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        rows, token = await asyncio.to_thread(self.core.list, request.page_size, request.page_token,
                                              request.base_model, request.label_selector)
        return pb.ListAdaptersResponse(adapters=[to_pb(r) for r in rows], next_page_token=token)

    async def DeleteAdapter(self, request: pb.DeleteAdapterRequest, context) -> pb.DeleteAdapterResponse:
        await asyncio.to_thread(self.core.delete, request.adapter_id, request.version)
        return pb.DeleteAdapterResponse()

    async def FetchAdapter(self, request: pb.FetchAdapterRequest, context):
        stream = await asyncio.to_thread(self.core.fetch, request.adapter_id, request.version)
        try:
            yield pb.FetchAdapterResponse(adapter=to_pb(stream.record))
            if self.metrics:
                self.metrics.fetches.inc()
            readers = {f.name: r for f, r in zip(stream.record.files, stream.readers)}
            plan = list(stream.chunks())
            for i in range(0, len(plan), FETCH_BATCH):
                batch = plan[i:i + FETCH_BATCH]
                datas = [readers[n].read(off, ln) for n, off, ln in batch]
                for (name, _, _), data in zip(batch, datas):
                    yield pb.FetchAdapterResponse(chunk=pb.FileChunk(file_name=name, data=data))
                    if self.metrics:
                        self.metrics.fetch_bytes.inc(len(data))
        finally:
            stream.close()


def add_to_server(servicer, server: grpc.aio.Server) -> None:
    registry_pb2_grpc.add_AdapterRegistryServicer_to_server(servicer, server)
