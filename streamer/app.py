"""Wiring: config to a running daemon (model on its device, transport, metrics, signals)."""

from __future__ import annotations

import faulthandler
import hashlib
import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from kafka.errors import KafkaConfigurationError, KafkaError

from models.detector import Detector
from models.gru import DEFAULT_WEIGHTS, StreamGRU, load_checkpoint
from streamer.config import Config, ConfigError
from streamer.loop import Runner
from streamer.metrics import Metrics
from streamer.sdnotify import Notifier
from streamer.transport import KafkaPythonTransport, Transport

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"detector.device is {name!r} but CUDA is not available")
    device = torch.device(name)
    # (A missing index failed later, in the checkpoint load, as a config error: exit 2, which
    # no supervisor retries, for what is usually a driver or device plugin not ready yet.)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"detector.device is {name!r} but only {torch.cuda.device_count()} CUDA devices are visible")
    return device


def load_model(config: Config, device: torch.device | None = None) -> tuple[StreamGRU, dict[str, Any], torch.device]:
    """The configured checkpoint (or the bundled one) on the configured device, plus metadata."""
    path = Path(config.detector.checkpoint) if config.detector.checkpoint else DEFAULT_WEIGHTS
    device = device or resolve_device(config.detector.device)
    data = path.read_bytes()  # once: the version names the bytes that were loaded, even mid-swap
    model, meta = load_checkpoint(path, device, data)
    digest = hashlib.sha256(data).hexdigest()[:12]
    meta["model_version"] = f"{meta.get('training', {}).get('name', path.stem)}-{digest}"
    meta["checkpoint"] = str(path)
    return model, meta, device


class CheckpointWatcher:
    """Notices a replaced checkpoint file and loads it.

    A file counts as replaced when its inode, size, mtime or ctime changed: two trainings of one
    architecture write files of identical size, and cp -p, rsync -a or an image build can keep
    the mtime, but a rename or a rewrite always gives a new inode or ctime (so does a chmod,
    which is how a file that could not be read gets another chance)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.path = Path(config.detector.checkpoint) if config.detector.checkpoint else DEFAULT_WEIGHTS
        # Taken before the first load (build_runner makes the watcher first): a file replaced
        # while the daemon starts is then noticed, not taken for the one that was loaded.
        self._seen = self._stamp()
        self.failures = 0  # loads refused since start (a bad file is tried once per change)
        # Whether the file now at the path is not the model served: refused, or gone. A restart
        # would then fail, although the running daemon is fine.
        self.refused = False

    def _stamp(self) -> tuple[int, ...] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def poll(self) -> tuple[StreamGRU, dict[str, Any]] | None:
        stamp = self._stamp()
        if stamp == self._seen:
            return None
        self._seen = stamp
        if stamp is None:
            # Not fatal now (the model is in memory), but a restart would refuse the config.
            self.refused = True
            log.warning("checkpoint %s is gone; serving the loaded model, but a restart will fail until it is back", self.path)
            return None
        try:
            model, meta, _device = load_model(self.config)
        except Exception as err:  # noqa: BLE001 - a half-written or bad file must not stop the daemon
            self.failures += 1
            self.refused = True
            log.error("new checkpoint %s could not be loaded, keeping the current model: %s: %s", self.path, type(err).__name__, err)
            return None
        self.refused = False
        return model, meta


class StartupError(Exception):
    """The environment is not ready for what the config names (a volume not mounted yet, a GPU
    driver still loading, a port the previous instance has not released): exit 1, which a
    supervisor retries, unlike a config error (exit 2), which only an edit fixes."""


def build_detector(config: Config) -> tuple[Detector, dict[str, Any]]:
    """The detector for the configured device and checkpoint, loaded before any Kafka client is
    built. Raises StartupError (a missing device, a file it cannot read) or ConfigError (a file
    that is not a checkpoint), each naming the key, not a traceback."""
    try:
        device = resolve_device(config.detector.device)
    except RuntimeError as err:
        raise StartupError(str(err)) from None
    checkpoint = config.detector.checkpoint or DEFAULT_WEIGHTS
    try:
        model, meta, device = load_model(config, device)
    except OSError as err:
        raise StartupError(f"detector.checkpoint: cannot read {checkpoint}: {err.strerror or err}") from None
    except Exception as err:  # noqa: BLE001 - a file that does not load as a checkpoint is the setting's problem
        raise ConfigError(f"detector.checkpoint: {checkpoint}: {type(err).__name__}: {err}") from None
    if device.type == "cpu":
        # The per-wavefront tensors are small: extra intra-op threads only fight the Kafka
        # client's network thread for cores.
        torch.set_num_threads(config.detector.cpu_threads or max(1, min(8, (os.cpu_count() or 2) // 2)))
    try:
        return Detector(model, config.detector.calibration(), device, capacity=config.state.initial_capacity), meta
    except (RuntimeError, MemoryError) as err:  # (torch's out of memory, on the CPU or a GPU; a device error)
        text = str(err)
        if isinstance(err, MemoryError) or "alloc" in text or "out of memory" in text:
            raise StartupError(
                f"state.initial_capacity: cannot hold {config.state.initial_capacity:,} streams' state on {device}: {text[:200]}"
            ) from None
        raise StartupError(f"detector.device: {device}: {text[:300]}") from None


def build_runner(config: Config, metrics: Metrics, transport: Transport | None = None) -> Runner:
    watcher = CheckpointWatcher(config)
    detector, meta = build_detector(config)
    publish_model(metrics, detector, meta)
    if transport is None:
        try:
            transport = KafkaPythonTransport(config)
        except KafkaConfigurationError as err:  # (what the config's own checks did not foresee)
            raise ConfigError(f"kafka: a setting the Kafka client refuses: {err}") from None
        except KafkaError as err:
            # (No broker answered within the client's timeout, or one refused us: the brokers may
            # be starting, as the unit's retries expect, so exit 1 with the key, not a traceback.)
            servers = config.kafka.bootstrap_servers
            servers = ",".join(servers) if isinstance(servers, list) else servers
            why = str(err) if str(err).startswith(type(err).__name__) else f"{type(err).__name__}: {err}"
            raise StartupError(f"kafka.bootstrap_servers: cannot connect to {servers}: {why}") from None
    runner = Runner(config, transport, detector, metrics, meta)
    runner.watcher = watcher
    return runner


def publish_model(metrics: Metrics, detector: Detector, meta: dict[str, Any]) -> None:
    metrics.model_loaded.set_to_current_time()
    metrics.model.info(
        {
            "version": meta["model_version"],
            "checkpoint": meta["checkpoint"],
            "device": str(detector.device),
            "hidden": str(detector.model.config.hidden),
            "max_features": str(detector.max_features),
        }
    )


def check_environment(config: Config) -> None:
    """The state dir must be writable before the daemon joins its group (it was a traceback,
    after the Kafka clients had connected). Raises StartupError naming the key: a volume may
    not be mounted yet."""
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile") if config.kafka.security_protocol.endswith("SSL") else ():
        # (kafka-python failed each connection attempt for ~30 s and the start was blamed on the
        # brokers; a Secret not mounted yet is exit 1, retried.)
        path = getattr(config.kafka, key)
        if path is not None and not os.access(path, os.R_OK):
            raise StartupError(f"kafka.{key}: cannot read {path}")
    state = Path(config.state.dir) / config.consumer.group_id
    try:
        state.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=state):
            pass
    except OSError as err:
        raise StartupError(f"state.dir: cannot write snapshots under {state}: {err.strerror or err}") from None


def run_daemon(config: Config) -> int:
    """`streamer run`: serve metrics, consume until SIGTERM/SIGINT, drain, exit 0 (1 when the
    stop could not write a partition's state)."""
    check_environment(config)
    metrics = Metrics()
    runner = build_runner(config, metrics)
    if config.metrics.enabled:
        try:
            port = metrics.serve(config.metrics.host, config.metrics.port, runner.health)
        except OSError as err:
            runner.transport.close()
            where = f"{config.metrics.host}:{config.metrics.port}"
            raise StartupError(f"metrics.port: cannot listen on {where}: {err.strerror or err}") from None
        log.info("serving /metrics, /healthz and /readyz on %s:%d", config.metrics.host, port)
    install_signal_handlers(runner.stop)
    # Under systemd (Type=notify): READY=1 once the loop runs, the watchdog from the loop itself.
    # The watchdog's SIGABRT then leaves every thread's traceback in the journal.
    runner.notifier = Notifier.from_env()
    if runner.notifier.watchdog_s is not None:
        faulthandler.enable()
        log.info("pinging the service manager's watchdog (%gs) from the processing loop", runner.notifier.watchdog_s)
        if (warning := watchdog_warning(config, runner.notifier.watchdog_s)) is not None:
            log.warning(warning)
    log.info(
        "consuming %s as group %s",
        ", ".join([*(f"{t} (sensors)" for t in config.topics.inputs), *(f"{t} (logs)" for t in config.logs.topics)]),
        config.consumer.group_id,
    )
    runner.run()
    if runner.unsaved_at_stop:
        log.error(
            "stopped without writing the state of %d partitions (see the errors above; state.dir %s): the next start "
            "replays their events from the previous snapshots",
            runner.unsaved_at_stop,
            config.state.dir,
        )
        return 1
    return 0


def watchdog_warning(config: Config, watchdog_s: float) -> str | None:
    """Why the watchdog could kill a daemon that is only waiting out a broker outage, or None.
    The loop pings between send attempts; one attempt can wait twice producer.send_timeout_s
    (the block for a new topic's metadata, then the flush), and the broker probe (2 s) and
    back-off (at most 5 s) follow it before the next ping."""
    longest = 2 * config.producer.send_timeout_s + 7.0
    if longest < watchdog_s:
        return None
    return (
        f"producer.send_timeout_s={config.producer.send_timeout_s:g}: a send waiting out a broker outage can go "
        f"{longest:g}s between watchdog pings, past the service manager's {watchdog_s:g}s, which would kill and "
        "restart the daemon during the outage; lower producer.send_timeout_s or raise WatchdogSec"
    )


def takes_sigint() -> bool:
    """Whether an interactive command (`train`, `demo`) may take Ctrl-C for itself: only from
    the main thread (others cannot set handlers), and not where SIGINT was ignored when the
    process started (a script's background job), which Python keeps and so do we."""
    return threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def install_signal_handlers(stop: Any) -> None:
    """SIGTERM, SIGINT and SIGHUP (a closed terminal, or a supervisor's stop) drain and exit 0.
    A second one at least a second later exits at once (128 + the signal, as a shell reports it):
    a drain waiting out a broker outage can take send_timeout_s and more, and an operator who
    asks twice means now. (Within a second it is a duplicate: a closing terminal's SIGHUP can
    come from the kernel and from the shell.) Nothing is lost either way: what was not committed
    is read again by the next run."""
    if threading.current_thread() is not threading.main_thread():
        return
    asked: list[float] = []

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if asked and time.monotonic() - asked[0] < 1.0:
            return
        if asked:
            log.warning("received %s again, exiting without draining; uncommitted events are read again on restart", name)
            logging.shutdown()
            os._exit(128 + signum)
        asked.append(time.monotonic())
        log.info("received %s, draining", name)
        stop()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)
