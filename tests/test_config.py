"""Config errors fail fast and name the key; environment variables override secrets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from streamer.config import ConfigError, build_config, load_config


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("consumer:\n  max_poll_records: lots\n", "consumer.max_poll_records"),
        # (strict types, as config.yaml promises: these were taken as 500 and 1.0)
        ("consumer:\n  max_poll_records: '500'\n", "consumer.max_poll_records"),
        ("metrics:\n  max_stall_s: true\n", "metrics.max_stall_s"),
        ("kafka:\n  bootstrap_server: x:9092\n", "kafka.bootstrap_server"),
        ("detector:\n  threshold: 2.0\n", "detector.threshold"),
        ("topics:\n  inputs: []\n", "topics.inputs"),
        ("metrics:\n  port: 70000\n", "metrics.port"),
        ("detector:\n  calibration_long_window: 500\n", "detector.calibration_long_window"),
        ("detector:\n  holdoff_factor: 0\n", "detector.holdoff_factor"),
        ("surprise_section: {}\n", "surprise_section"),
        # YAML keeps the last of two equal keys: the first section was silently dropped.
        ("detector:\n  threshold: 0.8\nmetrics: {}\ndetector:\n  warmup: 5\n", "detector: given twice"),
        ("detector:\n  threshold: 0.8\n  threshold: 0.9\n", "detector.threshold: given twice"),
        # Accepted here before, then refused by kafka-python at start with a traceback.
        ("consumer:\n  session_timeout_ms: 1000\n  heartbeat_interval_ms: 5000\n", "consumer.heartbeat_interval_ms"),
        ("topics:\n  inputs: ['bad topic!']\n", "topics.inputs"),
        ("topics:\n  scores: ''\n", "topics.scores"),
        # YAML's null is null or ~; None was a topic named "None", not alerts only.
        ("topics:\n  scores: None\n", "topics.scores"),
        ("logs:\n  topics: ['..']\n", "logs.topics"),
        ("detector:\n  checkpoint: /nonexistent/model.pt\n", "detector.checkpoint"),
        # (credentials that kafka-python would silently not send)
        ("kafka:\n  sasl_plain_username: u\n  sasl_plain_password: p\n", "kafka.security_protocol"),
        ("kafka:\n  security_protocol: SASL_SSL\n", "kafka.sasl_mechanism"),
        # (kafka-python checks these only when it connects: they read as unreachable brokers)
        ("kafka:\n  sasl_mechanism: PLAIN\n", "kafka.sasl_mechanism is PLAIN but kafka.security_protocol is PLAINTEXT"),
        ("kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: PLAIN\n", "kafka.sasl_plain_username"),
        ("kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: SCRAM-SHA-512\n  sasl_plain_username: u\n", "kafka.sasl_plain_password"),
        ("kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: OAUTHBEARER\n", "kafka.sasl_mechanism OAUTHBEARER"),
        ("kafka:\n  security_protocol: SASL_PLAINTEXT\n  sasl_mechanism: GSSAPI\n", "kafka.sasl_mechanism GSSAPI needs"),
        # From a review: exit 1 with tracebacks (ValueError, IndexError) or blaming the brokers.
        ("kafka:\n  bootstrap_servers: '127.0.0.1:notaport'\n", "kafka.bootstrap_servers"),
        ("kafka:\n  bootstrap_servers: ':::'\n", "kafka.bootstrap_servers"),
        ("kafka:\n  bootstrap_servers: []\n", "kafka.bootstrap_servers"),
        ("kafka:\n  bootstrap_servers: 'a:9092,'\n", "kafka.bootstrap_servers"),
        ("kafka:\n  bootstrap_servers: 'kafka:9092 kafka2:9092'\n", "kafka.bootstrap_servers"),
        ("kafka:\n  request_timeout_ms: 400\n", "kafka.request_timeout_ms"),
        ("kafka:\n  request_timeout_ms: 600000\n", "kafka.request_timeout_ms"),
        ("consumer:\n  group_id: ''\n", "consumer.group_id"),
        ("consumer:\n  group_instance_id: 'pod name/1'\n", "consumer.group_instance_id"),
        ("producer:\n  max_request_size: 1000\n", "producer.max_request_size"),
        # (the daemon read its own dead letters back: one bad record became thousands)
        ("topics:\n  inputs: [a]\n  dead_letter: a\n", "topics.dead_letter"),
        ("topics:\n  inputs: [a]\n  scores: a\n", "topics.scores"),
        ("topics:\n  inputs: [a]\n  alerts: b\nlogs:\n  topics: [b]\n", "topics.alerts"),
        # (a review: each anomaly written twice into one topic, raw dead letters among scores;
        # a device torch refused at start on a GPU host, naming no key)
        ("topics:\n  scores: out\n  alerts: out\n", "topics.alerts: out is also topics.scores"),
        ("topics:\n  alerts: x\n  dead_letter: x\n", "topics.dead_letter: x is also topics.alerts"),
        ("detector:\n  device: 'cuda:x'\n", "detector.device: 'cuda:x' must be"),
        ("detector:\n  device: 'cuda:'\n", "detector.device"),
        ("detector:\n  device: 'cuda:\u0663'\n", "detector.device"),  # (an Arabic-Indic three, which a regex's digit class took)
        # (a review of the duplicate check: a RecursionError traceback; an aliased complex key
        # printed in full, minutes and gigabytes for a small file)
        ("a: " + "[" * 2000 + "]" * 2000 + "\n", "nested too deeply"),
        ("? [1, 2]\n: 3\n", "top level: a key that is not a plain name"),
    ],
)
def test_bad_config_names_the_key(tmp_path, yaml_text, key):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(path, env={})
    assert "<root>" not in str(err.value) and "Value error" not in str(err.value), err.value


def test_yaml_merge_keys_are_not_taken_for_duplicates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("detector:\n  <<: {warmup: 5}\n  <<: {threshold: 0.6}\n")
    config = load_config(path, env={}, checkpoint_must_exist=False)
    assert (config.detector.warmup, config.detector.threshold) == (5, 0.6)


def test_cli_exits_2_naming_the_key_before_connecting(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("consumer:\n  sesion_timeout_ms: 1000\n")
    proc = subprocess.run([sys.executable, "-m", "streamer.cli", "run", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "consumer.sesion_timeout_ms" in proc.stderr


def test_a_compression_codec_without_its_library_is_a_config_error(monkeypatch):
    """config.yaml lists snappy, lz4 and zstd; kafka-python needs an extra library for each and
    failed at start with a RuntimeError that named no key. (They are dependencies now, so a
    missing one is simulated.)"""
    from kafka import codec

    monkeypatch.setattr(codec, "has_lz4", lambda: False)
    with pytest.raises(ConfigError, match=r"producer\.compression_type"):
        build_config({"producer": {"compression_type": "lz4"}}, env={})
    assert build_config({"producer": {"compression_type": "gzip"}}, env={}).producer.compression_type == "gzip"


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_batches_compressed_with_any_codec_can_be_read(codec):
    """Another producer of the input topic may compress with any codec Kafka has (the topic's
    default compression.type=producer keeps its batches as they came); without the codec's
    library kafka-python's poll() raised on the first such batch and the daemon stopped. This
    reads a batch as the consumer's fetcher does."""
    from kafka.record import MemoryRecords, MemoryRecordsBuilder
    from kafka.record.default_records import DefaultRecordBatch

    builder = MemoryRecordsBuilder(magic=2, compression_type=getattr(DefaultRecordBatch, f"CODEC_{codec.upper()}"), batch_size=1 << 20)
    values = [b'{"stream": "pump", "values": {"rpm": %d}}' % i for i in range(50)]
    for v in values:
        builder.append(timestamp=None, key=b"pump", value=v, headers=[])
    builder.close()
    batch = MemoryRecords(builder.buffer()).next_batch()
    assert batch.compression_type != 0
    assert [r.value for r in batch] == values
    assert build_config({"producer": {"compression_type": codec}}, env={}).producer.compression_type == codec


def test_repo_config_is_valid_and_documents_every_option():
    config = load_config("config.yaml", env={})
    text = Path("config.yaml").read_text()
    for section, model in config:
        if isinstance(model, BaseModel):
            for name in type(model).model_fields:
                assert f"{name}:" in text, f"{section}.{name} missing from config.yaml"
        else:
            assert f"{section}:" in text


def test_environment_overrides_bootstrap_and_secrets():
    config = build_config(
        {"kafka": {"bootstrap_servers": "file:9092", "security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}},
        env={"STREAMER_BOOTSTRAP_SERVERS": "env:9092", "STREAMER_SASL_PLAIN_USERNAME": "u", "STREAMER_SASL_PLAIN_PASSWORD": "s3cret"},
    )
    assert config.kafka.bootstrap_servers == "env:9092"
    assert config.kafka.client_options()["sasl_plain_password"] == "s3cret"


def _run_exits(tmp_path, config: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "c.yaml"
    path.write_text(config)
    cmd = [sys.executable, "-m", "streamer.cli", "run", "--config", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_a_state_dir_or_checkpoint_the_daemon_cannot_use_is_an_error_naming_the_key(tmp_path):
    """A state dir that is a file (or read-only) and a checkpoint that is not one stopped the
    daemon with tracebacks naming neither the setting nor, for the checkpoint, the file."""
    (tmp_path / "file").write_text("not a directory")
    proc = _run_exits(tmp_path, f"state:\n  dir: {tmp_path / 'file'}\n")
    # (exit 1, not 2: a volume not mounted yet looks the same, and a supervisor should retry it)
    assert proc.returncode == 1 and "cannot start: state.dir" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    proc = _run_exits(tmp_path, f"state:\n  dir: {tmp_path / 'state'}\ndetector:\n  checkpoint: {tmp_path / 'bad.pt'}\n")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"config error: detector.checkpoint: {tmp_path / 'bad.pt'}" in proc.stderr


def test_a_metrics_port_in_use_is_an_error_naming_the_key(broker, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = f"kafka:\n  bootstrap_servers: {broker.bootstrap}\nstate:\n  dir: {tmp_path / 'state'}\n"
        proc = _run_exits(tmp_path, config + f"metrics:\n  host: 127.0.0.1\n  port: {port}\n")
    assert proc.returncode == 1 and f"cannot start: metrics.port: cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_cuda_device_that_is_not_there_is_a_start_up_error_not_a_config_error(monkeypatch):
    """`cuda` without CUDA, and `cuda:N` past the devices visible (a device plugin or driver not
    ready yet), stop the start with exit 1, which supervisors retry. The second failed later, in
    the checkpoint load, as a `detector.checkpoint` config error (exit 2, never retried). The
    CUDA runtime is faked: this machine has none."""
    import torch

    from streamer.app import resolve_device

    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(RuntimeError, match="'cuda:2' but only 2 CUDA devices are visible"):
        resolve_device("cuda:2")
    assert resolve_device("cpu") == torch.device("cpu")


def test_brokers_that_do_not_answer_at_start_are_an_error_naming_the_key(tmp_path):
    """No broker reachable at start (the cluster still starting): the daemon gave up after the
    client's ~30 s bootstrap with a traceback; now exit 1 (retried by supervisors) naming the key."""
    import socket

    with socket.socket() as closed:  # (a port nothing listens on)
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config = f"kafka:\n  bootstrap_servers: 127.0.0.1:{port}\nstate:\n  dir: {tmp_path / 'state'}\nmetrics:\n  enabled: false\n"
    proc = _run_exits(tmp_path, config, timeout=120)
    assert proc.returncode == 1 and f"cannot start: kafka.bootstrap_servers: cannot connect to 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_settings_a_review_found_taken_wrongly_or_with_a_traceback(tmp_path):
    """An empty section is YAML's null: its defaults (it was "Input should be a valid
    dictionary"); Kafka's -1 for acks=all; a config file that is not UTF-8 (a traceback)."""
    path = tmp_path / "c.yaml"
    path.write_text("producer:\nconsumer:\n  group_id: g\n")
    config = load_config(path, env={})
    assert config.producer.acks == "all" and config.consumer.group_id == "g"
    assert build_config({"producer": {"acks": -1}}, env={}).producer.acks == -1
    for servers in ("[::1]:9092,b:9093,c", "fe80::abcd", "2001:db8::a", "PLAINTEXT://kafka", ["a:1", "b"]):
        assert build_config({"kafka": {"bootstrap_servers": servers}}, env={})  # (as kafka-python reads them)
    path.write_bytes("detector:\n  device: cpu  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, env={})


def test_a_client_setting_a_start_cannot_use_names_the_key(tmp_path):
    """An SSL file not there (a Secret not mounted yet) was ~30 s of failed connections blamed on
    the brokers; a state bank too large to allocate was a torch traceback."""
    config = f"state:\n  dir: {tmp_path / 'state'}\nmetrics:\n  enabled: false\n"
    proc = _run_exits(tmp_path, config + f"kafka:\n  ssl_cafile: {tmp_path / 'no-ca.pem'}\n  security_protocol: SSL\n")
    assert proc.returncode == 1 and f"cannot start: kafka.ssl_cafile: cannot read {tmp_path / 'no-ca.pem'}" in proc.stderr, proc.stderr
    proc = _run_exits(tmp_path, config.replace("state:\n", "state:\n  initial_capacity: 100000000000\n"))
    assert proc.returncode == 1 and "cannot start: state.initial_capacity" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
