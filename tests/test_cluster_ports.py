"""What a Ray that vqtok starts exposes: every port its processes listen on is loopback
(issue 21 item 5). Ray binds its daemons to the node's address, and takes loopback as that
address only where it believes no cluster can be made (`connect.LOOPBACK_ENV`); before it,
the GCS, raylet, agents and metrics exporters of a private local Ray listened on every
interface. `vqtok cluster up` is checked live in `test_cluster.py::test_cluster_up_submit_down`.
"""

import json
import os
import subprocess
import sys

import pytest

from pipelines.cluster.connect import LOOPBACK_ENV, local_ray_pids, reap_orphans
from pipelines.cluster.procs import listening

# a worker process is started too (a task runs), and the dashboard, as vqtok runs have it
DRIVER = (
    "import json, os, ray\n"
    "from pipelines.cluster.connect import LOOPBACK_ENV, init_ray\n"
    "init_ray(num_cpus=1)\n"
    "node = ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote())\n"
    "print(json.dumps({'node': node, 'env': {k: os.environ.get(k) for k in LOOPBACK_ENV}}))\n"
    "input()\n"
)


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    return host.startswith("127.") or host in ("::1", "[::1]")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_private_local_rays_ports_listen_on_loopback_only():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RAY_ADDRESS": ""})  # fmt: skip
    try:
        said = json.loads(driver.stdout.readline())
        pids = [driver.pid, *local_ray_pids(driver.pid)]
        ports = listening(pids)
        assert len(pids) >= 4 and len(ports) >= 6, (pids, ports)  # GCS, raylet, agents, ...
        assert all(_is_loopback(a) for a in ports), ports
        assert said["node"] == "127.0.0.1"
        # the flag is the Ray processes', not the driver's for good: a later ray.init of the
        # same process may join a real cluster
        assert said["env"] == {k: os.environ.get(k) for k in LOOPBACK_ENV}
    finally:
        driver.communicate("\n", timeout=60)
        reap_orphans()  # what its Ray has not stopped yet, or the next local Ray reports it
