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
from decimal import Decimal
from typing import Any

import orjson

from streamer import otlp
from streamer.decode import Rejected

_REQUEST = "opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest"
# Field tags a ResourceLogs may start with (resource, scope_logs, schema_url: fields 1-3,
# length-delimited): with the request's own first tag (0x0A) and a length, what a batch starts with.
_RESOURCE_LOGS_TAGS = (0x0A, 0x12, 0x1A)


@functools.cache
def lenient_request() -> Any:
    """The ExportLogsServiceRequest class of a private copy of the schema, strings as bytes.
    (Built when a log parser is made, so that a protobuf too old to build it fails at start.)"""
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


def _odd_body(record: Any) -> bool:
    """Whether a log record has no body, or a string body that is not UTF-8."""
    if not record.HasField("body"):
        return True
    if record.body.WhichOneof("value") != "string_value":
        return False
    try:
        record.body.string_value.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _looks_like_batch(raw: bytes) -> bool:
    """Whether raw starts as a request does: tag 0x0A, a length, then a ResourceLogs field."""
    if raw[:1] != b"\n":
        return False
    for i in range(1, min(len(raw), 11)):  # (a varint: at most 10 bytes)
        if raw[i] < 0x80:
            if i + 1 == len(raw):  # (one empty ResourceLogs, `0A 00`: a batch of nothing)
                return raw[i] == 0
            return raw[i + 1] in _RESOURCE_LOGS_TAGS
    return False


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def _number(value: float) -> Any:
    """A double as the Collector's JSON writes it (Go's shortest digits, no exponent between 1e-6
    and 1e21; NaN and the infinities as strings), read back as orjson reads that text."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0 or 1e-6 <= abs(value) < 1e21:
        return orjson.loads(format(Decimal(repr(value)).normalize(), "f"))
    return value


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


def _misread(messages: Any) -> bool:
    """Whether any of these messages holds a field its schema declares but with another wire type:
    what an OTLP traces or metrics batch on a logs topic decodes to (a metric's name where a log
    record's time is), since the three requests share their first fields."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    for message in messages:
        declared = message.DESCRIPTOR.fields_by_number
        if any(field.field_number in declared for field in UnknownFieldSet(message)):
            return True
    return False


def _nested(message: Any) -> list[Any]:
    """The message and every message inside it."""
    out = [message]
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        # (protobuf 7 dropped `label` for `is_repeated`, which 4.x lacks; 3 is LABEL_REPEATED)
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == 3
        for item in value if repeated else [value]:
            out.extend(_nested(item))
    return out


def _has_spans(request: Any, nested: list[Any]) -> bool:
    """Whether a traces request holds a span with its ids (a misread log record would not), no
    field misread (`nested`: every message in the request)."""
    spans = (span for r in request.resource_spans for s in r.scope_spans for span in s.spans)
    return any(len(span.trace_id) == 16 and len(span.span_id) == 8 for span in spans) and not _misread(nested)


def _has_metrics(request: Any, nested: list[Any]) -> bool:
    """Whether a metrics request holds a metric with data (gauge, sum, histogram, ...), every
    point of it timed, and nothing unknown anywhere (`nested`: every message in the request): a
    log record without times or severity can parse as a metric (its body as a gauge, its trace
    id as a histogram), loosely (a review)."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    metrics = [m for r in request.resource_metrics for s in r.scope_metrics for m in s.metrics]
    if not metrics or any(len(UnknownFieldSet(message)) for message in nested):
        return False
    for metric in metrics:
        kind = metric.WhichOneof("data")
        points = getattr(metric, kind).data_points if kind else []
        if not points or any(point.time_unix_nano == 0 for point in points):
            return False
    return True


def _other_signal(raw: bytes) -> str:
    """What an OTLP message that is no logs batch is, for the dead letter's detail: a traces or
    metrics request that parses whole, every field in place, with spans or metrics in it; ""
    where it is neither."""
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    for name, request, holds in (("traces", ExportTraceServiceRequest, _has_spans), ("metrics", ExportMetricsServiceRequest, _has_metrics)):
        try:
            parsed = request.FromString(raw)
        except (DecodeError, ValueError):  # (the pure-Python backend raises UnicodeDecodeError)
            continue
        if holds(parsed, _nested(parsed)):
            return f"an OTLP {name} batch, not logs: is another signal's exporter writing to this topic?"
    return ""


def from_proto(raw: bytes) -> dict[str, Any] | None:
    """A protobuf ExportLogsServiceRequest in the OTLP/JSON shape `streamer.otlp.flatten` reads,
    or None where `raw` does not start as one (the caller reads it as a text line).

    The message has no magic number; it starts with tag 0x0A, a length and a ResourceLogs field
    (`_looks_like_batch`), as text rarely does (a newline, one character and a newline). What
    starts so and does not parse is rejected as `invalid_otlp` where it is not UTF-8 text either
    (a batch cut short, or nested deeper than protobuf's limit of 100 messages: read as text it
    would be one line of binary noise, scored, its log records lost without a trace); UTF-8 text
    is a line. A traces or metrics batch, which parses as a logs batch with fields misread, is
    rejected as `invalid_otlp` too.
    """
    if not _looks_like_batch(raw):
        return None
    from google.protobuf.message import DecodeError

    try:
        request = lenient_request().FromString(raw)
    except DecodeError as err:
        other = _other_signal(raw)
        if other:
            raise Rejected("invalid_otlp", other) from None
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("invalid_otlp", f"starts as an OTLP protobuf batch but does not parse: {err}") from None
        return None
    resources = list(request.resource_logs)
    scopes = [scope for resource in resources for scope in resource.scope_logs]
    records = [record for scope in scopes for record in scope.log_records]
    otlp.check_records(len(records))  # (before each is copied into a dict of its own)
    if _misread([*resources, *scopes, *records]):
        raise Rejected("invalid_otlp", _other_signal(raw) or "an OTLP protobuf message that is not a logs batch (its fields do not fit)")
    # A metric without a name (a broken producer) fits a log record's fields: its gauge lands
    # on the body as a string of binary noise (a third review). Where a body is missing or not
    # UTF-8, ask whether the message reads whole as another signal, which a logs batch does not.
    # (A record with a time or a severity number cannot be a metric: those fields clash with a
    # metric's name and description, which `_misread` finds.)
    untimed = (r for r in records if not (r.time_unix_nano or r.observed_time_unix_nano or r.severity_number))
    if any(_odd_body(record) for record in untimed) and (other := _other_signal(raw)):
        raise Rejected("invalid_otlp", other)
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
