"""OTLP log batches: one Kafka record holding many log records.

The OpenTelemetry Collector's Kafka exporter writes one ExportLogsServiceRequest per message,
in protobuf (`encoding: otlp_proto`, its default) or OTLP/JSON (`otlp_json`): resourceLogs ->
scopeLogs -> logRecords, with the service's name and host in the resource's attributes, not in
each record. Read as one log record, such a batch has no message and was dead-lettered whole
(or, in protobuf, scored as one line of binary noise). Here each log record becomes a flat
object in the shape of a single OpenTelemetry JSON record (`body`, `timeUnixNano`,
`severityNumber`, ...), with the resource's and the record's attributes as top-level keys
spelt as OpenTelemetry spells them (`service.name`), so the parser reads it like any other JSON
record and `logs.stream_field: service.name` names the stream. A protobuf batch is first put in
the OTLP/JSON shape (streamer/otlp_proto.py), so both encodings take one path from there.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from streamer.decode import Rejected

# A log record's own fields that the parser reads (its layout names for OpenTelemetry).
_RECORD_FIELDS = (
    "timeUnixNano",
    "observedTimeUnixNano",
    "severityNumber",
    "severityText",
    "body",
    "traceId",
    "spanId",
)


class ReadNames(NamedTuple):
    """The names the parser reads for a record's message, level and time (its aliases and every
    known layout's), in the order it tries them: an attribute so named would come first."""

    message: frozenset[str]
    level: frozenset[str]
    time: frozenset[str]


def is_batch(obj: dict[str, Any]) -> bool:
    return isinstance(obj.get("resourceLogs"), list)


def _any_value(value: Any) -> Any:
    """An AnyValue's scalar (OTLP/JSON writes int64 as a string); None for arrays, maps, bytes."""
    if not isinstance(value, dict):
        return None
    for kind in ("stringValue", "intValue", "doubleValue", "boolValue"):
        if kind in value:
            return value[kind]
    return None


def _attributes(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(items, list):
        return out
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("key"), str):
            scalar = _any_value(item.get("value"))
            if scalar is not None:
                out[item["key"]] = scalar
    return out


def _list(obj: Any, name: str) -> list[Any]:
    value = obj.get(name) if isinstance(obj, dict) else None
    return value if isinstance(value, list) else []


def _usable(name: str, value: Any) -> bool:
    """Whether a log record's own field says something the parser can read: OTLP/JSON writes 0
    and "" for unset, and a body may be a map or list, which is no message."""
    if name == "body":
        return isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("stringValue"), str))
    if name == "severityNumber":
        return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 24
    return value not in (None, 0, "0", "")


def _own(record: dict[str, Any]) -> dict[str, Any]:
    """The log record's own fields that say something (`_usable`): only those are copied over
    the attributes, since an empty severityText or a null body would otherwise hide an
    attribute standing in for it."""
    return {name: record[name] for name in _RECORD_FIELDS if _usable(name, record.get(name))}


def _left_out(own: dict[str, Any], names: ReadNames) -> frozenset[str]:
    """The attribute names to leave out of a log record: those the parser would read for what
    the record itself has (a body, a severity, a time). Where it lacks one, as a Collector's
    filelog receiver leaves records whose JSON it parsed into attributes, those attributes are
    all there is, and they are read."""
    left_out: frozenset[str] = frozenset()
    if "body" in own:
        left_out |= names.message
    if "severityNumber" in own or "severityText" in own:
        left_out |= names.level
    if "timeUnixNano" in own:
        left_out |= names.time
    return left_out


# Attribute copies a batch may take: every log record gets its resource's attributes, so a small
# message of many empty records under a resource of thousands of attributes grew to gigabytes
# (a review: 61 KB of protobuf took 1.0 GB). Real batches take well under a tenth of this.
MAX_ATTRIBUTE_COPIES = 1_000_000
# Log records a batch may hold: an empty record is 2 bytes of protobuf (3 of JSON) and a few
# hundred in memory once read, so a 1 MB batch of them held 524,000 records and took 631 MB
# (a review). A real batch of 1 MB holds a few thousand.
MAX_LOG_RECORDS = 100_000


def _scope_logs(resource_logs: Any) -> list[Any]:
    """A ResourceLogs' ScopeLogs, under its name before OTLP 0.19 too (Collectors before 2022
    wrote `instrumentationLibraryLogs`; their batches were dead-lettered as having no records)."""
    return _list(resource_logs, "scopeLogs") or _list(resource_logs, "instrumentationLibraryLogs")


def _check_size(batch: dict[str, Any]) -> None:
    copies = records = 0
    for resource_logs in _list(batch, "resourceLogs"):
        resource = resource_logs.get("resource") if isinstance(resource_logs, dict) else None
        shared = len(_list(resource, "attributes"))
        for scope_logs in _scope_logs(resource_logs):
            for record in _list(scope_logs, "logRecords"):
                copies += shared + len(_list(record, "attributes"))
                records += 1
    check_records(records)
    if copies > MAX_ATTRIBUTE_COPIES:
        detail = f"an OTLP batch whose log records carry {copies:,} attributes in all (resource's included)"
        raise Rejected("oversized", f"{detail}, over {MAX_ATTRIBUTE_COPIES:,}")


def check_records(n: int) -> None:
    if n > MAX_LOG_RECORDS:
        raise Rejected("oversized", f"an OTLP batch of {n:,} log records, over {MAX_LOG_RECORDS:,}")


def flatten(batch: dict[str, Any], names: ReadNames) -> list[Any]:
    """Every log record of the batch, in order, as a flat object; an entry that is not an object
    is returned as it is, for the parser to reject with the others kept. An attribute named as
    the parser reads a message, level or time (`level`, `@t`, `MESSAGE`, ...) is left out where
    the record has its own (usable) body, severity or time, which then decide."""
    _check_size(batch)
    out: list[Any] = []
    for resource_logs in _list(batch, "resourceLogs"):
        resource = resource_logs.get("resource") if isinstance(resource_logs, dict) else None
        resource_attrs = _attributes(resource.get("attributes") if isinstance(resource, dict) else None)
        for scope_logs in _scope_logs(resource_logs):
            scope = (scope_logs.get("scope") or scope_logs.get("instrumentationLibrary")) if isinstance(scope_logs, dict) else None
            scope_name = scope.get("name") if isinstance(scope, dict) else None
            for record in _list(scope_logs, "logRecords"):
                if not isinstance(record, dict):
                    out.append(record)
                    continue
                attrs = {**resource_attrs, **_attributes(record.get("attributes"))}
                own = _own(record)
                left_out = _left_out(own, names)
                flat: dict[str, Any] = {k: v for k, v in attrs.items() if k not in left_out}
                if isinstance(scope_name, str) and scope_name:
                    flat["otel.scope.name"] = scope_name
                flat.update(own)
                out.append(flat)
    return out
