"""Two `cdiff train` runs for one name: the first proceeds, the second fails at once with one line and
exit code 3; once the first is killed its lock is gone and the name can be trained (or resumed)."""

import os
import signal
import subprocess
import sys
import time

from .conftest import RES


def test_second_train_of_the_same_name_fails_clearly_and_the_lock_dies_with_the_first(home, sd1_base, cat_images):
    env = {**os.environ, "CDIFF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["train", "x", str(cat_images), "--class", "cat", "--base", str(sd1_base), "--batch-size", "2",
            "--resolution", str(RES), "--reg", "none", "--aug-pool", "2", "--device", "cpu", "--checkpoint-every", "1"]
    first = subprocess.Popen([sys.executable, "-m", "cdiff_cli", "-q", *args, "--steps", "100000"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = home / "checkpoints" / "x" / "run.json"
    deadline = time.time() + 120
    while not ckpt.is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.stderr.read()
    second = subprocess.run([sys.executable, "-m", "cdiff_cli", *args, "--steps", "2"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 3, second.stderr
    assert second.stderr.strip().count("\n") == 0 and second.stderr.startswith("error: ") and "busy" in second.stderr
    assert "Traceback" not in second.stderr
    first.send_signal(signal.SIGKILL)  # a crash: the kernel drops its lock
    first.communicate(timeout=60)
    # The killed run left a checkpoint; starting over with --force takes the (now free) lock and finishes.
    third = subprocess.run([sys.executable, "-m", "cdiff_cli", *args, "--steps", "2", "--force"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert (home / "concepts" / "x" / "manifest.json").is_file()
    assert not (home / "checkpoints" / "x").exists()


def test_two_runs_of_different_names_with_one_token_leave_one_owner(home, sd1_base, cat_images):
    """Started together, both runs pass the token check at their start; the check made again under the
    registry's lock when an entry is written lets only one of them keep the token."""
    env = {**os.environ, "CDIFF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def start(name):
        args = ["train", name, str(cat_images), "--class", "cat", "--token", "<same1>", "--base", str(sd1_base),
                "--batch-size", "2", "--resolution", str(RES), "--reg", "none", "--aug-pool", "2", "--device", "cpu",
                "--steps", "30", "--no-samples"]
        return subprocess.Popen([sys.executable, "-m", "cdiff_cli", "-q", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    runs = [start("first"), start("second")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    assert loser.startswith("error: ") and "already used by concept" in loser and "Traceback" not in loser
    owners = [d.name for d in (home / "concepts").iterdir() if (d / "manifest.json").is_file()]
    assert len(owners) == 1 and not list((home / "concepts").glob(".tmp-*"))
