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
