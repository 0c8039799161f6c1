"""What osbuild does around one program run: debug shells and the time limit.

`--break [STAGE]` opens a shell in a program's build root before it runs,
`--break-on-failure` after it failed (with the tree as it left it), and
`--stage-timeout` stops a program that runs too long. `Debug` holds the
command line's choices; `Debug.control(step)` says what applies to one
stage or assembler (a `ProgramControl`, which `BuildRoot.run` follows).

The shell is as untrusted as the program: it runs in a container of its own
with the program's binds and sandbox, and is handed only osbuild's stdin
when that is a pipe or a file opened read-only (never a terminal: then
systemd-nspawn relays through a pseudo-terminal of its own) and a pipe for
its output, which osbuild copies to its stdout (stderr with --json).
"""

import fcntl
import fnmatch
import os
import stat

# The shell: bash where the build root has it (reading from a pipe it takes
# no more than each command, so piped commands for a later shell stay unread).
SHELL = ["/bin/sh", "-c", 'if command -v bash >/dev/null; then exec bash "$@"; fi; exec sh "$@"',
         "sh"]


class DebugError(Exception):
    """The debug options cannot be used as given; the message says why."""


def matches(pattern, step):
    """Whether `pattern` (a glob) selects the stage or assembler `step` by name or id."""
    return fnmatch.fnmatchcase(step.id, pattern) or fnmatch.fnmatchcase(step.name, pattern)


class Shell:
    """Where a debug shell reads and writes, and what it is told first."""

    def __init__(self, stdin_fd, output_fd, interactive, banner):
        self.stdin_fd = stdin_fd
        self.output_fd = output_fd
        self.interactive = interactive
        self.banner = banner

    def argv(self):
        """The command the container runs."""
        return SHELL + (["-i"] if self.interactive else [])

    def say(self, text):
        """Write a line of osbuild's own to the shell's output."""
        os.write(self.output_fd, f"osbuild: {text}\n".encode())


class ProgramControl:
    """For one program: a shell before it runs, one if it fails, a time limit."""

    def __init__(self, shell_before=None, shell_on_failure=None, timeout=None):
        self.shell_before = shell_before
        self.shell_on_failure = shell_on_failure
        self.timeout = timeout


def check_stdin(fd=0):
    """Whether osbuild's stdin is a terminal; raises DebugError if a shell cannot use it."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise DebugError("--break and --break-on-failure read the shell's commands from "
                         "stdin, which is closed") from e
    if os.isatty(fd):
        return True
    flags = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    kind_ok = stat.S_ISFIFO(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)
    if not kind_ok or flags != os.O_RDONLY:
        raise DebugError("--break and --break-on-failure need stdin to be a terminal, "
                         "a pipe or a file opened read-only (the shell gets it)")
    return False


class Debug:
    """The command line's --break, --break-on-failure and --stage-timeout."""

    def __init__(self, breaks=(), on_failure=False, timeout=None, output_fd=1):
        self.breaks = list(breaks)
        self.on_failure = on_failure
        self.timeout = timeout
        self.output_fd = output_fd
        self.interactive = False
        if self.breaks or self.on_failure:
            self.interactive = check_stdin()

    def _shell(self, step, when, then):
        banner = (f"shell in the build root of {step.name} ({step.id}) {when}; "
                  f"the tree is /run/osbuild/tree; exit (or end of input) {then}")
        return Shell(0, self.output_fd, self.interactive, banner)

    def control(self, step):
        """The ProgramControl for the stage or assembler `step`."""
        before = None
        if any(matches(p, step) for p in self.breaks):
            before = self._shell(step, "before it runs", "runs it")
        failure = None
        if self.on_failure:
            failure = self._shell(step, "after it failed", "ends the failed build")
        return ProgramControl(before, failure, self.timeout)

    def unmatched(self, steps):
        """The --break patterns that select none of `steps`."""
        return [p for p in self.breaks if not any(matches(p, s) for s in steps)]
