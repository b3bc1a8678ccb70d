"""SIGTERM/SIGINT as a flag the training loops check at a step boundary, so a run stops cleanly and says what it kept.

Both trainers use it: PPO checkpoints and exits, reward training (which keeps no checkpoints) stops and says it
starts over on --resume. A second Ctrl-C raises KeyboardInterrupt at once.
"""
import signal


class SignalFlag:
    """Records SIGTERM/SIGINT (`received`: the signal's name) while the `with` block runs; the loop decides when
    to stop."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
