"""The model's compute threads give a core back while another process on the host needs it.

Why: a decode step is a hundred short OpenMP regions, each ending at a barrier where every
thread waits for the slowest. When another process takes one of the cores those threads run on,
the thread that shares it waits in the run queue, and every barrier waits for it. Measured on a
2-core AMD EPYC (AVX2), W4A16 demo model under `vilaserve serve`: a 4-token chat completion took
0.1 s alone and 0.3-1.6 s while one busy process ran beside the worker (2.5 s in faults.py's
control window); with one compute thread (OMP_NUM_THREADS=1) it took 0.09-0.15 s beside the same
process. Waiting passively at the barriers (OMP_WAIT_POLICY=PASSIVE) kept that latency too but
cost a third of the decode speed on a quiet machine; dropping a thread only while the host is
busy costs nothing otherwise.

The signal is the harm itself: how long the compute threads (the model thread and the OpenMP
threads it started, which inherit its name) waited in the run queue, from
/proc/self/task/*/schedstat, five times a second. Serving alone they wait 0.1-0.3 cores' worth
(the event loop's turns); beside one busy process, 1.0. Above `drop_wait`, while other
processes used at least `drop_others` cores (not only our own event loop), one thread goes. A
thread comes back once the other processes leave a core free (/proc/stat less this process's
CPU time) for two seconds; or on trial, where they leave part of a core, after `retry_s`,
doubled each time the trial brings the waits back (up to `retry_max_s`): a client on the same
host that uses most of a core, but only between our answers, must not keep the model on one
thread for good.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MODEL_THREAD_NAME = "vilaserve-model"  # also the OpenMP threads it starts: they inherit it

# /proc/stat's columns after the name: user nice system idle iowait irq softirq steal ...
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)  # steal too: a vCPU the hypervisor lent away stalls as well


def name_os_thread(name: str) -> None:
    """Names the calling thread for the kernel (Linux; 15 bytes): the OpenMP threads it starts
    later inherit the name, so their run-queue waits can be found in /proc/self/task."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


@dataclass
class ThreadRule:
    """How many compute threads to run, from each sample's run-queue wait and others' CPU."""

    most: int  # the threads configured (torch's count at load)
    cores: int  # the cores this process may run on
    drop_wait: float = 0.4  # cores' worth of run-queue wait of the compute threads, while
    drop_others: float = 0.3  # other processes used this much: not our own event loop's turns
    free_margin: float = 0.75  # a thread back once this much more than it is free ...
    # ... for this many samples in a row (2 s: an attacker's or a build's bursts come and go
    # within a second or two, and each return of the thread meets the next burst's first step
    # with a thread that waits),
    free_samples: int = 10
    # or on trial, with at least this much more free but less than a free core (a quiet
    # moment between bursts counts towards the free run, not towards a trial), after
    trial_margin: float = 0.25
    retry_s: float = 2.0  # this long, doubled each time a trial brings the waits back
    retry_max_s: float = 30.0
    threads: int = field(init=False)
    _free_run: int = field(default=0, init=False)
    _since: float = field(default=0.0, init=False)  # when the count last changed
    _retry: float = field(default=0.0, init=False)
    _trial: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.threads = self.most
        self._retry = self.retry_s

    def next(self, wait_cores: float, others_cores: float, now: float) -> int:
        """The count after a sample: the compute threads' run-queue wait and the other
        processes' CPU use on our cores, both in cores' worth."""
        if wait_cores > self.drop_wait and others_cores >= self.drop_others and self.threads > 1:
            if self._trial:  # the trial brought the waits back: wait longer next time
                self._retry = min(2 * self._retry, self.retry_max_s)
            self._set(self.threads - 1, now, trial=False)
            return self.threads
        if self._trial and now - self._since >= self._retry:
            self._trial, self._retry = False, self.retry_s  # the trial held
        if self.threads < self.most:
            spare = self.cores - others_cores - self.threads
            self._free_run = self._free_run + 1 if spare >= self.free_margin else 0
            if self._free_run >= self.free_samples:
                self._retry = self.retry_s
                self._set(self.threads + 1, now, trial=False)
            elif self.trial_margin <= spare < self.free_margin and now - self._since >= self._retry:
                self._set(self.threads + 1, now, trial=True)
        return self.threads

    def _set(self, threads: int, now: float, trial: bool) -> None:
        self.threads, self._since, self._trial, self._free_run = threads, now, trial, 0


class HostCpu:
    """Between two calls: the compute threads' run-queue wait, and the CPU the other processes
    used on this process's cores (both in cores' worth)."""

    def __init__(
        self,
        cpus: Iterable[int],
        read: Callable[[str], str] | None = None,
        own_cpu_s: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        thread_name: str = MODEL_THREAD_NAME,
    ) -> None:
        self.cpus = frozenset(cpus)
        self._read = read or _read_text
        self._own_cpu_s = own_cpu_s
        self._clock = clock
        self._thread_name = thread_name
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._ours: dict[str, bool] = {}  # task id: whether it is a compute thread
        self._last = self._reading()

    def _busy_s(self) -> float:
        busy = 0
        for line in self._read("/proc/stat").splitlines():
            name, _, rest = line.partition(" ")
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in self.cpus:
                continue
            columns = rest.split()
            busy += sum(int(columns[i]) for i in _BUSY_COLUMNS if i < len(columns))
        return busy / self._tick

    def _waits_ns(self) -> dict[str, int]:
        """Each compute thread's run-queue wait so far (ns), by task id."""
        waits = {}
        tasks = self._read("/proc/self/task").split()
        for task in tasks:
            with contextlib.suppress(OSError, IndexError, ValueError):  # a thread that ended
                ours = self._ours.get(task)
                if ours is None:  # a thread's name is read once
                    comm = self._read(f"/proc/self/task/{task}/comm").strip()
                    ours = self._ours[task] = comm == self._thread_name
                if ours:
                    waits[task] = int(self._read(f"/proc/self/task/{task}/schedstat").split()[1])
        if len(self._ours) > 2 * len(tasks):  # forget threads that ended
            self._ours = {t: self._ours[t] for t in tasks if t in self._ours}
        return waits

    def _reading(self) -> tuple[float, float, float, dict[str, int]]:
        return self._clock(), self._busy_s(), self._own_cpu_s(), self._waits_ns()

    def sample(self) -> tuple[float, float]:
        """(run-queue wait, others' CPU) since the last call, in cores' worth."""
        now, busy_s, own_s, waits = self._reading()
        then, busy_then, own_then, waits_then = self._last
        self._last = (now, busy_s, own_s, waits)
        elapsed = now - then
        if elapsed <= 0:
            return 0.0, 0.0
        # Threads in both readings only: one that ended or began has no interval to count.
        waited = sum(ns - waits_then[t] for t, ns in waits.items() if t in waits_then) / 1e9
        others = max(0.0, (busy_s - busy_then) - (own_s - own_then))
        return waited / elapsed, others / elapsed


def _read_text(path: str) -> str:
    if path == "/proc/self/task":
        return " ".join(os.listdir(path))
    with open(path, encoding="ascii") as f:
        return f.read()


class ComputeThreads:
    """Decides on a sampler thread; `apply()` on the model thread sets the count (torch's
    thread count belongs to the calling thread, and the model's work all runs there)."""

    def __init__(
        self,
        host: HostCpu,
        rule: ThreadRule,
        set_threads: Callable[[int], None],
        interval_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._host = host
        self._rule = rule
        self._set_threads = set_threads
        self._interval_s = interval_s
        self._clock = clock
        self.wanted = rule.most  # written by the sampler, read by apply() (one int: atomic)
        self._applied = rule.most
        self._last_sample = (0.0, 0.0)
        self.stopped = threading.Event()

    @classmethod
    def for_this_process(
        cls, threads: int, set_threads: Callable[[int], None]
    ) -> ComputeThreads | None:
        """None where there is nothing to follow: one thread, or not Linux."""
        if threads < 2 or not os.path.exists("/proc/self/task"):
            return None
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(threads)
        host = HostCpu(cpus)
        return cls(host, ThreadRule(most=threads, cores=len(host.cpus)), set_threads)

    def sample(self) -> None:
        """One measurement and decision (the sampler thread calls it every `interval_s`)."""
        wait, others = self._last_sample = self._host.sample()
        self.wanted = self._rule.next(wait, others, self._clock())

    def apply(self) -> None:
        """On the model thread, before each piece of model work: cheap when nothing changed."""
        wanted = self.wanted
        if wanted != self._applied:
            self._set_threads(wanted)
            wait, others = self._last_sample
            log.info(
                "compute threads changed: %d -> %d (run-queue wait %.2f cores, others %.2f)",
                self._applied,
                wanted,
                wait,
                others,
                extra={
                    "threads": wanted,
                    "run_queue_wait_cores": round(wait, 2),
                    "others_cores": round(others, 2),
                },
            )
            self._applied = wanted

    def start(self) -> None:
        """Samples on a daemon thread until sampling fails, or until nothing holds this object any
        more (the thread keeps only a weak reference: a runtime dropped ends its sampler)."""
        threading.Thread(
            target=_sample_while_alive,
            args=(weakref.ref(self), self.stopped, self._interval_s),
            name="vilaserve-compute-threads",
            daemon=True,
        ).start()

    def fail_open(self, exc: Exception) -> None:
        """/proc unreadable: every thread from now on, and no more sampling."""
        log.warning("host CPU sampling stopped", extra={"error": str(exc)})
        self.wanted = self._rule.most
        self.stopped.set()


def _sample_while_alive(
    ref: weakref.ref[ComputeThreads], stop: threading.Event, interval_s: float
) -> None:
    while not stop.wait(interval_s):
        threads = ref()
        if threads is None:
            return
        try:
            threads.sample()
        except (OSError, ValueError) as exc:
            threads.fail_open(exc)
        del threads
