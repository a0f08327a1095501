"""Running the API: ``kvmlet serve`` and ``kvmlet-firecracker`` share this.

The event loop starts first and the API socket answers before any VM exists; a config file, if given,
is applied and the VM booted at once, as Firecracker's ``--config-file`` does. The process ends on
SIGTERM or SIGINT, and, with ``exit_with_vm`` (Firecracker's behaviour), when the guest ends.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmlet.errors import KvmletError

if TYPE_CHECKING:
    from kvmlet.migration.params import ListenOptions

LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "warn": logging.WARNING, "info": logging.INFO,
          "debug": logging.DEBUG, "trace": logging.DEBUG, "off": logging.CRITICAL + 10}


@dataclass
class ServeOptions:
    api_sock: Path | None
    config_file: Path | None = None
    instance_id: str = "anonymous-instance"
    log_path: str | None = None
    level: str = "Info"
    show_level: bool = False
    show_log_origin: bool = False
    metrics_path: str | None = None
    max_payload: int = 51200
    exit_with_vm: bool = False
    console: str | None = None
    boot_timer: bool = False
    started_at: float | None = None
    migrate_listen: ListenOptions | None = None   # wait for an incoming migration (kvmlet extension)


class LogFormatter(logging.Formatter):
    """Firecracker's line: ``<time> [<id>:<thread>[:LEVEL][:file:line]] message``."""

    def __init__(self, instance_id: str, show_level: bool, show_origin: bool) -> None:
        super().__init__()
        self.instance_id, self.show_level, self.show_origin = instance_id, show_level, show_origin

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        nanos = int((record.created % 1) * 1e9)
        tags = [self.instance_id, record.threadName or "main"]
        if self.show_level:
            tags.append(record.levelname.replace("WARNING", "WARN"))
        if self.show_origin:
            tags.append(f"{record.filename}:{record.lineno}")
        return f"{stamp}.{nanos:09d} [{':'.join(tags)}] {record.getMessage()}"


class LogFileHandler(logging.Handler):
    """Log lines to a file or a FIFO opened read-write and non-blocking, as Firecracker opens its log: a
    FIFO nobody reads never blocks kvmlet; lines that do not fit are dropped and counted."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        self.missed = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode())
        except BlockingIOError:
            self.missed += 1
        except OSError:
            self.missed += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()


def configure_logging(instance_id: str, path: str | None, level: str, show_level: bool, show_origin: bool) -> None:
    """kvmlet's log to ``path`` (stderr without one), leveled, in Firecracker's format."""
    handler: logging.Handler = LogFileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(instance_id, show_level, show_origin))
    root = logging.getLogger("kvmlet")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level.lower(), logging.INFO))
    root.propagate = False


def serve(options: ServeOptions) -> int:
    """Serve the API until a signal (or the VM's end, with ``exit_with_vm``); the process exit status."""
    started = options.started_at if options.started_at is not None else time.perf_counter()
    import msgspec

    from kvmlet.api.controller import Vmm
    from kvmlet.api.server import ApiServer, bind_api_socket
    from kvmlet.config import Metrics, load_config_file
    from kvmlet.eventloop import EventLoopThread
    from kvmlet.process import raise_open_file_limit
    from kvmlet.vcpu_kick import install_kick_handler

    install_kick_handler()   # on the main thread, before any VM is built from an API worker thread
    raise_open_file_limit()
    configure_logging(options.instance_id, options.log_path, options.level, options.show_level,
                      options.show_log_origin)
    log = logging.getLogger("kvmlet.api")
    done = threading.Event()
    exit_code = [0]

    def vm_ended(status: object) -> None:
        from kvmlet.machine import ExitStatus

        if isinstance(status, ExitStatus):
            log.info("the VM stopped: %s", status.message)
            if options.exit_with_vm:
                exit_code[0] = status.code if status.code != 130 else 0
                done.set()

    events = EventLoopThread("kvmlet-api-events")
    vmm = Vmm(events, instance_id=options.instance_id, on_exit=vm_ended)
    vmm.preloaded.clear()   # changes wait for the preload thread: two threads importing one package can race
    vmm.boot_timer = options.boot_timer
    writer = None
    server = None
    bound: Path | None = None    # the socket path this process created (and removes at the end)
    try:
        # the socket is bound first (a bad path fails before anything else), but answers only once the
        # command line's configuration is in place, so no client ever sees a half-applied start-up
        listener = bind_api_socket(options.api_sock) if options.api_sock is not None else None
        bound = options.api_sock
        events.start()
        from kvmlet.api.metrics import MetricsWriter

        def start_metrics(metrics: Metrics) -> None:
            nonlocal writer
            writer = MetricsWriter(vmm, metrics.metrics_path, events)
            vmm.metrics_sink = writer.flush
            writer.start()

        vmm.metrics_hook = start_metrics
        vmm.logger_sink = lambda logger: configure_logging(
            options.instance_id, logger.log_path, logger.level, logger.show_level, logger.show_log_origin)
        if options.console is not None:
            vmm.config = msgspec.structs.replace(vmm.config, console=options.console)
        if options.metrics_path is not None:
            vmm.put_metrics(Metrics(metrics_path=options.metrics_path))
        if options.config_file is not None:
            config = load_config_file(options.config_file)
            if options.console is not None:
                config = msgspec.structs.replace(config, console=options.console)
            if config.logger is not None:
                vmm.put_logger(config.logger)
            if config.metrics is not None and vmm.config.metrics is None:
                vmm.put_metrics(config.metrics)
            vmm.config = msgspec.structs.replace(config, metrics=vmm.config.metrics, logger=vmm.config.logger)
            vmm.instance_start()
        if options.migrate_listen is not None:
            vmm.migration_listen(options.migrate_listen)
        if listener is not None:
            server = ApiServer(vmm, listener, max_payload=options.max_payload)
            events.run_coroutine(server.start()).result(10)
            log.info("Listening on API socket (%s).", options.api_sock)
        vmm.startup_us = int((time.perf_counter() - started) * 1e6)
        threading.Thread(target=_preload, args=(vmm,), name="kvmlet-preload", daemon=True).start()
    except KvmletError as exc:
        print(f"kvmlet: {exc}", file=sys.stderr)
        _shutdown(vmm, server, events, bound)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    if writer is not None:
        writer.close()
    _shutdown(vmm, server, events, bound)
    return exit_code[0]


def _preload(vmm: Any) -> None:
    try:
        from kvmlet.machine.builder import preload
        from kvmlet.migration.control import preload as preload_migration
        from kvmlet.snapshot.restore import preload as preload_restore

        preload()
        preload_restore()
        preload_migration()
    finally:
        vmm.preloaded.set()


def _shutdown(vmm: object, server: object, events: object, api_sock: Path | None) -> None:
    from kvmlet.api.controller import Vmm
    from kvmlet.api.server import ApiServer
    from kvmlet.eventloop import EventLoopThread

    assert isinstance(vmm, Vmm) and isinstance(events, EventLoopThread)
    try:
        vmm.close()
    except KvmletError as exc:
        print(f"kvmlet: {exc}", file=sys.stderr)
    if isinstance(server, ApiServer) and events.running:
        try:
            events.run_coroutine(server.close()).result(5)
        except Exception as exc:
            print(f"kvmlet: closing the API server: {exc}", file=sys.stderr)
    events.stop()
    if api_sock is not None:
        api_sock.unlink(missing_ok=True)
