"""Fuzz target for the virtio-mmio transport and every virtio device kvmlet has (rng, blk, vsock, net).

An input is a program for a hostile driver. Its first byte picks the device, the second its options (a
rate limiter, a read-only or O_DIRECT drive, one or two net queue pairs, offloads), the third whether it
starts with a proper initialization; then each operation takes a few bytes:

* the driver's initialization (virtio 1.2, 3.1.1) with features chosen from the input, or any part of it:
  status bits in any order, feature words, queue setups whose rings lie in RAM, across the end of a RAM
  region, in the hole between the two regions, beyond RAM, at addresses that wrap, misaligned, or over
  each other, with any size;
* descriptor chains built for the device (blk requests, vsock packets, net frames and control commands,
  rng and receive buffers), direct or through an indirect table, then perhaps damaged (addresses,
  lengths, flags, next indices, loops, table lengths, nested tables), published on the available ring
  (or with a wrong head, twice, with the index moved far) and notified;
* raw register reads and writes of any offset and width, configuration space accesses, interrupt
  acknowledgements, device resets, scribbles over the rings and guest memory;
* host events: connections and data from the vsock host side, frames into the TAP, and time passing
  (timers and rate limiters run on a virtual clock).

Each case runs on a fresh transport and device, synchronously (``device_rig.SyncLoop``), and checks the
invariants of ``device_checks`` after every operation. At the end the device is reset, initialized
properly and must serve a well-formed request (it recovers from whatever the case did); then it is
closed, and no file descriptor, socket file or byte of the disk image's size may have changed, nor the
guard pages around guest RAM (``device_rig.Canaries``).

Run without atheris (random inputs, deterministic: case I of seed S is always the same input)::

    python tests/fuzz/fuzz_devices.py --random 1000000 --seed 1 --jobs 2

``--device rng|blk|vsock|net`` restricts the cases to one device, ``--case I`` replays one case,
``--input FILE`` runs one input file, ``--artifacts DIR`` keeps the input of each new kind of failure.
With atheris installed (it is not a dependency), without ``--random``, it runs coverage guided;
libFuzzer's options apply, and a corpus of random-mode inputs is a good start::

    python tests/fuzz/fuzz_devices.py --write-corpus /tmp/corpus --count 500
    python tests/fuzz/fuzz_devices.py -max_len=2048 -runs=200000 /tmp/corpus
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from kvmlet.memory import GuestMemory
from tests.fuzz.device_checks import Checker, FuzzFailure
from tests.fuzz.device_driver import Driver
from tests.fuzz.device_inputs import REGIONS, Input
from tests.fuzz.device_rig import IMAGE_SIZE, KINDS, Canaries, HostSide, Options, Rig, make_rig


# -- one case --------------------------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.failures: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            self.failures.append(text)


@dataclass
class _State:
    memory: GuestMemory
    host: HostSide
    records: _Records
    canaries: Canaries
    logger_settings: tuple[bool, int]   # the kvmlet logger's propagate and level before the fuzzer took it


_state: _State | None = None
COUNTS: dict[str, int] = {kind: 0 for kind in KINDS} | {"net skipped": 0, "unattributed steps": 0, "steps": 0}


def state() -> _State:
    global _state
    if _state is None:
        records = _Records()
        logger = logging.getLogger("kvmlet")
        settings = (logger.propagate, logger.level)
        logger.addHandler(records)
        logger.propagate = False          # devices that need a reset are expected: keep the output clean
        logger.setLevel(logging.WARNING)
        with_net = os.environ.get("KVMLET_FUZZ_NET", "1") != "0"
        memory = GuestMemory(list(REGIONS), hugepages=False)
        canaries = Canaries(memory)
        _state = _State(memory, HostSide(with_net=with_net), records, canaries, settings)
        atexit.register(close_state)   # atheris and a replay that fails end the process without closing
    return _state


def close_state() -> None:
    global _state
    if _state is not None:
        logger = logging.getLogger("kvmlet")   # give the logger back as it was (other tests read its records)
        logger.removeHandler(_state.records)
        logger.propagate, level = _state.logger_settings
        logger.setLevel(level)
        _state.host.close()
        _state.memory.close()
        _state.canaries.close()
        _state = None


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def run_case(data: bytes, device: str | None = None) -> None:
    """One fuzz case (FuzzFailure if an invariant does not hold)."""
    st = state()
    inp = Input(data)
    kind = KINDS[inp.byte() % len(KINDS)] if device is None else device
    options = Options.from_byte(inp.byte())
    if kind == "net" and st.host.tap_name is None:
        COUNTS["net skipped"] += 1
        return
    COUNTS[kind] += 1
    for start, size in REGIONS:
        st.memory.write(start, bytes(size))
    st.records.failures.clear()
    fds = _fds()
    rig = make_rig(kind, options, st.host, st.memory)
    closed = False
    try:
        checker = Checker(rig.transport, st.memory, lambda: _extra_checks(rig))
        driver = Driver(rig, st.memory, inp, checker)
        try:
            driver.run()
            driver.probe()
        finally:
            COUNTS["steps"] += checker.steps
            COUNTS["unattributed steps"] += checker.unattributed
        closed = True
        try:
            rig.close()
        except Exception as exc:
            raise FuzzFailure("exception while closing the device", repr(exc)) from exc
    finally:
        if not closed:
            try:
                rig.close()
            except Exception:
                pass
    st.canaries.check()
    if st.records.failures:
        raise FuzzFailure("an exception was logged", st.records.failures[0])
    leaked = _fds() - fds
    if leaked:
        names = []
        for fd in sorted(leaked):
            try:
                names.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
            except OSError:
                names.append(fd)
        raise FuzzFailure("file descriptors leaked", ", ".join(names))
    if os.path.getsize(st.host.image) != IMAGE_SIZE:
        raise FuzzFailure("the disk image changed size", str(os.path.getsize(st.host.image)))
    files = sorted(os.listdir(st.host.dir))
    if files != st.host.files:
        raise FuzzFailure("files left behind", f"{files} (expected {st.host.files})")


def _extra_checks(rig: Rig) -> None:
    timers = rig.loop.timers_of(rig.transport)
    if timers > len(rig.transport.queues):
        raise FuzzFailure("more than one wake-up timer per queue on the event loop", f"{timers} timers")
    if rig.kind == "vsock":
        from kvmlet.devices.virtio import vsock

        connections = len(getattr(rig.device, "connections", {}))
        if connections > vsock.MAX_CONNECTIONS:
            raise FuzzFailure("more vsock connections than MAX_CONNECTIONS", str(connections))


def TestOneInput(data: bytes) -> None:
    run_case(data)


# -- random inputs ----------------------------------------------------------------------------------------
def case_input(seed: int, index: int) -> bytes:
    """Case ``index`` of ``seed``: the same bytes on every run and host."""
    rng = random.Random(f"kvmlet-fuzz:{seed}:{index}")
    return rng.randbytes(rng.choice([32, 128, 512, 1024, 2048]))


@dataclass
class Failure:
    kind: str
    message: str
    seed: int
    case: int
    count: int = 1


def run_random(count: int, seed: int = 0, start: int = 0, device: str | None = None, *,
               stop: bool = False, progress: float = 0.0, artifacts: str | None = None) -> dict[str, Failure]:
    """Cases ``start`` to ``start + count`` of ``seed``; the failures found, by kind (first case kept)."""
    failures: dict[str, Failure] = {}
    began = last = time.monotonic()
    for index in range(start, start + count):
        data = case_input(seed, index)
        try:
            run_case(data, device)
        except Exception as exc:
            kind = exc.kind if isinstance(exc, FuzzFailure) else f"harness error {type(exc).__name__}"
            message = str(exc) if isinstance(exc, FuzzFailure) else traceback.format_exc()
            if kind in failures:
                failures[kind].count += 1
            else:
                failures[kind] = Failure(kind, message, seed, index)
                print(f"fuzz_devices: FAILURE {kind} (seed {seed} case {index}; replay with "
                      f"--seed {seed} --case {index}{' --device ' + device if device else ''})", file=sys.stderr)
                if artifacts:
                    os.makedirs(artifacts, exist_ok=True)
                    with open(os.path.join(artifacts, f"crash-{seed}-{index}.bin"), "wb") as f:
                        f.write(data)
            if stop:
                raise
        now = time.monotonic()
        if progress and now - last >= progress:
            last = now
            done = index - start + 1
            print(f"fuzz_devices: {done}/{count} cases, {done / (now - began):.0f} cases/s, "
                  f"{len(failures)} failure kinds", file=sys.stderr, flush=True)
    return failures


def _summary(count: int, seconds: float, counts: dict[str, int], failures: dict[str, Failure]) -> str:
    kinds = ", ".join(f"{kind} {counts.get(kind, 0)}" for kind in (*KINDS, "net skipped"))
    return (f"fuzz_devices: {count} cases ({kinds}; {counts.get('steps', 0)} steps) in {seconds:.1f} s, "
            f"{count / seconds if seconds else 0:.0f} cases/s, {sum(f.count for f in failures.values())} failures"
            f" of {len(failures)} kinds")


def _run_jobs(count: int, seed: int, start: int, jobs: int, device: str | None, artifacts: str | None,
              progress: float) -> int:
    """Split cases over ``jobs`` processes of this script; aggregate their summaries."""
    began = time.monotonic()
    per = -(-count // jobs)
    children = []
    for job in range(jobs):
        first = start + job * per
        n = min(per, start + count - first)
        if n <= 0:
            break
        args = [sys.executable, os.path.abspath(__file__), "--random", str(n), "--seed", str(seed),
                "--start", str(first), "--json", "--progress", str(progress)]
        if device:
            args += ["--device", device]
        if artifacts:
            args += ["--artifacts", artifacts]
        children.append(subprocess.Popen(args, stdout=subprocess.PIPE, text=True))
    counts: dict[str, int] = {}
    failures: dict[str, Failure] = {}
    status = 0
    for child in children:
        out, _ = child.communicate()
        status |= child.returncode != 0 and child.returncode != 1
        for line in out.splitlines():
            if line.startswith("{"):
                result = json.loads(line)
                for key, value in result["counts"].items():
                    counts[key] = counts.get(key, 0) + value
                for kind, failure in result["failures"].items():
                    if kind in failures:
                        failures[kind].count += failure["count"]
                    else:
                        failures[kind] = Failure(**failure)
    seconds = time.monotonic() - began
    for failure in failures.values():
        print(f"FAILURE {failure.kind} x{failure.count} (first: --seed {failure.seed} --case {failure.case})\n"
              f"  {failure.message[:2000]}")
    print(_summary(count, seconds, counts, failures) + f" with {len(children)} processes")
    return 1 if failures or status else 0


def _arg(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else default


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    device = _arg(argv, "--device")
    if device is not None and device not in KINDS:
        print(f"fuzz_devices: --device is one of {', '.join(KINDS)}", file=sys.stderr)
        return 2
    seed = int(_arg(argv, "--seed", "0") or 0)
    artifacts = _arg(argv, "--artifacts")
    progress = float(_arg(argv, "--progress", "30") or 0)
    if "--write-corpus" in argv:   # random-mode inputs as a starting corpus for atheris
        directory = str(_arg(argv, "--write-corpus"))
        count = int(_arg(argv, "--count", "200") or 200)
        os.makedirs(directory, exist_ok=True)
        for index in range(count):
            with open(os.path.join(directory, f"seed-{seed}-{index}"), "wb") as f:
                f.write(case_input(seed, index))
        print(f"fuzz_devices: wrote {count} inputs to {directory}")
        return 0
    if "--case" in argv or "--input" in argv:
        if "--input" in argv:
            with open(str(_arg(argv, "--input")), "rb") as f:
                data = f.read()
        else:
            data = case_input(seed, int(_arg(argv, "--case", "0") or 0))
        run_case(data, device)
        close_state()
        print("fuzz_devices: the case passed")
        return 0
    if "--random" in argv:
        count = int(_arg(argv, "--random", "1000") or 1000)
        start = int(_arg(argv, "--start", "0") or 0)
        jobs = int(_arg(argv, "--jobs", "1") or 1)
        if jobs > 1:
            return _run_jobs(count, seed, start, jobs, device, artifacts, progress)
        began = time.monotonic()
        failures = run_random(count, seed, start, device, progress=progress, artifacts=artifacts)
        seconds = time.monotonic() - began
        skip = state().host.net_skip_reason
        close_state()
        if "--json" in argv:
            print(json.dumps({"counts": COUNTS, "seconds": seconds,
                              "failures": {k: vars(f) for k, f in failures.items()}}))
        else:
            for failure in failures.values():
                print(f"FAILURE {failure.kind} x{failure.count} (first: --seed {failure.seed} --case "
                      f"{failure.case})\n  {failure.message[:2000]}")
            print(_summary(count, seconds, COUNTS, failures) + (f" ({skip})" if skip else ""))
        return 1 if failures else 0
    try:
        import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        print("fuzz_devices: atheris is not installed; use --random N (see the module documentation)",
              file=sys.stderr)
        return 2
    state()
    atheris.instrument_all()
    atheris.Setup([a for a in argv if a != "--device" and a != device], lambda data: run_case(data, device))
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
