"""The generated gRPC code matches the .proto files, and the API follows buf's style rules."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from google.protobuf.descriptor import Descriptor, EnumDescriptor

import protos.gen.imagine.v1 as gen_v1
from protos.codegen import GEN_DIR, generate, proto_files


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh_root = tmp_path / "gen"
    generate(fresh_root)

    fresh = _files(fresh_root)
    committed = _files(GEN_DIR)

    assert fresh, "protoc generated nothing"
    stale = sorted(
        name for name in fresh.keys() & committed.keys() if fresh[name] != committed[name]
    )
    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    assert not (stale or missing or extra), (
        f"protos/gen is out of date with protos/imagine/v1/*.proto (stale: {stale}, "
        f"missing: {missing}, not generated: {extra}); run `make proto`"
    )


def _pb2_modules() -> list[ModuleType]:
    names = sorted(m.name for m in pkgutil.iter_modules(gen_v1.__path__) if m.name.endswith("_pb2"))
    return [importlib.import_module(f"{gen_v1.__name__}.{name}") for name in names]


def test_every_proto_file_has_a_generated_module() -> None:
    modules = {Path(m.DESCRIPTOR.name).name for m in _pb2_modules()}
    assert modules == {p.name for p in proto_files()}


def _all_enums(module: ModuleType) -> Iterator[EnumDescriptor]:
    def walk(msg: Descriptor) -> Iterator[EnumDescriptor]:
        yield from msg.enum_types
        for nested in msg.nested_types:
            yield from walk(nested)

    yield from module.DESCRIPTOR.enum_types_by_name.values()
    for msg in module.DESCRIPTOR.message_types_by_name.values():
        yield from walk(msg)


def test_services_follow_buf_style() -> None:
    problems = []
    services = 0
    for module in _pb2_modules():
        for service in module.DESCRIPTOR.services_by_name.values():
            services += 1
            if not service.name.endswith("Service"):
                problems.append(f"service {service.full_name} does not end in 'Service'")
            assert service.methods, f"service {service.full_name} has no RPCs"
            for rpc in service.methods:
                if rpc.input_type.name != f"{rpc.name}Request":
                    problems.append(
                        f"{service.name}.{rpc.name} takes {rpc.input_type.name}, "
                        f"not {rpc.name}Request"
                    )
                if rpc.output_type.name != f"{rpc.name}Response":
                    problems.append(
                        f"{service.name}.{rpc.name} returns {rpc.output_type.name}, "
                        f"not {rpc.name}Response"
                    )
    assert services >= 5, f"found only {services} services in {gen_v1.__name__}"
    assert not problems, "\n".join(problems)


def test_enum_zero_values_are_unspecified() -> None:
    problems = []
    enums = 0
    for module in _pb2_modules():
        for enum in _all_enums(module):
            enums += 1
            zero = enum.values_by_number.get(0)
            if zero is None or not zero.name.endswith("_UNSPECIFIED"):
                problems.append(
                    f"enum {enum.full_name}: zero value is "
                    f"{zero.name if zero else 'missing'}, want *_UNSPECIFIED"
                )
    assert enums >= 2
    assert not problems, "\n".join(problems)


def test_every_package_is_imagine_v1() -> None:
    assert {m.DESCRIPTOR.package for m in _pb2_modules()} == {"imagine.v1"}
