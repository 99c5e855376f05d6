"""A SIGKILLed driver's private local Ray does not outlive it for long: its processes carry
the driver's identity (`connect.OWNER`), and the next local Ray that vqtok starts stops
them; a live driver's Ray is never touched (issue 21 item 5)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines.cluster.connect import OWNER, local_ray_pids, reap_orphans
from pipelines.cluster.procs import alive, start_time

DRIVER = (
    "import time\n"
    "from pipelines.cluster.connect import init_ray\n"
    "init_ray(num_cpus=1, include_dashboard=False)\n"
    "print('up', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_killed_drivers_local_ray_is_reaped_and_a_live_ones_is_not():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RAY_ADDRESS": ""})  # fmt: skip
    try:
        line = driver.stdout.readline()
        while line.startswith("[vqtok] stopped"):  # what an earlier test's Ray left, reaped
            line = driver.stdout.readline()
        assert line.strip() == "up"
        ray_pids = local_ray_pids(driver.pid)
        assert ray_pids, "the local Ray's processes carry their driver's identity"
        assert OWNER not in os.environ  # only Ray's processes, not the driver's later children
        assert not any(str(p) in line.split()[0] for line in reap_orphans() for p in ray_pids)
        assert all(alive(p) for p in ray_pids)  # the driver lives: nothing of it stopped
        tag = f"{driver.pid}:{start_time(driver.pid)}"  # what its Ray's processes carry
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        time.sleep(2)
        # some of Ray's processes may exit on their own by now; a planted one stands for
        # those that do not (the agents the issue found): same tag, owner gone
        planted = subprocess.Popen(["sleep", "600"], env={**os.environ, OWNER: tag})
        time.sleep(0.5)
        left = [p for p in local_ray_pids(driver.pid) if alive(p)]
        assert planted.pid in left
        stopped = reap_orphans()
        assert {int(line.split()[0]) for line in stopped} >= set(left)
        planted.wait(timeout=30)
        deadline = time.monotonic() + 30
        while [p for p in left if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [p for p in left if alive(p)]
    finally:
        if driver.poll() is None:
            driver.kill()
        for p in local_ray_pids(driver.pid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
