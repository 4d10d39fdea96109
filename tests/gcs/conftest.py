"""The local GCS emulator the gs:// tests run against: one per session, on a free loopback port, in its own
process (tests/gcs/_gcs_emulator.py). The clients crossjax uses are pointed at it through their endpoint
settings, here and in every child process a test starts. A missing emulator package fails the tests (the
import below), it never skips them."""
import os
import subprocess
import sys
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BUCKET = "crossjax-test"


def emulator_env(port: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    return {
        "TENSORSTORE_GCS_HTTP_URL": url,             # tensorstore's gcs kvstore (the store, orbax's arrays, paths)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
        "STORAGE_EMULATOR_HOST": url,                # gcsfs (orbax's epath) and google-cloud-storage (tensorboardX)
        "GOOGLE_CLOUD_PROJECT": "crossjax-test",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # the emulator has no bucket-type (control) API
    }


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """{"port", "env", "bucket"} of a running emulator; os.environ points the clients at it for the session."""
    import gcp_storage_emulator  # noqa: F401  (pip install gcp-storage-emulator: the test extra)
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_gcs_emulator.py"), BUCKET],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), f"the GCS emulator did not start: {line!r} (log: {log.name})"
        port = int(line.split()[1])
        env = emulator_env(port)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield {"port": port, "env": env, "bucket": BUCKET}
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        proc.kill()
        proc.wait()
        log.close()


@pytest.fixture
def gcs_url(gcs_emulator, request):
    """A fresh gs:// prefix for one test."""
    return f"gs://{BUCKET}/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def gcs_store(gcs_emulator):
    """The tiny planted store, written to the bucket once for the session (the gs:// runs read it)."""
    from _trainer_util import tiny_config
    from crossjax import planted
    url = f"gs://{BUCKET}/run-store"
    planted.ensure_planted(tiny_config(url).planted, url)
    return url


@pytest.fixture(scope="session")
def gcs_finished_run(gcs_store):
    """A finished planted run whose workdir is on gs:// (16 steps, no checkpoints), for the readers of a finished
    run (the report, the feature index). Tests that change it work on their own copy."""
    from _trainer_util import tiny_config
    from crossjax import pipeline
    workdir = f"gs://{BUCKET}/finished-run"
    pipeline.run(tiny_config(gcs_store, **{"train.steps": 16, "train.checkpoint_every": 0}), workdir)
    return workdir
