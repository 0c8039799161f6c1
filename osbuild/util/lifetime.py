"""Child processes that cannot outlive osbuild, nor leave children behind.

`contained(argv)` wraps a command so that (1) it is killed when osbuild dies,
even by SIGKILL (`setpriv --pdeathsig`, inherited by `unshare` through
exec), and (2) it runs as PID 1 of a fresh PID namespace (`unshare --pid
--fork --kill-child`), so that when it dies the kernel kills every process
it started too (e.g. curl under a source program, or a whole nspawn
container, which a SIGKILLed nspawn would otherwise leave running).
"""

KILL_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--",
                    "unshare", "--pid", "--mount-proc", "--fork", "--kill-child=KILL", "--"]


def contained(argv):
    """`argv`, wrapped so that it and all its descendants die with this process."""
    return KILL_WITH_PARENT + list(argv)
