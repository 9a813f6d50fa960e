"""OTLP log batches in protobuf, put in the OTLP/JSON shape that streamer.otlp reads.

The OpenTelemetry Collector's Kafka exporter writes one ExportLogsServiceRequest per message in
protobuf by default (`encoding: otlp_proto`). Two things keep this from being a plain
`FromString`: the Collector (Go) relays strings that are not UTF-8, which Python's protobuf
refuses, dropping the whole batch for one bad attribute; and protobuf's JSON mapping is not
OTLP/JSON (ids in base64, doubles as Python prints them). So the message is decoded against a
copy of OpenTelemetry's schema in which every `string` is `bytes`, and only what the log parser
reads is taken out, spelt as the Collector's `otlp_json` encoding spells it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from streamer.decode import Rejected

_REQUEST = "opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest"
# Field tags a ResourceLogs may start with (resource, scope_logs, schema_url: fields 1-3,
# length-delimited): with the request's own first tag (0x0A) and a length, what a batch starts with.
_RESOURCE_LOGS_TAGS = (0x0A, 0x12, 0x1A)


@functools.cache
def _lenient_request() -> Any:
    """The ExportLogsServiceRequest class of a private copy of the schema, strings as bytes."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.logs.v1 import logs_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2

    def as_bytes(messages: Any) -> None:
        for message in messages:
            for field in message.field:
                if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                    field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            as_bytes(message.nested_type)

    pool = descriptor_pool.DescriptorPool()
    for module in (common_pb2, resource_pb2, logs_pb2, logs_service_pb2):  # (dependencies first)
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        as_bytes(proto.message_type)
        pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(_REQUEST))


def _looks_like_batch(raw: bytes) -> bool:
    """Whether raw starts as a request does: tag 0x0A, a length, then a ResourceLogs field."""
    if raw[:1] != b"\n":
        return False
    for i in range(1, min(len(raw), 11)):  # (a varint: at most 10 bytes)
        if raw[i] < 0x80:
            return i + 1 < len(raw) and raw[i + 1] in _RESOURCE_LOGS_TAGS
    return False


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def _number(value: float) -> Any:
    """A double as the Collector's JSON writes it, read back by orjson: integral values as ints."""
    return int(value) if math.isfinite(value) and value.is_integer() and abs(value) < 1e21 else value


def _any_value(value: Any) -> dict[str, Any]:
    """An AnyValue in OTLP/JSON, its scalars only (arrays, maps and bytes are nothing the parser
    reads: an empty object, as an unset value is)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return {"stringValue": _text(value.string_value)}
    if kind == "int_value":
        return {"intValue": str(value.int_value)}
    if kind == "double_value":
        return {"doubleValue": _number(value.double_value)}
    if kind == "bool_value":
        return {"boolValue": value.bool_value}
    return {}


def _attributes(items: Any) -> list[dict[str, Any]]:
    return [{"key": _text(item.key), "value": _any_value(item.value)} for item in items]


def _record(record: Any) -> dict[str, Any]:
    return {
        "timeUnixNano": str(record.time_unix_nano),
        "observedTimeUnixNano": str(record.observed_time_unix_nano),
        "severityNumber": record.severity_number,
        "severityText": _text(record.severity_text),
        "body": _any_value(record.body) if record.HasField("body") else None,
        "attributes": _attributes(record.attributes),
        "traceId": record.trace_id.hex(),
        "spanId": record.span_id.hex(),
    }


def from_proto(raw: bytes) -> dict[str, Any] | None:
    """A protobuf ExportLogsServiceRequest in the OTLP/JSON shape `streamer.otlp.flatten` reads,
    or None where `raw` does not start as one (the caller reads it as a text line).

    The message has no magic number; it starts with tag 0x0A, a length and a ResourceLogs field
    (`_looks_like_batch`), which text does not (its third byte would be a control character).
    What starts so and does not parse (a batch cut short, or nested deeper than protobuf's limit
    of 100 messages) is rejected as `invalid_otlp`: read as text it would be one line of binary
    noise, scored, its log records lost without a trace.
    """
    if not _looks_like_batch(raw):
        return None
    from google.protobuf.message import DecodeError

    try:
        request = _lenient_request().FromString(raw)
    except DecodeError as err:
        raise Rejected("invalid_otlp", f"starts as an OTLP protobuf batch but does not parse: {err}") from None
    return {
        "resourceLogs": [
            {
                "resource": {"attributes": _attributes(resource_logs.resource.attributes)},
                "scopeLogs": [
                    {"scope": {"name": _text(scope_logs.scope.name)}, "logRecords": [_record(r) for r in scope_logs.log_records]}
                    for scope_logs in resource_logs.scope_logs
                ],
            }
            for resource_logs in request.resource_logs
        ]
    }
