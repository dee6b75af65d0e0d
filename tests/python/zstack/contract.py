"""Contract check of the mock ZStack against a real message-API client.

`zstack-mcp-server` (PyPI, by ZStack; pinned in
tests/python/requirements-nodeps.txt) ships `zstack_mcp.zstack_client`, a
client of ZStack's message API (`POST /zstack/api/` with
`{"<message class>": {...}}`, results of asynchronous messages polled at
`/zstack/api/result/<uuid>`). This script drives that client, unmodified,
against the mock: login with a right and a wrong password, the queries a
backup product makes (VMs, volumes, images, backup and primary storage,
snapshots, instance offerings, L3 networks) with conditions, paging and
counts, an asynchronous snapshot create + delete completed by polling, and
a session invalidated behind the client's back that the client's own
re-login repairs. Full message names and sync/async come from the
package's own catalogue (`zstack_mcp/data/api_docs.json`), so the client
decides them.

Every HTTP call the client makes under /zstack/api is counted; each must
answer 2xx. Prints `calls=N logins=L` on the last line; exits non-zero on
any failure.

Environment: ZSTACK_URL (the mock's base URL, without /zstack),
ZSTACK_ACCOUNT, ZSTACK_PASSWORD, ZSTACK_ADMIN (the mock's admin URL),
ZSTACK_BACKUP_STORAGES (how many backup storages the mock holds).
"""
import asyncio
import json
import os
import sys
from pathlib import Path

import httpx

URL = os.environ["ZSTACK_URL"].rstrip("/")
ADMIN = os.environ["ZSTACK_ADMIN"].rstrip("/")
ACCOUNT = os.environ["ZSTACK_ACCOUNT"]
PASSWORD = os.environ["ZSTACK_PASSWORD"]
BACKUP_STORAGES = int(os.environ["ZSTACK_BACKUP_STORAGES"])

calls = []
unexpected = []
_original_send = httpx.AsyncClient.send


async def _counting(self, request, *args, **kwargs):
    resp = await _original_send(self, request, *args, **kwargs)
    url = str(request.url)
    if url.startswith(URL + "/zstack/api"):
        body = request.content.decode("utf-8", "replace") if request.method == "POST" else ""
        what = next(iter(json.loads(body)), "?").rsplit(".", 1)[-1] if body else url[len(URL):]
        calls.append((request.method, what, resp.status_code))
        if resp.status_code >= 400:
            unexpected.append(f"{request.method} {what}: HTTP {resp.status_code} {resp.text[:200]}")
    return resp


httpx.AsyncClient.send = _counting

import zstack_mcp  # noqa: E402
from zstack_mcp.zstack_client import ZStackApiError, ZStackClient  # noqa: E402

DOCS = json.loads((Path(zstack_mcp.__file__).parent / "data" / "api_docs.json").read_text("utf-8"))
QUERIES = {
    # short name -> key of the mock's admin objects holding the same set
    "QueryVmInstance": "vms",
    "QueryVolume": "volumes",
    "QueryImage": "images",
    "QueryVolumeSnapshot": "snapshots",
    "QueryInstanceOffering": "instance_offerings",
    "QueryL3Network": "l3_networks",
    "QueryBackupStorage": None,
    "QueryPrimaryStorage": None,
}
# Fields each inventory must carry (all of them listed by the catalogue's
# primitive_fields for that query).
CORE = {
    "QueryVmInstance": ["uuid", "name", "state", "rootVolumeUuid", "imageUuid", "cpuNum", "memorySize"],
    "QueryVolume": ["uuid", "name", "type", "size", "vmInstanceUuid", "primaryStorageUuid", "format"],
    "QueryImage": ["uuid", "name", "status", "state", "size", "format", "mediaType"],
    "QueryVolumeSnapshot": ["uuid", "name", "volumeUuid", "size"],
    "QueryInstanceOffering": ["uuid", "name", "cpuNum", "memorySize"],
    "QueryL3Network": ["uuid", "name"],
    "QueryBackupStorage": ["uuid", "name", "type", "state", "status"],
    "QueryPrimaryStorage": ["uuid", "name", "type", "state", "status"],
}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def doc(name):
    d = DOCS.get(name)
    check(d is not None, f"{name} is not in the client's API catalogue")
    return d


async def run(client, name, params=None):
    d = doc(name)
    return await client.execute(name, d["apiName"], dict(params or {}), is_async=d["callType"] == "async")


async def query(client, name, conditions=(), **extra):
    return await run(client, name, {"conditions": list(conditions), **extra})


def admin_objects():
    r = httpx.get(f"{ADMIN}/zstack/objects", timeout=30)
    r.raise_for_status()
    return r.json()


def logins():
    return sum(1 for c in calls if c[1] == "APILogInByAccountMsg")


async def main():
    notes = []
    # A wrong password is refused with ZStack's authentication error.
    wrong = ZStackClient(api_url=URL, account=ACCOUNT, password=PASSWORD + "-wrong")
    try:
        await wrong.login()
        raise AssertionError("a wrong password logged in")
    except ZStackApiError as e:
        check(e.code == "ID.1000", f"wrong password: {e.code} {e}")
    finally:
        await wrong.close()

    client = ZStackClient(api_url=URL, account=ACCOUNT, password=PASSWORD)
    session = await client.login()
    check(len(session.uuid) == 32 and session.account_uuid, f"session {session}")

    # An asynchronous snapshot create, completed by polling (the snapshot
    # is then one of the objects the queries below must return).
    vols = await query(client, "QueryVolume", [{"name": "type", "op": "=", "value": "Root"}])
    check(vols["inventories"], f"no root volume: {vols}")
    vol = vols["inventories"][0]
    create = doc("CreateVolumeSnapshot")
    check(create["callType"] == "async", f"CreateVolumeSnapshot is {create['callType']}")
    polls_before = sum(1 for c in calls if c[0] == "GET")
    evt = await run(client, "CreateVolumeSnapshot", {"volumeUuid": vol["uuid"], "name": "contract-sn"})
    check(sum(1 for c in calls if c[0] == "GET") > polls_before, "the snapshot finished without a poll")
    sn = evt.get("inventory") or {}
    check(sn.get("volumeUuid") == vol["uuid"] and sn.get("name") == "contract-sn", f"snapshot event {evt}")
    check(any(s["uuid"] == sn["uuid"] for s in admin_objects()["snapshots"]), "the mock lacks the snapshot")

    # Every query returns the mock's objects, with the catalogue's fields.
    objects = admin_objects()
    seen = {}
    for name, key in QUERIES.items():
        d = doc(name)
        check(d["callType"] == "sync", f"{name} is {d['callType']}")
        reply = await query(client, name)
        invs = reply.get("inventories")
        check(isinstance(invs, list), f"{name}: no inventories in {reply}")
        check("total" not in reply, f"{name}: total without replyWithCount")
        uuids = sorted(i["uuid"] for i in invs)
        if key is not None:
            want = sorted(o["uuid"] for o in objects[key])
            check(uuids == want, f"{name}: {uuids} != mock's {key} {want}")
        elif name == "QueryBackupStorage":
            check(len(invs) == BACKUP_STORAGES, f"{name}: {len(invs)} != {BACKUP_STORAGES}")
        else:
            check(len(invs) == 1, f"{name}: {len(invs)} primary storages")
        check(invs, f"{name}: nothing to check (no objects)")
        listed = set(d.get("primitive_fields", []))
        for f in CORE[name]:
            check(f in listed, f"{name}: the catalogue does not list {f}")
            for inv in invs:
                check(f in inv, f"{name}: {inv.get('uuid')} has no {f}: {inv}")
        missing = sorted(f for f in listed if not f.startswith("__") and f not in invs[0])
        if missing:
            notes.append(f"{name}: catalogue fields the mock leaves out: {', '.join(missing)}")
        extra = sorted(f for f in invs[0] if f not in listed)
        if extra:
            notes.append(f"{name}: fields beyond the catalogue's primitive ones: {', '.join(extra)}")
        # `fields` returns only those fields.
        only = await query(client, name, fields=["uuid", "name"])
        check(all(set(i) <= {"uuid", "name"} and "uuid" in i for i in only["inventories"]),
              f"{name} fields: {only}")
        seen[name] = invs

    vms = seen["QueryVmInstance"]
    check(len(vms) >= 3, f"need 3 VMs for paging, have {len(vms)}")
    vm = vms[0]

    # Conditions: =, !=, like (% and _), in.
    r = await query(client, "QueryVmInstance", [{"name": "uuid", "op": "=", "value": vm["uuid"]}])
    check([i["uuid"] for i in r["inventories"]] == [vm["uuid"]], f"= {r}")
    r = await query(client, "QueryVmInstance", [{"name": "uuid", "op": "!=", "value": vm["uuid"]}])
    check(len(r["inventories"]) == len(vms) - 1 and vm["uuid"] not in [i["uuid"] for i in r["inventories"]],
          f"!= {r}")
    pattern = "%" + vm["name"][1:-1] + "_"
    r = await query(client, "QueryVmInstance", [{"name": "name", "op": "like", "value": pattern}])
    check(vm["uuid"] in [i["uuid"] for i in r["inventories"]], f"like {pattern}: {r}")
    r = await query(client, "QueryVmInstance", [{"name": "name", "op": "like", "value": "no-such-%"}])
    check(r["inventories"] == [], f"like no-such: {r}")
    two = [vms[0]["uuid"], vms[1]["uuid"]]
    r = await query(client, "QueryVmInstance", [{"name": "uuid", "op": "in", "value": ",".join(two)}])
    check(sorted(i["uuid"] for i in r["inventories"]) == sorted(two), f"in {r}")
    r = await query(client, "QueryVolume", [{"name": "vmInstanceUuid", "op": "=", "value": vol["vmInstanceUuid"]},
                                            {"name": "type", "op": "=", "value": "Root"}])
    check([i["uuid"] for i in r["inventories"]] == [vol["uuid"]], f"two conditions: {r}")

    # Paging: limit/start pages cover every VM once; replyWithCount gives the total.
    pages = []
    start = 0
    while True:
        r = await query(client, "QueryVmInstance", limit=2, start=start, replyWithCount=True)
        check(r.get("total") == len(vms), f"total {r.get('total')} != {len(vms)}")
        check(len(r["inventories"]) <= 2, f"limit 2 gave {len(r['inventories'])}")
        pages.extend(i["uuid"] for i in r["inventories"])
        start += 2
        if start >= r["total"]:
            break
    check(sorted(pages) == sorted(i["uuid"] for i in vms), f"pages {pages}")
    r = await query(client, "QueryVmInstance", count=True)
    check(r.get("total") == len(vms) and "inventories" not in r, f"count: {r}")
    r = await query(client, "QueryVolume", [{"name": "type", "op": "=", "value": "Root"}], count=True)
    check(r.get("total") == len(vms), f"count with a condition: {r}")

    # ... and deleted, again through polling.
    check(doc("DeleteVolumeSnapshot")["callType"] == "async", "DeleteVolumeSnapshot is not async")
    await run(client, "DeleteVolumeSnapshot", {"uuid": sn["uuid"]})
    r = await query(client, "QueryVolumeSnapshot", [{"name": "uuid", "op": "=", "value": sn["uuid"]}])
    check(r["inventories"] == [], f"deleted snapshot still queried: {r}")
    # A failing asynchronous message carries ZStack's error through the poll.
    try:
        await run(client, "DeleteVolumeSnapshot", {"uuid": sn["uuid"]})
        raise AssertionError("deleting a deleted snapshot succeeded")
    except ZStackApiError as e:
        # (the v1 handler's not-found error, whichever SYS code it uses)
        check((e.code or "").startswith("SYS.") and "not found" in str(e.details), f"delete twice: {e.code} {e}")

    # A session ended behind the client's back: its own re-login repairs it,
    # for a query and for an asynchronous message (the error then comes
    # through the poll).
    for what in ("QueryVmInstance", "CreateVolumeSnapshot"):
        old = client.session.uuid
        other = ZStackClient(api_url=URL, session_id=old)
        await other.execute("LogOut", doc("LogOut")["apiName"], {"sessionUuid": old})
        await other.close()
        before = logins()
        if what == "QueryVmInstance":
            r = await query(client, what)
            check(len(r["inventories"]) == len(vms), f"after re-login: {r}")
        else:
            evt = await run(client, what, {"volumeUuid": vol["uuid"], "name": "contract-sn-2"})
            await run(client, "DeleteVolumeSnapshot", {"uuid": evt["inventory"]["uuid"]})
        check(logins() == before + 1, f"{what}: {logins() - before} logins to repair the session")
        check(client.session.uuid != old, f"{what}: the session was not replaced")

    # A client holding only a dead session id (no password) gets the error.
    dead = ZStackClient(api_url=URL, session_id="0" * 32)
    try:
        await query(dead, "QueryVmInstance")
        raise AssertionError("a dead session was accepted")
    except ZStackApiError as e:
        check(e.code == "ID.1001", f"dead session: {e.code} {e}")
    finally:
        await dead.close()

    # A message the mock does not emulate is answered as ZStack answers a
    # class it lacks: plain text, which the client reports as unparsable.
    try:
        await query(client, "QueryZone")
        raise AssertionError("QueryZone answered")
    except ZStackApiError as e:
        check("Unable to deserialize class" in str(e), f"QueryZone: {e}")

    await client.logout()
    return notes


def main_sync():
    try:
        notes = asyncio.run(main())
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        print(f"FAILED: {e}", file=sys.stderr)
        for c in calls[-10:]:
            print("  recent call:", c, file=sys.stderr)
        sys.exit(1)
    for n in notes:
        print("note:", n)
    if unexpected:
        for u in unexpected:
            print("unexpected:", u, file=sys.stderr)
        sys.exit(1)
    print(f"calls={len(calls)} logins={logins()}")


if __name__ == "__main__":
    main_sync()
