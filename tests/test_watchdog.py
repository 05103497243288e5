"""The stop watchdog (localnet/watchdog.py): after Ctrl-C or SIGTERM, the line naming
--resume is said, and the process ends, even when the main thread cannot run Python."""

import signal
import threading

from localnet.watchdog import Watchdog


class Calls:
    def __init__(self):
        self.said, self.exited = [], []
        self.event = threading.Event()

    def say(self, signum):
        self.said.append(signum)

    def exit(self, code):
        self.exited.append(code)
        self.event.set()


def test_a_real_sigterm_wakes_it_and_a_stuck_command_is_ended_with_143():
    """The signal itself wakes the watchdog's thread (through the wakeup fd), whatever
    the main thread is doing; with nobody saying the line, it says it, then ends the
    process with 128 + 15."""
    calls = Calls()
    before = signal.signal(signal.SIGTERM, lambda *a: None)  # a handler that raises nothing
    try:
        with Watchdog(calls.say, grace=0.2, deadline=0.5, exit=calls.exit):
            signal.raise_signal(signal.SIGTERM)
            assert calls.event.wait(10), "the watchdog never woke"
    finally:
        signal.signal(signal.SIGTERM, before)
    assert calls.said == [signal.SIGTERM] and calls.exited == [143]


def test_a_command_that_says_the_line_and_ends_is_left_alone():
    calls = Calls()
    dog = Watchdog(calls.say, grace=0.3, deadline=0.6, exit=calls.exit)
    with dog:
        t = threading.Thread(target=dog.fired, args=(signal.SIGINT,))
        t.start()
        dog.said.set()        # the main thread said it
    t.join(5)                 # and the command ended before the deadline
    assert not t.is_alive() and calls.said == [] and calls.exited == []


def test_a_command_that_said_the_line_but_hangs_is_ended_without_saying_it_twice():
    calls = Calls()
    dog = Watchdog(calls.say, grace=0.1, deadline=0.3, exit=calls.exit)
    dog.said.set()
    dog.fired(signal.SIGINT)
    assert calls.said == [] and calls.exited == [130]


def test_a_process_whose_main_thread_cannot_run_the_handler_still_says_it_and_ends():
    """The main thread stuck where Python's handler cannot run (here: SIGTERM blocked in
    it, asleep for a minute, as in a Ray call waiting on a GCS the same signal ended):
    the line comes after `grace`, and the process ends with 143 at `deadline`."""
    import subprocess
    import sys
    import time

    prog = (
        "import signal, sys, time\n"
        "from localnet.watchdog import Watchdog\n"
        "def stop(*a):\n"
        "    raise KeyboardInterrupt\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "with Watchdog(lambda s: print('the line', s, file=sys.stderr, flush=True),\n"
        "              grace=0.5, deadline=2.0):\n"
        "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", prog], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        # until the main thread is asleep: a signal that comes while it still runs
        # bytecode (finishing the print) is handled there, whatever its signal mask
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert time.monotonic() - t0 < 15
    assert "the line 15" in err and "ending now" in err


def test_a_sigterm_that_ray_turned_into_a_bare_keyboardinterrupt_still_ends_with_143():
    """Inside `ray.get`, Ray's core worker runs the pending signal handlers itself and
    turns whatever they raise into a bare KeyboardInterrupt (its check_status).  The
    command still says SIGTERM and exits 143; a later command's Ctrl-C is Ctrl-C."""
    from localnet.cli_run import sigterm_stops, stopped_by

    def like_ray_get():
        try:
            signal.raise_signal(signal.SIGTERM)  # our handler raises Terminated here
        except BaseException:
            raise KeyboardInterrupt() from None  # what check_status raises instead

    @sigterm_stops
    def command(stop):
        try:
            stop()
        except KeyboardInterrupt as exc:
            assert type(exc) is KeyboardInterrupt
            return stopped_by(exc)

    def ctrl_c():
        raise KeyboardInterrupt()

    assert command(like_ray_get) == ("terminated (SIGTERM)", 143)
    assert command(ctrl_c) == ("interrupted", 130)


def test_stopped_json_says_sigterm_for_the_bare_keyboardinterrupt_ray_made_of_it(tmp_path):
    """The same replacement, where the run records how it stopped: stopped.json said
    "Ctrl-C" for a SIGTERM to the whole process group whenever Ray's call took it."""
    import json

    from localnet.train import _write_stop
    from localnet.watchdog import SIGTERM_SEEN

    def recorded():
        return json.loads((tmp_path / "stopped.json").read_text())["message"]

    _write_stop(tmp_path, KeyboardInterrupt(), "interrupted", 3, 2)
    assert recorded() == "Ctrl-C"
    SIGTERM_SEEN.set()
    try:
        _write_stop(tmp_path, KeyboardInterrupt(), "interrupted", 3, 2)
        assert recorded() == "SIGTERM"
    finally:
        SIGTERM_SEEN.clear()
