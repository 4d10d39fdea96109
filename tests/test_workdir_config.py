"""workdir/config.json guards a run: the same config resumes, another is refused, and the keys that move work
around without changing the numbers trained (RESUME_SAFE_KEYS) may change between a run and its resumption."""
import pytest

from crossjax import configs, workdir
from crossjax.errors import CrossjaxError


@pytest.fixture
def recorded(tmp_path):
    config = configs.load_experiment("experiments/tiny.py")
    workdir.record(config, str(tmp_path))
    return config, str(tmp_path)


def test_the_same_config_resumes(recorded):
    config, path = recorded
    assert workdir.check(config, path, configs.base_config()) is True


@pytest.mark.parametrize("key,value", [("data.on_the_fly", True), ("data.streams", 4), ("mesh.feature", 2),
                                       ("train.checkpoint_every", 7)])
def test_keys_that_do_not_change_the_numbers_may_change(recorded, key, value):
    config, path = recorded
    section, name = key.split(".")
    config[section][name] = value
    assert workdir.check(config, path, configs.base_config()) is True


def test_a_key_that_changes_the_numbers_is_refused(recorded):
    config, path = recorded
    config.train.lr = config.train.lr * 2
    with pytest.raises(CrossjaxError, match=r"holds a run of another config \(1 key\(s\) differ\):\n  train.lr"):
        workdir.check(config, path, configs.base_config())
