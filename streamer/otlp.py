"""OTLP/JSON log batches: one Kafka record holding many log records.

The OpenTelemetry Collector's Kafka exporter (`encoding: otlp_json`) writes one
ExportLogsServiceRequest per message: resourceLogs -> scopeLogs -> logRecords, with the
service's name and host in the resource's attributes, not in each record. Read as one JSON
log record, such a batch has no message and was dead-lettered whole. Here each log record
becomes a flat object in the shape of a single OpenTelemetry JSON record (`body`,
`timeUnixNano`, `severityNumber`, ...), with the resource's and the record's attributes as
top-level keys spelt as OpenTelemetry spells them (`service.name`), so the parser reads it
like any other JSON record and `logs.stream_field: service.name` names the stream.
"""

from __future__ import annotations

from typing import Any

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


def _attributes(items: Any, reserved: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(items, list):
        return out
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("key"), str):
            scalar = _any_value(item.get("value"))
            if scalar is not None and item["key"] not in reserved:
                out[item["key"]] = scalar
    return out


def _list(obj: Any, name: str) -> list[Any]:
    value = obj.get(name) if isinstance(obj, dict) else None
    return value if isinstance(value, list) else []


def flatten(batch: dict[str, Any], reserved: frozenset[str]) -> list[Any]:
    """Every log record of the batch, in order, as a flat object; an entry that is not an object
    is returned as it is, for the parser to reject with the others kept. Attributes named in
    `reserved` (every name the parser reads for a message, level or time: `level`, `@t`,
    `MESSAGE`, ...) are left out, so the record's own body, severity and time decide."""
    out: list[Any] = []
    for resource_logs in _list(batch, "resourceLogs"):
        resource = resource_logs.get("resource") if isinstance(resource_logs, dict) else None
        resource_attrs = _attributes(resource.get("attributes") if isinstance(resource, dict) else None, reserved)
        for scope_logs in _list(resource_logs, "scopeLogs"):
            scope = scope_logs.get("scope") if isinstance(scope_logs, dict) else None
            scope_name = scope.get("name") if isinstance(scope, dict) else None
            for record in _list(scope_logs, "logRecords"):
                if not isinstance(record, dict):
                    out.append(record)
                    continue
                flat: dict[str, Any] = dict(resource_attrs)
                if isinstance(scope_name, str) and scope_name:
                    flat["otel.scope.name"] = scope_name
                flat.update(_attributes(record.get("attributes"), reserved))
                for name in _RECORD_FIELDS:
                    if name in record:
                        flat[name] = record[name]
                out.append(flat)
    return out
