"""Builds a micro suite in a subprocess, slowed down per step so a test can SIGKILL it between snapshots.

usage: python tests/suite/_suite_build_proc.py SUITE_DIR SECONDS_PER_STEP
The sleep happens outside the jitted step, so the numbers are those of an ordinary build.
"""
import sys
import time

from crossjax import configs
from crossjax.suite import model, pretrain


def main():
    out_dir, delay = sys.argv[1], float(sys.argv[2])
    section = configs.suite_config("micro")
    section.dir = out_dir
    section.progress = False
    trainer = model.get_trainer(pretrain.validate(section))
    step = trainer.step

    def slow_step(*args):
        time.sleep(delay)
        return step(*args)

    trainer.step = slow_step
    pretrain.ensure_suite(section)


if __name__ == "__main__":
    main()
