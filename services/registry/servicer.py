"""AdapterRegistry over gRPC: protobuf <-> core, nothing else. Blocking core work runs in threads."""

from __future__ import annotations

import asyncio

import grpc

from services.common import auth
from services.common.config import CHUNK_BYTES
from services.common.errors import Cancelled, InvalidArgument, Unavailable
from services.common.gen.openlora.v1 import registry_pb2 as pb
from services.common.gen.openlora.v1 import registry_pb2_grpc
from services.registry.changes import ChangeFeed
from services.registry.core import AdapterRegistry
from services.registry.metrics import RegistryMetrics
from services.registry.stores import CREATED, AdapterRecord, Change
from services.registry.tenancy import auth_delete, auth_get, auth_list

# FetchAdapter streams tens of MiB: its chunk messages are written as wire bytes (the exact encoding
# protobuf gives FetchAdapterResponse{chunk: FileChunk{file_name, data}}) straight from one read of
# the blob, skipping the message build + serialize copies. The first message (metadata) stays a
# protobuf message; `_serialize_fetch` passes bytes through and serializes messages.


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


def chunk_header(file_name: str, length: int) -> bytes:
    """Wire bytes of FetchAdapterResponse{chunk: FileChunk{file_name, data}} up to the data itself."""
    name = file_name.encode()
    chunk = b"\x0a" + _varint(len(name)) + name + b"\x12" + _varint(length)
    return b"\x12" + _varint(len(chunk) + length) + chunk


def _serialize_fetch(msg) -> bytes:
    return msg if type(msg) is bytes else msg.SerializeToString()


def to_pb(r: AdapterRecord) -> pb.Adapter:
    msg = pb.Adapter(
        adapter_id=r.adapter_id, version=r.version, base_model=r.base_model, rank=r.rank,
        lora_alpha=r.alpha, target_modules=list(r.target_modules), use_rslora=r.use_rslora,
        digest=r.digest, size_bytes=r.size_bytes, source=r.source, labels=r.labels,
        files=[pb.AdapterFile(name=f.name, size_bytes=f.size, sha256=f.sha256) for f in r.files],
        public=r.public)
    msg.created_at.FromNanoseconds(int(r.created_at * 1e9))
    return msg


def change_to_pb(c: Change, record: AdapterRecord | None) -> pb.AdapterChange:
    kind = pb.ADAPTER_CHANGE_KIND_CREATED if c.kind == CREATED else pb.ADAPTER_CHANGE_KIND_DELETED
    msg = pb.AdapterChange(kind=kind, adapter_id=c.adapter_id, version=c.version,
                           latest_version=c.latest_version)
    if record is not None:
        msg.adapter.CopyFrom(to_pb(record))
    return msg


def _deadline(context) -> float | None:
    """Seconds left of the caller's deadline, less a margin to answer in; None without one."""
    left = context.time_remaining()
    return None if left is None or left > 1e9 else max(0.0, left * 0.9 - 0.05)


class AdapterRegistryServicer(registry_pb2_grpc.AdapterRegistryServicer):
    def __init__(self, core: AdapterRegistry, metrics: RegistryMetrics | None = None,
                 feed: ChangeFeed | None = None):
        self.core = core
        self.metrics = metrics
        self.feed = feed or ChangeFeed(core.metadata)

    async def RegisterAdapter(self, request: pb.RegisterAdapterRequest, context) -> pb.Adapter:
        auth.require_adapter(request.adapter_id, create=True)
        record = await asyncio.to_thread(self.core.register, request.adapter_id, request.source,
                                         request.base_model, dict(request.labels),
                                         _public(request), auth.source_credentials())
        return to_pb(record)

    async def UploadAdapter(self, request_iterator, context) -> pb.Adapter:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("item") != "header":
            raise InvalidArgument("an upload starts with a header message (adapter_id, ...)")
        h = first.header
        auth.require_adapter(h.adapter_id, create=True)
        session = self.core.begin_upload(h.adapter_id, h.base_model, dict(h.labels), public=_public(h))
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
        return to_pb(await asyncio.to_thread(auth_get, self.core, request.adapter_id, request.version,
                                             _deadline(context)))

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        rows, token = await asyncio.to_thread(auth_list, self.core, request.page_size, request.page_token,
                                              request.base_model, request.label_selector)
        return pb.ListAdaptersResponse(adapters=[to_pb(r) for r in rows], next_page_token=token)

    async def DeleteAdapter(self, request: pb.DeleteAdapterRequest, context) -> pb.DeleteAdapterResponse:
        await asyncio.to_thread(auth_delete, self.core, request.adapter_id, request.version)
        return pb.DeleteAdapterResponse()

    async def FetchAdapter(self, request: pb.FetchAdapterRequest, context):
        auth.require_adapter(request.adapter_id)
        stream = await asyncio.to_thread(self.core.fetch, request.adapter_id, request.version,
                                         _deadline(context))
        try:
            yield pb.FetchAdapterResponse(adapter=to_pb(stream.record))
            if self.metrics:
                self.metrics.fetches.inc()
            readers = {f.name: r for f, r in zip(stream.record.files, stream.readers, strict=False)}
            buf = memoryview(bytearray(CHUNK_BYTES))
            for name, off, ln in stream.chunks(CHUNK_BYTES):
                yield b"".join((chunk_header(name, ln), await _read(readers[name], off, buf[:ln])))
                if self.metrics:
                    self.metrics.fetch_bytes.inc(ln)
        finally:
            stream.close()


    async def WatchAdapters(self, request: pb.WatchAdaptersRequest, context):
        async for change in self.feed.watch(request.adapter_id_prefix):
            record = None
            if change.kind == CREATED:
                record = await asyncio.to_thread(self.core.metadata.get, change.adapter_id,
                                                 change.version)
            yield change_to_pb(change, record)


def _public(msg) -> bool | None:
    """RegisterAdapterRequest/UploadHeader.public: True, False, or None when unset (unchanged)."""
    return msg.public if msg.HasField("public") else None


async def _read(reader, offset: int, buf: memoryview) -> memoryview:
    """Fill `buf` from the blob: inline from the page cache, in a thread where the disk is needed."""
    if not hasattr(reader, "read_cached"):
        return memoryview(await asyncio.to_thread(reader.read, offset, len(buf)))
    got = reader.read_cached(offset, buf)
    if got < len(buf):
        got += await asyncio.to_thread(reader.read_into, offset + got, buf[got:])
        if got < len(buf):
            raise Unavailable(f"blob shrank while being read ({got} of {len(buf)} bytes)")
    return buf


class _Handlers:
    """Catches the generated method handlers so one serializer can be swapped before mounting."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_to_server(servicer, server: grpc.aio.Server) -> None:
    caught = _Handlers()
    registry_pb2_grpc.add_AdapterRegistryServicer_to_server(servicer, caught)
    handlers = caught.handlers
    # FetchAdapter yields its chunk messages already encoded (bytes); the metadata stays a message.
    handlers["FetchAdapter"] = handlers["FetchAdapter"]._replace(response_serializer=_serialize_fetch)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(caught.service, handlers),))
    server.add_registered_method_handlers(caught.service, handlers)
