"""The trainer under faults: SIGKILL at random points resumes to the weights of an uninterrupted run;
an output folder that cannot be written, or a disk without room, fails before any work is done."""

import os
import random
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import BEAGLE
from vllm_beagle.outputs import OutputError, prepare_output_dir
from vllm_beagle.train.loop import STATE_FILE

TRAIN_ARGS = ["--window", "3", "--sim-steps", "2", "--stage1-epochs", "2", "--stage2-epochs", "2", "--batch-size", "4",
              "--max-len", "32", "--lr", "3e-3", "--warmup-steps", "2", "--save-every", "1"]


def train_command(toy, shards, out):
    return [BEAGLE, "train", "--data", os.path.dirname(shards.files[0]), "--target", toy["target_dir"],
            "--out", out, *TRAIN_ARGS]


def _mtime(path):
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


def test_sigkilled_training_resumes_to_the_weights_of_an_uninterrupted_run(toy, shards, tmp_path):
    whole = str(tmp_path / "beagle-whole")
    subprocess.run(train_command(toy, shards, whole), check=True, capture_output=True, timeout=600)
    resumed = str(tmp_path / "beagle-resumed")
    state = resumed + ".train/" + STATE_FILE
    rng = random.Random(0)
    killed = 0
    for _ in range(4):
        before = _mtime(state)
        proc = subprocess.Popen(train_command(toy, shards, resumed), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # Wait for this process's first save, then kill it a random moment later: during a step or a save.
        while proc.poll() is None and _mtime(state) == before:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait(timeout=60)
    assert killed >= 3, f"only {killed} of 4 runs were still going when killed; the test no longer interrupts"
    subprocess.run(train_command(toy, shards, resumed), check=True, capture_output=True, timeout=600)
    expected, got = load_file(whole + "/model.safetensors"), load_file(resumed + "/model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.parametrize("command", ["train", "data"])
def test_unwritable_output_fails_at_once_with_a_clear_message(toy, shards, tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = str(blocker / "beagle-out")
    args = (train_command(toy, shards, out) if command == "train"
            else [BEAGLE, "data", toy["target_dir"], "--out", out, "--num-prompts", "4"])
    start = time.monotonic()
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"beagle {command}: cannot write" in result.stderr and str(blocker) in result.stderr, result.stderr
    assert time.monotonic() - start < 120


def test_a_disk_without_room_is_refused_before_work(tmp_path):
    with pytest.raises(OutputError, match="needs up to .* GiB but .* GiB free"):
        prepare_output_dir(str(tmp_path / "out"), 2**62, "the training data")
    prepare_output_dir(str(tmp_path / "out"), 1, "the training data")  # room for a byte
