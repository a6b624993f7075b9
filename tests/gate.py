"""A batcher's llm runner held shut (tests of admission: tests/runtime/test_batch_admission.py, tests/serve)."""
import threading


class Gate:
    """A batcher's runner, held shut: every graph call waits until open(), so the rows taken stay taken and a
    submitted turn stays where the scheduler put it (waiting or prefilling)."""

    def __init__(self, runner):
        self._real, self._open = runner, threading.Event()

    def __getattr__(self, name):
        return getattr(self._real, name)

    def run_cached(self, *args, **kwargs):
        self._open.wait()
        return self._real.run_cached(*args, **kwargs)

    def run_rows(self, *args, **kwargs):
        self._open.wait()
        return self._real.run_rows(*args, **kwargs)

    def open(self) -> None:
        self._open.set()
