"""The trainer under faults: SIGKILL at random points resumes to the weights of an uninterrupted run;
an output folder that cannot be written, or a disk without room, fails before any work is done; a
second run on the same folder is refused at once by name and the first ends with the weights it would
have had alone; a resume with other data, and a damaged training state, are refused by name."""

import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch
from conftest import BEAGLE
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_beagle.outputs import OutputError, atomic_path, prepare_output_dir
from vllm_beagle.train.loop import STATE_FILE

TRAIN_ARGS = ["--window", "3", "--sim-steps", "2", "--stage1-epochs", "2", "--stage2-epochs", "2", "--batch-size", "4",
              "--max-len", "32", "--lr", "3e-3", "--warmup-steps", "2", "--save-every", "1"]


def train_command(toy, shards, out):
    return [BEAGLE, "train", "--data", os.path.dirname(shards.files[0]), "--target", toy["target_dir"],
            "--out", out, *TRAIN_ARGS]


def _mtime(path):
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


@pytest.fixture(scope="module")
def alone(toy, shards, tmp_path_factory):
    """The checkpoint folder of a run that nothing interrupted or disturbed (its training state beside it)."""
    out = str(tmp_path_factory.mktemp("alone") / "beagle-alone")
    subprocess.run(train_command(toy, shards, out), check=True, capture_output=True, timeout=600)
    return out


def assert_same_weights(expected_dir, got_dir):
    expected, got = load_file(expected_dir + "/model.safetensors"), load_file(got_dir + "/model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_sigkilled_training_resumes_to_the_weights_of_an_uninterrupted_run(toy, shards, alone, tmp_path):
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
    assert_same_weights(alone, resumed)


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


@pytest.mark.parametrize("writer", ["open", "safetensors"])
def test_files_written_whole_get_ordinary_permissions(tmp_path, writer):
    path = str(tmp_path / "weights.safetensors")
    with atomic_path(path) as tmp:
        if writer == "open":
            with open(tmp, "wb") as f:
                f.write(b"x")
        else:
            save_file({"w": torch.zeros(2)}, tmp)
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
    assert os.listdir(tmp_path) == ["weights.safetensors"]


def test_a_disk_without_room_is_refused_before_work(tmp_path):
    with pytest.raises(OutputError, match="needs up to .* GiB but .* GiB free"):
        prepare_output_dir(str(tmp_path / "out"), 2**62, "the training data")
    prepare_output_dir(str(tmp_path / "out"), 1, "the training data")  # room for a byte


def test_a_second_run_on_a_training_folder_is_refused_and_the_first_ends_as_it_would_alone(toy, shards, alone,
                                                                                         tmp_path):
    out = str(tmp_path / "beagle-locked")
    first = subprocess.Popen(train_command(toy, shards, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        lock = os.path.join(out + ".train", ".lock")
        while first.poll() is None and not (os.path.exists(lock) and open(lock).read().strip()):
            time.sleep(0.01)
        # A toy run can end before a second process has imported torch: pause the first while it holds the
        # lock (a stopped process keeps its flock), so the two always meet; it goes on once refused.
        assert first.poll() is None, "the first run ended before it held the training folder"
        first.send_signal(signal.SIGSTOP)
        try:
            second = subprocess.run(train_command(toy, shards, out), capture_output=True, text=True, timeout=300)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"the training folder {out}.train is in use by process {first.pid}" in second.stderr, second.stderr
        _, errors = first.communicate(timeout=600)
        assert first.returncode == 0, errors[-3000:]
    finally:
        first.kill()
        first.wait(timeout=60)
    assert_same_weights(alone, out)


def test_a_resume_on_other_data_is_refused_by_name_and_keeps_the_state(toy, shards, alone, tmp_path):
    """The finished run's training state, resumed on a copy of its data (accepted), then on a folder with a
    shard fewer and on the copy with one state value changed in place (same size): both refused."""
    data = str(tmp_path / "data")
    shutil.copytree(os.path.dirname(shards.files[0]), data)
    out = str(tmp_path / "beagle-resumed")
    shutil.copytree(alone + ".train", out + ".train")
    state = out + ".train/" + STATE_FILE

    def resume(folder):
        return subprocess.run([BEAGLE, "train", "--data", folder, "--target", toy["target_dir"], "--out", out,
                               *TRAIN_ARGS], capture_output=True, text=True, timeout=600)

    result = resume(data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(alone, out)
    files = [os.path.join(data, os.path.basename(f)) for f in shards.files]
    fewer = str(tmp_path / "fewer")
    shutil.copytree(data, fewer, ignore=lambda folder, names: [os.path.basename(files[-1])])
    with safe_open(files[0], "pt") as f:
        metadata = f.metadata()
    tensors = load_file(files[0])
    tensors["states"][0, 0] += 1
    size = os.path.getsize(files[0])
    save_file(tensors, files[0], metadata=metadata)
    assert os.path.getsize(files[0]) == size
    saved = open(state, "rb").read()
    for folder in (fewer, data):
        result = resume(folder)
        assert result.returncode != 0 and "Traceback" not in result.stderr, (folder, result.stderr[-3000:])
        assert f"the training state {state} belongs to another run: data differ" in result.stderr, result.stderr
        assert open(state, "rb").read() == saved


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_training_state_is_named_with_what_to_do(toy, shards, tmp_path, damage):
    out = str(tmp_path / "beagle-damaged")
    proc = subprocess.run(train_command(toy, shards, out), capture_output=True, timeout=600)
    assert proc.returncode == 0
    state = out + ".train/" + STATE_FILE
    data = open(state, "rb").read()
    with open(state, "wb") as f:
        f.write(b"" if damage == "empty" else data[:len(data) // 2])
    result = subprocess.run(train_command(toy, shards, out), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"the training state {state} is damaged" in result.stderr and "delete it" in result.stderr


def test_a_torn_last_evaluation_line_is_passed_over(tmp_path):
    from vllm_beagle.train.loop import EVAL_FILE, last_evaluation

    (tmp_path / EVAL_FILE).write_text('{"epoch": 1, "tau": 1.5}\n{"epoch": 2, "ta')
    assert last_evaluation(str(tmp_path)) == {"epoch": 1, "tau": 1.5}
