"""Helpers of the gs:// tests: an independent reader of the emulator's objects, and waiting on a child."""
import time


def objects_under(url: str) -> dict[str, bytes]:
    """{key relative to url: bytes} of every object under gs:// url, read with google-cloud-storage (a client
    crossjax does not use for these files: an independent reader)."""
    from google.cloud import storage
    bucket, _, prefix = url[len("gs://"):].partition("/")
    prefix = prefix.rstrip("/") + "/"
    client = storage.Client()
    return {b.name[len(prefix):]: b.download_as_bytes() for b in client.list_blobs(bucket, prefix=prefix)}


def wait_for(condition, timeout: float, what: str, proc=None, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}" + (f"; log: {open(log).read()[-3000:]}" if log else ""))
