"""After Ctrl-C or SIGTERM, `localnet run` says how to go on, and ends, in bounded time.

Python runs a signal's handler in the main thread, between bytecodes.  A SIGTERM sent to
the whole process group (`timeout`, a scheduler, a systemd stop) also ends the embedded
Ray's own processes.  If the main thread is then inside a Ray call that waits for them,
the handler waits too -- until Ray gives up on its GCS after 60 s and ends the process
without a word about the checkpoint.  The C-level handler, though, writes the signal's
number to a wakeup fd at once (`signal.set_wakeup_fd`).  A thread blocked reading that
fd wakes with the signal: if the main thread has not said the line within `grace`
seconds, the thread says it, and if the command is still running at `deadline`, it ends
the process with the signal's exit status.  Nothing is lost by that: a stopped run
keeps its last checkpoint and drops the step in progress either way.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


# set by `localnet run`'s SIGTERM handler.  Inside `ray.get` Ray turns what a handler
# raises into a bare KeyboardInterrupt, so this, not the exception, says it was SIGTERM.
SIGTERM_SEEN = threading.Event()


class Watchdog:
    """`with Watchdog(say):` around a command; `say(signum)` says the line, and the
    command sets `said` when it has said it itself."""

    def __init__(self, say, grace: float = 5.0, deadline: float = 30.0, exit=os._exit):
        self.say, self.grace, self.deadline, self._exit = say, grace, deadline, exit
        self.said = threading.Event()
        self.done = threading.Event()
        self._fds = None
        self._old = -1

    def __enter__(self):
        # only the main thread may set the wakeup fd (and only there do handlers run)
        if threading.current_thread() is threading.main_thread():
            r, w = os.pipe()
            os.set_blocking(w, False)  # the C handler must never block on it
            self._old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self._fds = (r, w)
            threading.Thread(target=self._watch, args=(r,), name="localnet-stop-watchdog",
                             daemon=True).start()
        return self

    def __exit__(self, *exc) -> bool:
        self.done.set()
        if self._fds is not None:
            signal.set_wakeup_fd(self._old)
            os.close(self._fds[1])  # the reader sees the end of the pipe and closes its end
            self._fds = None
        return False

    def _watch(self, r: int) -> None:
        try:
            while True:
                got = os.read(r, 1)
                if not got:
                    return
                if got[0] in (signal.SIGINT, signal.SIGTERM):
                    self.fired(got[0])
                    return
        finally:
            os.close(r)

    def fired(self, signum: int) -> None:
        """The signal came: say the line if the command has not, end it if it hangs."""
        if self.done.wait(self.grace):
            return
        if not self.said.is_set():
            self.say(signum)
        if not self.done.wait(max(self.deadline - self.grace, 0)):
            sys.stderr.write(f"localnet: still stopping {self.deadline:g} s after the signal; "
                             f"ending now\n")
            sys.stderr.flush()
            sys.stdout.flush()
            self._exit(128 + signum)
