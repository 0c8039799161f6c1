"""Following a build: the human log, `--quiet`, and `--monitor JSONSeqMonitor`.

The engine tells its Monitor what happens: `begin(steps)` with the stages
and assemblers about to run, `step_start`/`log`/`step_end` for each of them,
`download` for the sources' progress, `phase` for a phase a program reports
through its API (the assembler's partitioning, filesystems, ...) and
`finish` with the PipelineResult. Calls may come from several threads.
"""

import json
import os
import sys
import threading
import time

# How often a progress line is printed when stdout is not a terminal.
LOG_PROGRESS_EVERY = 10.0


def _kind(step):
    return "assembler" if step.kind == "assemblers" else "stage"


def format_bytes(count):
    """`count` bytes for people: 512 B, 3.4 MiB, ..."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_duration(seconds):
    """`seconds` as `4.2 s` or `3 min 05 s`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s"


class DownloadProgress:
    """Where one run of a source program is: files and bytes, done and in all.

    `bytes_total` is None while some file's size is unknown.
    """

    def __init__(self, source, files_done, files_total, bytes_done, bytes_total, rate=0.0):
        # pylint: disable=too-many-arguments,too-many-positional-arguments
        self.source = source
        self.files_done = files_done
        self.files_total = files_total
        self.bytes_done = bytes_done
        self.bytes_total = bytes_total
        self.rate = rate  # bytes per second since the run began

    @property
    def complete(self):
        """Whether every file is there."""
        return self.files_done >= self.files_total

    def as_dict(self):
        """The JSON form (a `download` record's fields)."""
        return {"source": self.source, "files_done": self.files_done,
                "files_total": self.files_total, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total}


class Monitor:
    """A monitor that ignores everything (the base of the others)."""

    def begin(self, steps):
        """The build starts; `steps` are the stages and assemblers that will run."""

    def step_start(self, step):
        """A stage or the assembler starts."""

    def log(self, data):
        """A chunk (bytes) of the running program's output."""

    def step_end(self, step, result):
        """A stage or the assembler ended with the StageResult `result`."""

    def download(self, progress):
        """A source program's DownloadProgress."""

    def phase(self, step, name):
        """The running program reported that it entered phase `name`."""

    def finish(self, result):
        """The build ended with the PipelineResult `result`."""


class Monitors(Monitor):
    """Several monitors as one."""

    def __init__(self, monitors):
        self.monitors = list(monitors)

    def begin(self, steps):
        for m in self.monitors:
            m.begin(steps)

    def step_start(self, step):
        for m in self.monitors:
            m.step_start(step)

    def log(self, data):
        for m in self.monitors:
            m.log(data)

    def step_end(self, step, result):
        for m in self.monitors:
            m.step_end(step, result)

    def download(self, progress):
        for m in self.monitors:
            m.download(progress)

    def phase(self, step, name):
        for m in self.monitors:
            m.phase(step, name)

    def finish(self, result):
        for m in self.monitors:
            m.finish(result)


class _Counter(Monitor):
    """Counts steps and time: `[3/9]`, elapsed since `begin`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count = 0
        self.index = 0
        self.started = time.monotonic()

    def begin(self, steps):
        with self.lock:
            self.count = len(steps)
            self.index = 0
            self.started = time.monotonic()

    def _next(self):
        self.index += 1
        self.count = max(self.count, self.index)  # the store may have changed meanwhile
        return self.index

    def elapsed(self):
        """Seconds since the build began."""
        return time.monotonic() - self.started


class LogMonitor(_Counter):
    """The human log on `out` (a binary stream): headers, output, progress, time.

    With `quiet`, only a failing program's header and output are written.
    On a terminal the download progress line rewrites itself; otherwise it
    is printed every LOG_PROGRESS_EVERY seconds, at each quarter and at the end.
    """

    def __init__(self, out=None, quiet=False, tty=None):
        super().__init__()
        self.out = out or sys.stdout.buffer
        self.quiet = quiet
        self.tty = self.out.isatty() if tty is None else tty
        self._line_open = False      # a terminal progress line is on the screen
        self._last = {}              # source -> (time printed, quarter printed)
        self._output = []            # quiet: the running program's output

    def _write(self, data):
        if self._line_open:
            data = b"\n" + data
            self._line_open = False
        self.out.write(data)
        self.out.flush()

    def _header(self, step, index):
        text = f"\n[{index}/{self.count}] {step.name}: {step.id} " \
               f"({format_duration(self.elapsed())} elapsed)"
        if step.options:
            text += "\n" + json.dumps(step.options, indent=2, sort_keys=True)
        return (text + "\n").encode()

    def step_start(self, step):
        with self.lock:
            index = self._next()
            self._current = self._header(step, index)  # pylint: disable=attribute-defined-outside-init
            self._output = []
            if not self.quiet:
                self._write(self._current)

    def log(self, data):
        with self.lock:
            if self.quiet:
                self._output.append(data)
            else:
                self._write(data)

    def step_end(self, step, result):
        with self.lock:
            if result.success:
                return
            if self.quiet:
                self._write(self._current + b"".join(self._output))
            self._write(f"{step.name} failed after {format_duration(result.duration)}\n"
                        .encode())

    def download(self, progress):
        if self.quiet:
            return
        with self.lock:
            now = time.monotonic()
            line = (f"{progress.source}: {progress.files_done}/{progress.files_total} files, "
                    f"{format_bytes(progress.bytes_done)}")
            if progress.bytes_total is not None:
                line += f" of {format_bytes(progress.bytes_total)}"
            line += f", {format_bytes(progress.rate)}/s"
            if self.tty:
                self.out.write(b"\r\x1b[K" + line.encode())
                self.out.flush()
                self._line_open = not progress.complete
                if progress.complete:
                    self.out.write(b"\n")
                return
            quarter = self._quarter(progress)
            printed, last_quarter = self._last.get(progress.source, (None, -1))
            if progress.complete or printed is None or now - printed >= LOG_PROGRESS_EVERY \
                    or quarter > last_quarter:
                self._last[progress.source] = (now, quarter)
                self._write((line + "\n").encode())
            if progress.complete:
                self._last.pop(progress.source, None)

    @staticmethod
    def _quarter(progress):
        if progress.bytes_total:
            return 4 * progress.bytes_done // progress.bytes_total
        return 4 * progress.files_done // max(progress.files_total, 1)

    def phase(self, step, name):
        if not self.quiet:
            with self.lock:
                self._write(f"{step.name}: {name}\n".encode())

    def finish(self, result):
        if not self.quiet:
            with self.lock:
                self._write(f"\ntotal time: {format_duration(self.elapsed())}\n".encode())


class MonitorError(Exception):
    """The monitor named on the command line cannot be used."""


class JSONSeqMonitor(_Counter):
    """RFC 7464 records (0x1E, a JSON object, 0x0A) on the file descriptor `fd`.

    The record format is documented in the man page (osbuild(1), MONITOR).
    A consumer that goes away stops the records, not the build.
    """

    def __init__(self, fd):
        super().__init__()
        self.fd = fd
        self._failed = False
        self._step = None
        try:
            os.fstat(fd)
        except OSError as e:
            raise MonitorError(f"--monitor-fd {fd}: {e.strerror}") from None

    def _record(self, record):
        record = dict(record, time=round(time.time(), 3))
        data = b"\x1e" + json.dumps(record, allow_nan=False).encode() + b"\n"
        if self._failed:
            return
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            self._failed = True
            print(f"osbuild: warning: --monitor-fd {self.fd}: {e.strerror}; "
                  "no more monitor records", file=sys.stderr)

    def _step_fields(self, step):
        return {"kind": _kind(step), "name": step.name, "id": step.id}

    def begin(self, steps):
        super().begin(steps)
        with self.lock:
            self._record({"type": "begin", "steps": [self._step_fields(s) for s in steps]})

    def step_start(self, step):
        with self.lock:
            self._step = (step, self._next())
            self._record({"type": "start", **self._step_fields(step), "index": self.index,
                          "count": self.count})

    def step_end(self, step, result):
        with self.lock:
            self._record({"type": "end", **self._step_fields(step), "index": self.index,
                          "count": self.count, "success": result.success,
                          "duration": round(result.duration, 3)})

    def download(self, progress):
        with self.lock:
            self._record({"type": "download", **progress.as_dict()})

    def phase(self, step, name):
        with self.lock:
            self._record({"type": "phase", **self._step_fields(step), "phase": name})

    def finish(self, result):
        with self.lock:
            self._record({"type": "result", "duration": round(self.elapsed(), 3),
                          "result": result.as_dict()})

    def error(self, message):
        """The build could not start (a bad manifest, ...): the final record."""
        with self.lock:
            self._record({"type": "result", "duration": round(self.elapsed(), 3),
                          "result": {"success": False, "error": message}})


MONITORS = {"JSONSeqMonitor": JSONSeqMonitor}


def make(name, fd):
    """The monitor of `--monitor NAME --monitor-fd FD`."""
    if name not in MONITORS:
        raise MonitorError(f"--monitor {name[:80]!r}: unknown monitor "
                           f"(known: {', '.join(sorted(MONITORS))})")
    if fd is None:
        raise MonitorError(f"--monitor {name} needs --monitor-fd FD")
    return MONITORS[name](fd)
