"""Fixtures shared by the trainer tests: one planted store and one single-device reference run."""
import pytest

from _trainer_util import STEPS, mesh_overrides, tiny_config


@pytest.fixture(scope="session")
def store_path(tmp_path_factory):
    """One tiny planted store (S=4, D=16, 16 true features, 8 blocks of 512 rows), built once for all tests."""
    from crossjax import planted
    path = str(tmp_path_factory.mktemp("planted") / "store")
    planted.ensure_planted(tiny_config(path).planted, path)
    return path


@pytest.fixture(scope="session")
def one_device_run(store_path, tmp_path_factory):
    """The reference: STEPS float32 steps on a single device, logged every step, no checkpoints."""
    from crossjax import pipeline
    workdir = str(tmp_path_factory.mktemp("one_device"))
    c = tiny_config(store_path, **mesh_overrides(1, 1, 1), **{"train.steps": STEPS, "train.log_every": 1,
                                                              "train.checkpoint_every": 0})
    pipeline.run(c, workdir)
    return workdir
