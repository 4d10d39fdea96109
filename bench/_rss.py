"""Peak resident memory of this process, sampled in a thread (the benchmarks' memory figures)."""
import threading
import time


class PeakRss:
    """Samples this process's RSS in a thread; ``peak`` is the largest value seen since start."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
