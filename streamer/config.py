"""Configuration: one YAML file, validated at start, with environment overrides for secrets.

Pydantic with `extra="forbid"` does the work of naming the offending key: a typo in
config.yaml stops the daemon before it connects anywhere, instead of being silently ignored.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

if TYPE_CHECKING:
    from models.calibration import CalibrationConfig

# Environment variables that override config values, so secrets need not sit in the file.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "STREAMER_BOOTSTRAP_SERVERS": ("kafka", "bootstrap_servers"),
    "STREAMER_SASL_PLAIN_USERNAME": ("kafka", "sasl_plain_username"),
    "STREAMER_SASL_PLAIN_PASSWORD": ("kafka", "sasl_plain_password"),
    "STREAMER_SSL_PASSWORD": ("kafka", "ssl_password"),
    "STREAMER_GROUP_INSTANCE_ID": ("consumer", "group_instance_id"),
}


class ConfigError(Exception):
    """A configuration problem, with the dotted key that caused it in the message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# Kafka's rule for topic names.
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _topic_name(v: str) -> str:
    if not _TOPIC.fullmatch(v) or v in (".", ".."):
        raise ValueError(f"{v!r} is not a legal Kafka topic name (1-249 of letters, digits, '.', '_', '-')")
    return v


TopicName = Annotated[str, AfterValidator(_topic_name)]


def check_bootstrap_servers(v: str | list[str]) -> str | list[str]:
    """`kafka.bootstrap_servers` as kafka-python will read it, or ValueError saying why not (it
    failed on these at start with a ValueError or IndexError traceback). Also `streamer train
    --bootstrap-servers`'s check."""
    from kafka.cluster import collect_hosts  # (kafka-python's own reading: IPv6, PLAINTEXT://)

    servers = v.split(",") if isinstance(v, str) else v
    if not servers:
        raise ValueError("no servers given")
    for server in servers:
        try:
            ((host, port, _family),) = collect_hosts([server], randomize=False)
        except ValueError:
            raise ValueError(f"{server!r} is not host:port") from None
        if not host or any(c.isspace() for c in host) or not 0 < port < 65536:
            raise ValueError(f"{server!r} is not host:port (several servers are separated by commas)")
    return v


class KafkaConfig(_Strict):
    """Connection options passed straight through to kafka-python (same names, same meaning)."""

    bootstrap_servers: str | list[str] = "127.0.0.1:9092"
    client_id: str = "streamer"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    sasl_kerberos_service_name: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None
    ssl_crlfile: str | None = None
    ssl_check_hostname: bool | None = None
    request_timeout_ms: int | None = Field(default=None, gt=0)

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, v: str | list[str]) -> str | list[str]:
        return check_bootstrap_servers(v)

    @field_validator("request_timeout_ms")
    @classmethod
    def _request_timeout(cls, v: int | None) -> int | None:
        # kafka-python's consumer wants it between its fetch wait (500 ms) and the idle time after
        # which it closes connections (540 s), and refused it at start naming neither.
        if v is not None and not 500 < v < 540_000:
            raise ValueError(f"{v} must be above 500 (the consumer's fetch wait) and below 540000 (its connections' idle limit)")
        return v

    @model_validator(mode="after")
    def _sasl(self) -> KafkaConfig:
        # kafka-python ignores SASL credentials under a protocol without SASL: a Secret of
        # credentials mounted beside a config left at PLAINTEXT connected unauthenticated.
        given = [k for k in ("sasl_plain_username", "sasl_plain_password") if getattr(self, k) is not None]
        if given and not self.security_protocol.startswith("SASL_"):
            raise ValueError(
                f"kafka.security_protocol is {self.security_protocol}, which sends no SASL credentials, but "
                f"kafka.{given[0]} is set: use SASL_SSL (or SASL_PLAINTEXT) with kafka.sasl_mechanism"
            )
        if self.security_protocol.startswith("SASL_") and self.sasl_mechanism is None:
            raise ValueError(f"kafka.sasl_mechanism is needed with kafka.security_protocol {self.security_protocol}")
        if self.sasl_mechanism is not None and not self.security_protocol.startswith("SASL_"):
            raise ValueError(
                f"kafka.sasl_mechanism is {self.sasl_mechanism} but kafka.security_protocol is {self.security_protocol}, "
                "which does no SASL: use SASL_SSL (or SASL_PLAINTEXT)"
            )
        # kafka-python checks these only when it connects, and the daemon then said only that it
        # could not reach the brokers (found by reading: a missing password looked like a network fault).
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            for key in ("sasl_plain_username", "sasl_plain_password"):
                if getattr(self, key) is None:
                    env = f"STREAMER_{key.upper()}"
                    raise ValueError(f"kafka.{key} (or {env}) is needed with kafka.sasl_mechanism {self.sasl_mechanism}")
        if self.sasl_mechanism == "OAUTHBEARER":
            raise ValueError(
                "kafka.sasl_mechanism OAUTHBEARER needs a token provider object (kafka-python's sasl_oauth_token_provider), "
                "which a config file cannot give: not supported; use SCRAM or PLAIN over SASL_SSL"
            )
        if self.sasl_mechanism == "GSSAPI" and importlib.util.find_spec("gssapi") is None:
            raise ValueError("kafka.sasl_mechanism GSSAPI needs the Python package gssapi (pip install gssapi) and a Kerberos setup")
        return self

    def client_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ConsumerConfig(_Strict):
    group_id: str = Field(default="streamer", min_length=1)
    group_instance_id: TopicName | None = None  # (Kafka's rule for it is the topic names' one)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = Field(default=10_000, gt=0)
    heartbeat_interval_ms: int = Field(default=3_000, gt=0)
    max_poll_interval_ms: int = Field(default=300_000, gt=0)
    max_poll_records: int = Field(default=5_000, gt=0)
    fetch_max_bytes: int = Field(default=52_428_800, gt=0)
    max_partition_fetch_bytes: int = Field(default=1_048_576, gt=0)
    poll_timeout_ms: int = Field(default=200, ge=0)

    @model_validator(mode="after")
    def _heartbeat(self) -> ConsumerConfig:
        # (kafka-python refuses it too, but at start and with a traceback that names no key.)
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(
                f"consumer.heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be below "
                f"consumer.session_timeout_ms ({self.session_timeout_ms})"
            )
        return self


class ProducerConfig(_Strict):
    acks: Literal["all", -1, 0, 1] = "all"  # (-1 is Kafka's own spelling of all)
    linger_ms: int = Field(default=5, ge=0)
    batch_size: int = Field(default=262_144, gt=0)
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    # (A floor above the largest score record, about 40 KB for a log line of control characters:
    # a record the producer refuses is retried for ever and holds its partition.)
    max_request_size: int = Field(default=4_194_304, ge=65_536)
    send_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("compression_type")
    @classmethod
    def _codec(cls, v: str | None) -> str | None:
        from kafka import codec

        if v is not None and not getattr(codec, f"has_{v}")():
            raise ValueError(f"{v} compression needs its library (python-{v} for kafka-python), which is not installed")
        return v


class TopicsConfig(_Strict):
    inputs: list[TopicName] = Field(default_factory=lambda: ["sensors"])
    # None: no score record per event, only the alerts (their records are the same); the scores
    # still reach the metrics. Producing one record per event is most of the daemon's Kafka work.
    scores: TopicName | None = "streamer.scores"
    alerts: TopicName = "streamer.alerts"
    dead_letter: TopicName = "streamer.dead-letter"

    @field_validator("scores")
    @classmethod
    def _not_python_none(cls, v: str | None) -> str | None:
        # YAML reads `None` as a string: the daemon would write every score to a topic of that
        # name (created on first send where brokers auto-create) instead of running alerts only.
        if v is not None and v.lower() == "none":
            raise ValueError(f"{v!r} would be a topic of that name; for alerts only (no score record per event) write null or ~")
        return v


class InputConfig(_Strict):
    max_message_bytes: int = Field(default=65_536, gt=0)
    max_stream_id_length: int = Field(default=256, gt=0)
    stream_field: str = "stream"


class LogsConfig(_Strict):
    """Topics of log lines (raw text or JSON), scored by the log sequence model."""

    topics: list[TopicName] = Field(default_factory=list)
    line_format: str = "plain"  # a preset (bgl, hdfs, syslog, rfc5424, thunderbird, logfmt, plain) or a regex with named groups
    stream_field: str = "service"  # the field (JSON key or named group) naming the stream, or "key"
    warmup: int = Field(default=50, ge=0)
    threshold: float = Field(default=4.0 / 6.0, gt=0.0, le=1.0)  # p <= 1e-4

    @field_validator("line_format")
    @classmethod
    def _format(cls, v: str) -> str:
        from streamer.logformats import line_format

        try:
            line_format(v)
        except Exception as err:  # noqa: BLE001 - any failure to build the format is a config error
            raise ValueError(f"not a preset and not a usable regex: {err}") from None
        return v


class DetectorConfig(_Strict):
    checkpoint: str | None = None  # None: the weights bundled in models/weights/default.pt
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    warmup: int = Field(default=100, ge=0)
    threshold: float = Field(default=0.5, gt=0.0, le=1.0)
    calibration_window: int = Field(default=1000, ge=2)
    calibration_long_window: int = Field(default=5000, ge=2)
    holdoff: int = Field(default=30, ge=0)
    holdoff_factor: float = Field(default=0.4, gt=0.0, le=1.0)
    recur_days: int = Field(default=2, ge=0)
    recur_margin: float = Field(default=1.0, ge=0.0)
    skip_duplicates: bool = True
    cpu_threads: int | None = Field(default=None, gt=0)  # None: half the cores, at most 8
    reload_check_s: float = Field(default=10.0, gt=0)

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: str | None, info: ValidationInfo) -> str | None:
        # (`streamer train` reads the config for its connection: the file may be what it is to write)
        if v is not None and (info.context or {}).get("checkpoint_must_exist", True) and not Path(v).is_file():
            raise ValueError(f"no checkpoint file at {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        # (`cuda:x` passed here and failed at start on a GPU host with torch's message, naming no key.)
        if v not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:[0-9]+", v):
            raise ValueError(f"{v!r} must be auto, cpu, cuda or cuda:N (N a device number)")
        return v

    @model_validator(mode="after")
    def _windows(self) -> DetectorConfig:
        if self.calibration_long_window < self.calibration_window:
            raise ValueError(
                f"detector.calibration_long_window ({self.calibration_long_window}) must be >= "
                f"detector.calibration_window ({self.calibration_window})"
            )
        return self

    def calibration(self) -> CalibrationConfig:
        """The core's decision settings (the daemon and `streamer nab` must agree on them)."""
        from models.calibration import CalibrationConfig  # here, so reading a config does not import torch

        return CalibrationConfig(
            warmup=self.warmup,
            threshold=self.threshold,
            window=self.calibration_window,
            long_window=self.calibration_long_window,
            holdoff=self.holdoff,
            holdoff_factor=self.holdoff_factor,
            recur_days=self.recur_days,
            recur_margin=self.recur_margin,
            skip_duplicates=self.skip_duplicates,
        )


class StateConfig(_Strict):
    dir: str = "state"
    snapshot_interval_s: float = Field(default=30.0, gt=0)
    # A snapshot further behind its partition's committed offset than this is not restored: the
    # replay to rebuild it would keep the member unready (a partition back on a host that owned
    # it weeks ago). None replays whatever the distance.
    max_replay_records: int | None = Field(default=1_000_000, ge=0)
    idle_evict_s: float = Field(default=86_400.0, gt=0)
    initial_capacity: int = Field(default=1024, gt=0)


class MetricsConfig(_Strict):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(default=9108, ge=0, le=65535)
    max_stall_s: float = Field(default=60.0, gt=0)


class Config(_Strict):
    kafka: KafkaConfig = KafkaConfig()
    consumer: ConsumerConfig = ConsumerConfig()
    producer: ProducerConfig = ProducerConfig()
    topics: TopicsConfig = TopicsConfig()
    logs: LogsConfig = LogsConfig()
    input: InputConfig = InputConfig()
    detector: DetectorConfig = DetectorConfig()
    state: StateConfig = StateConfig()
    metrics: MetricsConfig = MetricsConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @model_validator(mode="after")
    def _some_input(self) -> Config:
        if not self.topics.inputs and not self.logs.topics:
            raise ValueError("topics.inputs: no input topics (and no logs.topics either)")
        overlap = set(self.topics.inputs) & set(self.logs.topics)
        if overlap:
            raise ValueError(f"logs.topics: {sorted(overlap)} also in topics.inputs; a topic is either sensors or logs")
        read = {*self.topics.inputs, *self.logs.topics}
        for key in ("scores", "alerts", "dead_letter"):
            # (A dead-letter topic that is also an input read each bad record back as a bad record:
            # one became 1,590 dead letters in 24 s. Scores read back would be scored.)
            if getattr(self.topics, key) in read:
                raise ValueError(f"topics.{key}: {getattr(self.topics, key)} is also an input topic; the daemon would read its own output")
        # (One topic for two outputs wrote each anomaly twice into it, or dead-lettered raw bytes
        # among the score records its consumers parse.)
        outputs = [(key, getattr(self.topics, key)) for key in ("scores", "alerts", "dead_letter") if getattr(self.topics, key)]
        for i, (key, topic) in enumerate(outputs):
            for other, same in outputs[:i]:
                if topic == same:
                    raise ValueError(f"topics.{key}: {topic} is also topics.{other}; each output needs its own topic")
        return self


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        text = str(e.get("ctx", {}).get("error", "")) if e["type"] == "value_error" else ""
        if text and (not key or text.startswith(f"{key}.")):  # (a check across keys: its message names them)
            lines.append(text)
        else:  # (pydantic's "Value error, " prefix says nothing to the reader)
            lines.append(f"{key or '<root>'}: {text or msg}")
    return "; ".join(lines)


def build_config(data: dict[str, Any] | None, env: Mapping[str, str] | None = None, checkpoint_must_exist: bool = True) -> Config:
    """Validate a parsed mapping, apply environment overrides, raise ConfigError naming the key.
    `checkpoint_must_exist=False`: a `detector.checkpoint` that is not there yet is no error."""
    # (An empty section, `producer:` with nothing under it, is YAML's null: take its defaults.)
    data = {k: v for k, v in (data or {}).items() if not (v is None and k in Config.model_fields and k not in ("log_level", "log_format"))}
    environ: Mapping[str, str] = os.environ if env is None else env
    for var, (section, key) in ENV_OVERRIDES.items():
        if environ.get(var):
            sect = data.get(section) or {}
            if not isinstance(sect, dict):
                raise ConfigError(f"{section}: must be a mapping")
            data[section] = {**sect, key: environ[var]}
    try:
        return Config.model_validate(data, context={"checkpoint_must_exist": checkpoint_must_exist})
    except ValidationError as err:
        raise ConfigError(_format(err)) from None


class _DuplicateKey(Exception):
    pass


def _check_duplicates(node: yaml.Node, path: str = "", seen_nodes: set[int] | None = None) -> None:
    """YAML keeps the last of two equal keys and drops the first without a word: a second
    `detector:` section appended to the shipped config.yaml would silently undo the first. Read
    on the composed document, so that a nested key is named with its section (`detector.warmup`).
    (An alias repeats a node, and may contain itself: each node is read once.)"""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # (no setting has such a key; and printed, an aliased one can be huge)
                raise _DuplicateKey(f"{path or 'top level'}: a key that is not a plain name (line {key_node.start_mark.line + 1})")
            key = key_node.value
            name = f"{path}.{key}" if path else key
            if key_node.tag == "tag:yaml.org,2002:merge":  # (`<<:` may be given more than once)
                _check_duplicates(value_node, path, seen_nodes)
                continue
            if key in seen:
                raise _DuplicateKey(f"{name}: given twice (again at line {key_node.start_mark.line + 1}); YAML would keep only the last")
            seen.add(key)
            _check_duplicates(value_node, name, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{i}]", seen_nodes)


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None, checkpoint_must_exist: bool = True) -> Config:
    """Read and validate a YAML file (None: all defaults)."""
    if path is None:
        return build_config({}, env, checkpoint_must_exist)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"cannot read config file {path}: not UTF-8 (byte {err.start}: {err.object[err.start : err.start + 1]!r})"
        ) from None
    try:
        loader = yaml.SafeLoader(text)
        try:  # (as yaml.safe_load does, with the composed document checked before it is built)
            node = loader.get_single_node()
            if node is not None:
                _check_duplicates(node)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return build_config(data, env, checkpoint_must_exist)
