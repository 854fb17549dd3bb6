"""``python -m dno`` that stops itself (SIGSTOP) right after writing its Nth result line.

Test-only wrapper: ``python tests/cli_stopping_after.py N run --pipeline ...``. The process then
waits, stopped, for whatever the test sends; a test that signals a stopped process knows the
signal lands mid-run, after exactly N results, however fast or slow the machine is. No clock.
"""
import os
import signal
import sys

from dno import cli
from dno.results import ResultStore


def main() -> int:
    stop_after = int(sys.argv[1])
    append = ResultStore.append

    def append_then_stop(self, record, images=None):
        append(self, record, images)
        if len(self.read()) == stop_after:
            os.kill(os.getpid(), signal.SIGSTOP)

    ResultStore.append = append_then_stop
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
