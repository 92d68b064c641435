"""`openlora adapters add ID SOURCE | list | show ID | rm ID` against a running registry."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from services.common.gen.openlora.v1 import registry_pb2 as pb
from services.common.gen.openlora.v1 import registry_pb2_grpc
from services.common.tls import add_client_flags, channel_from_args

TIMEOUT_S = 600.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _label(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"expected k=v, got {text!r}")
    return k, v


def source_uri(source: str) -> str:
    """A plain local path (./my-adapter, /abs/dir, ~/dir) becomes file:///ABS/DIR; URIs pass as they are."""
    if "://" in source:
        return source
    return pathlib.Path(source).expanduser().resolve().as_uri()


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=os.environ.get("OPENLORA_REGISTRY", "127.0.0.1:50051"),
                        help="registry address [env OPENLORA_REGISTRY]")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_client_flags(common)
    p = _Parser(prog="openlora adapters", description="Manage adapters in a registry.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    add = sub.add_parser("add", parents=[common], help="import an adapter from a source URI")
    add.add_argument("id", help="the adapter id to register it as, e.g. team/sql")
    add.add_argument("source", type=source_uri,
                     help="hf://ORG/NAME[@REV][/SUB] | file:///ABS/DIR | a plain local directory | s3://...")
    add.add_argument("--label", type=_label, action="append", default=[], help="k=v (repeatable)")
    add.add_argument("--base-model", default="", help="override adapter_config's base model")
    vis = add.add_mutually_exclusive_group()
    vis.add_argument("--public", dest="public", action="store_const", const=True, default=None,
                     help="every tenant may list and run it (only you or an admin may change it)")
    vis.add_argument("--private", dest="public", action="store_const", const=False,
                     help="only its owner may see it (the default for a new adapter)")
    ls = sub.add_parser("list", parents=[common], help="list adapters (latest versions)")
    ls.add_argument("--base-model", default="", help="only adapters for this base model")
    ls.add_argument("--selector", default="", help="label selector k=v,k2=v2")
    for name, text in (("show", "show one adapter"), ("rm", "delete an adapter")):
        s = sub.add_parser(name, parents=[common], help=text)
        s.add_argument("id", help="the adapter id")
        s.add_argument("--version", type=int, default=0, help="0 -> latest (show) / every (rm)")
    return p


def _as_dict(a: pb.Adapter) -> dict:
    """The adapter as JSON for scripts, 64-bit integers as numbers (protobuf's JSON mapping makes
    them strings, so `size_bytes` compared as text)."""
    return _numbers(a.DESCRIPTOR, json_format.MessageToDict(a, preserving_proto_field_name=True))


_INT64 = {FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64}


def _numbers(descriptor, value: dict) -> dict:
    for field in descriptor.fields:
        if field.name not in value or field.message_type and field.message_type.GetOptions().map_entry:
            continue
        if field.cpp_type in _INT64:
            v = value[field.name]
            value[field.name] = [int(x) for x in v] if isinstance(v, list) else int(v)
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE and field.message_type.full_name.startswith(
                "openlora."):
            v = value[field.name]
            for item in v if isinstance(v, list) else [v]:
                _numbers(field.message_type, item)
    return value


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows)


def _created(a: pb.Adapter) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a.created_at.seconds))


def _show(a: pb.Adapter) -> str:
    rows = [["id", a.adapter_id], ["version", str(a.version)], ["digest", a.digest],
            ["base model", a.base_model or "-"], ["rank", str(a.rank)],
            ["alpha", f"{a.lora_alpha:g}"], ["targets", ",".join(a.target_modules)],
            ["rslora", str(a.use_rslora).lower()], ["size", _size(a.size_bytes)],
            ["source", a.source], ["labels", ",".join(f"{k}={v}" for k, v in sorted(a.labels.items())) or "-"],
            ["created", _created(a) + " UTC"], ["public", str(a.public).lower()]]
    rows += [["file", f"{f.name}  {_size(f.size_bytes)}  sha256:{f.sha256}"] for f in a.files]
    return "\n".join(f"{k + ':':<12}{v}" for k, v in rows)


def run(ns, stub) -> str:
    if ns.cmd == "add":
        a = stub.RegisterAdapter(pb.RegisterAdapterRequest(
            adapter_id=ns.id, source=ns.source, base_model=ns.base_model, labels=dict(ns.label),
            public=ns.public), timeout=TIMEOUT_S)
        return json.dumps(_as_dict(a)) if ns.json else \
            f"added {a.adapter_id} version {a.version} ({a.digest}, {_size(a.size_bytes)})"
    if ns.cmd == "list":
        adapters, token = [], ""
        while True:
            resp = stub.ListAdapters(pb.ListAdaptersRequest(
                page_size=1000, page_token=token, base_model=ns.base_model,
                label_selector=ns.selector), timeout=60)
            adapters += resp.adapters
            token = resp.next_page_token
            if not token:
                break
        if ns.json:
            return json.dumps([_as_dict(a) for a in adapters])
        if not adapters:
            return "no adapters"
        rows = [["ID", "VERSION", "BASE MODEL", "RANK", "SIZE", "LABELS", "CREATED (UTC)", "PUBLIC"]]
        rows += [[a.adapter_id, str(a.version), a.base_model or "-", str(a.rank), _size(a.size_bytes),
                  ",".join(f"{k}={v}" for k, v in sorted(a.labels.items())) or "-", _created(a),
                  "yes" if a.public else "-"]
                 for a in adapters]
        return _table(rows)
    if ns.cmd == "show":
        a = stub.GetAdapter(pb.GetAdapterRequest(adapter_id=ns.id, version=ns.version), timeout=60)
        return json.dumps(_as_dict(a)) if ns.json else _show(a)
    stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=ns.id, version=ns.version), timeout=60)
    what = f"version {ns.version}" if ns.version else "every version"
    return json.dumps({"deleted": ns.id, "version": ns.version}) if ns.json else \
        f"deleted {ns.id} ({what})"


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    if getattr(ns, "version", 0) < 0:
        print("openlora adapters: error: --version must be >= 0", file=sys.stderr)
        return 2
    with channel_from_args(ns, ns.registry, "openlora adapters") as channel:
        try:
            print(run(ns, registry_pb2_grpc.AdapterRegistryStub(channel)))
        except grpc.RpcError as exc:
            print(f"openlora adapters {ns.cmd}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0
