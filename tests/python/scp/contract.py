"""Contract check of the mock SCP against a real Open API client.

`sangfor-scp` (PyPI, pinned in tests/python/requirements.txt) is a client of
the real platform's API; this script drives it against the mock: login with
a right and a wrong password (RSA PKCS#1 v1.5, the modulus from
/janus/v2/public-key), access-key signing, version, servers (paged, get,
the 20240725 configuration), volumes, images, resource pools, tasks that go
waiting -> doing -> finish, and a task that fails with the platform's error.

Every HTTP call the client makes under /janus is counted; each must succeed
except the few this script expects to fail (marked with `expect_failure`).
Prints `calls=N failures_expected=M` on the last line.

Environment: SCP_URL, SCP_USER, SCP_PASSWORD, SCP_ACCESS_KEY,
SCP_SECRET_KEY, SCP_ADMIN (the mock's admin URL, for the task fault),
SCP_SERVERS (how many servers the mock holds), SCP_DISKS (their disks in
all), SCP_IMAGES (base images).
"""
import contextlib
import os
import sys

import requests

URL = os.environ["SCP_URL"].rstrip("/")
ADMIN = os.environ["SCP_ADMIN"].rstrip("/")

calls = []
unexpected = []
expecting = [0]
expected_failures = [0]
_original = requests.sessions.Session.request


def _counting(self, method, url, *args, **kwargs):
    resp = _original(self, method, url, *args, **kwargs)
    if url.startswith(URL + "/janus"):
        path = url[len(URL):].split("?")[0]
        calls.append((method.upper(), path, resp.status_code))
        if resp.status_code >= 400:
            if expecting[0]:
                expected_failures[0] += 1
            else:
                unexpected.append(f"{method.upper()} {path}: HTTP {resp.status_code} {resp.text[:200]}")
    return resp


requests.sessions.Session.request = _counting

from sangfor_scp import SCPClient  # noqa: E402
from sangfor_scp.exceptions import SCPAuthError, SCPTaskError  # noqa: E402


@contextlib.contextmanager
def expect_failure():
    expecting[0] += 1
    try:
        yield
    finally:
        expecting[0] -= 1


def check(cond, what):
    if not cond:
        raise AssertionError(what)


user = os.environ["SCP_USER"]
password = os.environ["SCP_PASSWORD"]
client = SCPClient(host=URL, username=user, password=password, timeout=30)

# A wrong password is refused.
with expect_failure():
    try:
        SCPClient(host=URL, username=user, password=password + "-wrong", timeout=30)
        raise AssertionError("a wrong password logged in")
    except SCPAuthError:
        pass

# Version.
version = client.system.version()
check(version["build_version"].startswith("SCP"), f"build_version {version}")

# Servers, paged two at a time.
n_servers = int(os.environ["SCP_SERVERS"])
check(client.servers.count() == n_servers, "servers.count()")
first = client.servers.list_page(page_num=0, page_size=2)
check(first["total_size"] == n_servers, f"total_size {first}")
check(len(first["data"]) == min(2, n_servers), "first page size")
check((first["next_page_num"] != "") == (n_servers > 2), f"next_page_num {first['next_page_num']!r}")
servers = list(client.servers.list_all(page_size=2))
check(len(servers) == n_servers, f"list_all gave {len(servers)} servers")
check(len({s["id"] for s in servers}) == n_servers, "list_all repeated a server")
for s in servers:
    vm = client.servers.get(s["id"])
    check(vm["cores"] >= 1 and vm["memory_mb"] > 0, f"cores/memory_mb of {vm['id']}")
    check(all(d["size_mb"] > 0 for d in vm["disks"]), f"disks size_mb of {vm['id']}")
    check(client.volumes.list_attached(s["id"]) == vm["disks"], "list_attached")
config = client.servers.get_config(servers[0]["id"])
check(config["id"] == servers[0]["id"], "get_config")
check(client.servers.find_by_name(servers[-1]["name"])["id"] == servers[-1]["id"], "find_by_name")

# Volumes.
volumes = client.volumes.list(page_size=1)
check(len(volumes) == int(os.environ["SCP_DISKS"]), f"{len(volumes)} volumes")
check(client.volumes.get(volumes[0]["id"])["size_mb"] == volumes[0]["size_mb"], "volumes.get")

# Images and resource pools.
images = client.images.list()
check(len(images) == int(os.environ["SCP_IMAGES"]), f"{len(images)} images")
if images:
    check(client.images.get(images[0]["id"])["name"] == images[0]["name"], "images.get")
pools = client.resource_pools.list()
check(len(pools) >= 1, "resource pools")
check(client.resource_pools.get(pools[0]["id"])["id"] == pools[0]["id"], "resource_pools.get")

# A task, polled through its states.
target = servers[0]
seen = []
task_id = client.servers.rename(target["id"], target["name"] + "-renamed")
check(task_id, "rename answered no task_id")
done = client.tasks.wait(task_id, timeout=30, poll_interval=0, progress_callback=lambda t: seen.append(t["status"]))
check(done["status"] == "finish" and done["progress"] == 100, f"task ended {done}")
check(seen[0] == "waiting" and "doing" in seen, f"task states {seen}")
check(client.servers.get(target["id"])["name"] == target["name"] + "-renamed", "rename not applied")
task_id = client.servers.rename(target["id"], target["name"])
client.tasks.wait(task_id, timeout=30, poll_interval=0)
check(any(t["task_id"] == task_id for t in client.tasks.list(object_id=target["id"])), "tasks.list")

# A task that fails carries the platform's error.
message = "Mock platform error: the datastore is read-only"
requests.post(f"{ADMIN}/scp/faults/tasks", json={"action": "update_server", "message": message, "times": 1}).raise_for_status()
task_id = client.servers.rename(target["id"], target["name"] + "-never")
try:
    client.tasks.wait(task_id, timeout=30, poll_interval=0)
    raise AssertionError("a failed task finished")
except SCPTaskError as e:
    check(message in str(e), f"task error {e}")
    check(e.task_data["progress"] == -1, f"failed task {e.task_data}")
check(client.servers.get(target["id"])["name"] == target["name"], "a failed task changed the server")
check(any(t["task_id"] == task_id for t in client.tasks.list(status="failure")), "failed task listed")

# Access key / secret key signing.
signed = SCPClient(host=URL, access_key=os.environ["SCP_ACCESS_KEY"], secret_key=os.environ["SCP_SECRET_KEY"], timeout=30)
check(len(signed.servers.list()) == n_servers, "signed servers.list")
check(signed.system.version() == version, "signed version")
with expect_failure():
    bad = SCPClient(host=URL, access_key=os.environ["SCP_ACCESS_KEY"], secret_key="wrong", timeout=30)
    try:
        bad.servers.list()
        raise AssertionError("a wrong secret key was accepted")
    except SCPAuthError:
        pass

if unexpected:
    print("unexpected failures:\n" + "\n".join(unexpected))
    sys.exit(1)
check(expected_failures[0] == 2, f"expected 2 refused calls, saw {expected_failures[0]}")
print(f"calls={len(calls)} failures_expected={expected_failures[0]}")
