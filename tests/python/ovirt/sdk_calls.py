"""
Contract script: every engine endpoint provider-ovirt uses, called through
the official SDK (ovirt-engine-sdk-python) and the image server through
ovirt-imageio's client, against a started mock hypervisor.

Environment: OVIRT_URL (engine root, https://host:port), OVIRT_USER,
OVIRT_PASSWORD, OVIRT_CA_FILE, OVIRT_VM (name of the VM to back up),
OVIRT_APPLIANCE (name of the backup appliance VM).

Prints one JSON line: {"calls": N, "names": [...], "full": {disk: sha256},
"dirty": {disk: [[start, length], ...]}}: the disks read in full through a
backup's image transfers (for the caller to compare with the mock's disk
contents) and the dirty extents of the incremental that follows.
"""

import datetime
import hashlib
import json
import os
import time
import uuid

import ovirtsdk4 as sdk
import ovirtsdk4.types as types
from ovirt_imageio import client as imageio

CALLS = []


def call(name, fn, *args, **kwargs):
    result = fn(*args, **kwargs)
    CALLS.append(name)
    return result


def expect_error(name, cls, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except cls as e:
        CALLS.append(name)
        return e
    raise AssertionError("%s: expected %s" % (name, cls.__name__))


def poll(name, fn, done, timeout=30):
    start = time.monotonic()
    while True:
        obj = call(name, fn)
        if done(obj):
            return obj
        if time.monotonic() - start > timeout:
            raise AssertionError("%s: timed out, last %r" % (name, obj))
        time.sleep(0.1)


def check_date(obj, field):
    value = getattr(obj, field)
    assert isinstance(value, datetime.datetime), (field, value)


def read_all(url, ca_file, size):
    """sha256 of the whole image, reading data extents with ranged GETs."""
    h = hashlib.sha256()
    with imageio.ImageioClient(url, cafile=ca_file) as c:
        assert c.size() == size, (c.size(), size)
        pos = 0
        for ext in c.extents("zero"):
            assert ext.start == pos, (ext.start, pos)
            if ext.zero:
                h.update(bytes(ext.length))
            else:
                buf = bytearray(ext.length)
                c.read(ext.start, buf)
                h.update(buf)
            pos += ext.length
        assert pos == size
    return h.hexdigest()


def main():
    url = os.environ["OVIRT_URL"]
    ca_file = os.environ["OVIRT_CA_FILE"]
    connection = sdk.Connection(
        url=url + "/ovirt-engine/api",
        username=os.environ["OVIRT_USER"],
        password=os.environ["OVIRT_PASSWORD"],
        ca_file=ca_file,
    )
    system = connection.system_service()

    api = call("GET /", system.get)
    assert api.product_info.version.major == 4

    vms_service = system.vms_service()
    vm = call("GET /vms?search", vms_service.list,
              search="name=%s" % os.environ["OVIRT_VM"])[0]
    check_date(vm, "creation_time")
    vm_service = vms_service.vm_service(vm.id)
    full_vm = call("GET /vms/{vm}?all_content", vm_service.get,
                   all_content=True)
    ovf = full_vm.initialization.configuration.data
    assert ovf.startswith("<?xml") or ovf.startswith("<ovf"), ovf[:40]
    call("GET /vms", vms_service.list)

    disks_service = system.disks_service()
    attachments = call("GET /vms/{vm}/diskattachments",
                       vm_service.disk_attachments_service().list)
    disks = []
    for a in attachments:
        call("GET /vms/{vm}/diskattachments/{disk}",
             vm_service.disk_attachments_service()
             .attachment_service(a.id).get)
        d = call("GET /disks/{disk}",
                 disks_service.disk_service(a.disk.id).get)
        assert d.provisioned_size > 0 and d.format is not None
        disks.append(d)
    call("GET /disks", disks_service.list)

    sd = disks[0].storage_domains[0]
    assert sd.id and sd.href, "storage domain without id and href"
    sds = system.storage_domains_service()
    sd = call("GET /storagedomains/{sd}", sds.storage_domain_service(sd.id).get)
    call("GET /storagedomains", sds.list)
    call("GET /datacenters", system.data_centers_service().list)
    call("GET /hosts", system.hosts_service().list)
    call("GET /jobs", system.jobs_service().list)

    # Faults map to the SDK's errors.
    expect_error("GET /vms/{unknown} -> 404", sdk.NotFoundError,
                 vms_service.vm_service(
                     "00000000-0000-0000-0000-000000000000").get)
    expect_error("GET /vms/{vm}/affinitylabels (unrouted) -> 404",
                 sdk.NotFoundError,
                 vm_service.affinity_labels_service().list)
    expect_error("POST /disks without storage domain -> 400", sdk.Error,
                 disks_service.add,
                 types.Disk(name="no-sd", format=types.DiskFormat.RAW,
                            provisioned_size=1 << 20))

    # Snapshot attach (the backup API).
    appliance = call("GET /vms?search (appliance)", vms_service.list,
                     search="name=%s" % os.environ["OVIRT_APPLIANCE"])[0]
    agent_attachments = vms_service.vm_service(
        appliance.id).disk_attachments_service()
    snaps_service = vm_service.snapshots_service()
    snap = call("POST /vms/{vm}/snapshots", snaps_service.add,
                types.Snapshot(description="sdk-contract",
                               persist_memorystate=False))
    snap_service = snaps_service.snapshot_service(snap.id)
    snap = poll("GET /vms/{vm}/snapshots/{s}", snap_service.get,
                lambda s: s.snapshot_status == types.SnapshotStatus.OK)
    check_date(snap, "date")
    for s in call("GET /vms/{vm}/snapshots", snaps_service.list):
        assert s.snapshot_status is not None
    snap_disks = call("GET /vms/{vm}/snapshots/{s}/disks",
                      snap_service.disks_service().list)
    assert len(snap_disks) == len(disks)
    for d in snap_disks:
        a = call("POST /vms/{appliance}/diskattachments",
                 agent_attachments.add,
                 types.DiskAttachment(
                     disk=types.Disk(id=d.id,
                                     snapshot=types.Snapshot(id=snap.id)),
                     active=True, bootable=False,
                     interface=types.DiskInterface.VIRTIO))
        assert a.disk.id == d.id
    call("GET /vms/{appliance}/diskattachments", agent_attachments.list)
    for d in snap_disks:
        call("DELETE /vms/{appliance}/diskattachments/{disk}",
             agent_attachments.attachment_service(d.id).remove)
    call("DELETE /vms/{vm}/snapshots/{s}", snap_service.remove)

    # Incremental backup (4.4+): full, then incremental from its checkpoint.
    backups_service = vm_service.backups_service()
    transfers_service = system.image_transfers_service()
    full = {}
    dirty = {}
    checkpoint = None
    for round in ("full", "incremental"):
        backup = call("POST /vms/{vm}/backups", backups_service.add,
                      types.Backup(disks=[types.Disk(id=d.id) for d in disks],
                                   from_checkpoint_id=checkpoint,
                                   description="sdk-contract"))
        backup_service = backups_service.backup_service(backup.id)
        backup = poll("GET /vms/{vm}/backups/{b}", backup_service.get,
                      lambda b: b.phase == types.BackupPhase.READY)
        check_date(backup, "creation_date")
        call("GET /vms/{vm}/backups", backups_service.list)
        backup_disks = call("GET /vms/{vm}/backups/{b}/disks",
                            backup_service.disks_service().list)
        for d in backup_disks:
            transfer = call(
                "POST /imagetransfers", transfers_service.add,
                types.ImageTransfer(
                    disk=types.Disk(id=d.id),
                    backup=types.Backup(id=backup.id),
                    direction=types.ImageTransferDirection.DOWNLOAD,
                    format=types.DiskFormat.RAW))
            transfer_service = transfers_service.image_transfer_service(
                transfer.id)
            transfer = poll(
                "GET /imagetransfers/{t}", transfer_service.get,
                lambda t: t.phase == types.ImageTransferPhase.TRANSFERRING)
            assert transfer.host is not None and transfer.host.id
            call("GET /hosts/{host}",
                 system.hosts_service().host_service(transfer.host.id).get)
            call("GET /imagetransfers", transfers_service.list)
            if round == "full":
                assert d.backup_mode == types.DiskBackupMode.FULL, d.backup_mode
                full[d.id] = read_all(transfer.transfer_url, ca_file,
                                      d.provisioned_size)
                CALLS.append("imageio OPTIONS, extents?context=zero, GET ranges")
                call("POST /imagetransfers/{t}/finalize",
                     transfer_service.finalize)
                poll("GET /imagetransfers/{t} (finalizing)",
                     transfer_service.get,
                     lambda t: t.phase ==
                     types.ImageTransferPhase.FINISHED_SUCCESS)
            else:
                if d.backup_mode == types.DiskBackupMode.INCREMENTAL:
                    with imageio.ImageioClient(transfer.transfer_url,
                                               cafile=ca_file) as c:
                        dirty[d.id] = [[e.start, e.length]
                                       for e in c.extents("dirty")
                                       if e.dirty]
                    CALLS.append("imageio extents?context=dirty")
                call("POST /imagetransfers/{t}/cancel",
                     transfer_service.cancel)
        call("POST /vms/{vm}/backups/{b}/finalize", backup_service.finalize)
        poll("GET /vms/{vm}/backups/{b} (finalizing)", backup_service.get,
             lambda b: b.phase == types.BackupPhase.SUCCEEDED)
        checkpoints_service = vm_service.checkpoints_service()
        for c in call("GET /vms/{vm}/checkpoints", checkpoints_service.list):
            check_date(c, "creation_date")
        cp = call("GET /vms/{vm}/checkpoints/{c}",
                  checkpoints_service.checkpoint_service(
                      backup.to_checkpoint_id).get)
        assert cp.state == types.CheckpointState.CREATED
        checkpoint = cp.id
    assert dirty, "no disk was backed up incrementally"

    # Restore: a VM from the OVF, a new disk on the storage domain,
    # attached, extended, detached, removed.
    new_disk = call("POST /disks", disks_service.add,
                    types.Disk(name="sdk-restore", format=types.DiskFormat.COW,
                               provisioned_size=1 << 20, sparse=True,
                               storage_domains=[types.StorageDomain(id=sd.id)]))
    def from_ovf(data, name="sdk-restored"):
        return types.Vm(name=name, cluster=types.Cluster(name="Default"),
                        initialization=types.Initialization(
                            configuration=types.Configuration(
                                type=types.ConfigurationType.OVF,
                                data=data)))

    # The engine's rules (ImportVmFromConfigurationCommand): the VM gets
    # the OVF's VM id, so the unchanged OVF of an existing VM is a
    # conflict...
    e = expect_error("POST /vms (from OVF, id in use)", sdk.Error,
                     vms_service.add, from_ovf(ovf))
    assert e.code == 409 and "same identifier" in str(e), (e.code, str(e))
    # ... and the disks of its DiskSection are attached, not created: with
    # a new VM id and the first disk's id replaced by the new disk's, the
    # new disk is attached with the first disk's interface and boot flag;
    # the other disk, attached to the source VM, is left out and the audit
    # log says so.
    new_id = str(uuid.uuid4())
    data = ovf.replace(vm.id, new_id).replace(disks[0].id, new_disk.id)
    # Two NICs the way the engine's OVF writer writes them: one on the
    # management network (its profile of the same name), an e1000 on a
    # network this engine does not have.
    def nic_item(n, subtype, network):
        return ("<Item><rasd:Caption>Ethernet adapter on %s</rasd:Caption>"
                "<rasd:InstanceId>nic%d</rasd:InstanceId>"
                "<rasd:ResourceType>10</rasd:ResourceType>"
                "<rasd:OtherResourceType>%s</rasd:OtherResourceType>"
                "<rasd:ResourceSubType>%d</rasd:ResourceSubType>"
                "<rasd:Connection>%s</rasd:Connection>"
                "<rasd:Linked>true</rasd:Linked><rasd:Name>nic%d</rasd:Name>"
                "<rasd:ElementName>nic%d</rasd:ElementName>"
                "<rasd:MACAddress></rasd:MACAddress><Type>interface</Type>"
                "<Device>bridge</Device></Item>"
                % (network, n, network, subtype, network, n, n))
    hardware_end = data.rindex("</Section></Content>")
    data = (data[:hardware_end] + nic_item(1, 3, "ovirtmgmt")
            + nic_item(2, 2, "nowhere") + data[hardware_end:])
    new_vm = call("POST /vms (from OVF)", vms_service.add, from_ovf(data))
    assert new_vm.id == new_id, (new_vm.id, new_id)
    assert new_vm.name == "sdk-restored", new_vm.name
    new_vm_service = vms_service.vm_service(new_vm.id)
    new_attachments = new_vm_service.disk_attachments_service()
    got = call("GET /vms/{vm}/diskattachments (restored)",
               new_attachments.list)
    assert [a.disk.id for a in got] == [new_disk.id], [a.disk.id for a in got]
    assert got[0].interface == attachments[0].interface, got[0].interface
    assert got[0].bootable == attachments[0].bootable, got[0].bootable
    assert got[0].active, got[0].active
    profiles = call("GET /vnicprofiles",
                    system.vnic_profiles_service().list)
    mgmt = [p for p in profiles if p.name == "ovirtmgmt"]
    assert len(mgmt) == 1 and mgmt[0].network.id, [p.name for p in profiles]
    call("GET /vnicprofiles/{id}",
         system.vnic_profiles_service().profile_service(mgmt[0].id).get)
    nics = call("GET /vms/{vm}/nics", new_vm_service.nics_service().list)
    assert [(n.name, n.interface) for n in nics] == [
        ("nic1", types.NicInterface.VIRTIO),
        ("nic2", types.NicInterface.E1000)], \
        [(n.name, n.interface) for n in nics]
    assert all(n.mac and n.mac.address for n in nics), "MACs from the pool"
    assert nics[0].vnic_profile is not None \
        and nics[0].vnic_profile.id == mgmt[0].id, nics[0].vnic_profile
    assert nics[1].vnic_profile is None, "no profile on a missing network"
    invalid = system.events_service().list(search="nowhere")
    assert any("Network/s nowhere" in ev.description for ev in invalid), \
        [ev.description for ev in invalid]
    source = vm_service.disk_attachments_service().list()
    assert sorted(a.disk.id for a in source) == sorted(d.id for d in disks)
    failed = system.events_service().list(search="Failed to attach")
    assert any(ev.description == "Failed to attach Disk(s) %s to VM "
               "sdk-restored." % disks[1].alias for ev in failed), \
        [ev.description for ev in failed]
    call("DELETE /vms/{vm}/diskattachments/{disk} (restored)",
         new_attachments.attachment_service(new_disk.id).remove)
    call("POST /vms/{vm}/diskattachments", new_attachments.add,
         types.DiskAttachment(disk=types.Disk(id=new_disk.id), active=True,
                              bootable=True,
                              interface=types.DiskInterface.VIRTIO))
    a = call("PUT /vms/{vm}/diskattachments/{disk}",
             new_attachments.attachment_service(new_disk.id).update,
             types.DiskAttachment(disk=types.Disk(provisioned_size=2 << 20)))
    call("DELETE /vms/{vm}/diskattachments/{disk}",
         new_attachments.attachment_service(a.id).remove)
    call("DELETE /disks/{disk}", disks_service.disk_service(new_disk.id).remove)
    call("DELETE /vms/{vm}", new_vm_service.remove)

    events_service = system.events_service()
    call("POST /events", events_service.add,
         types.Event(vm=types.Vm(id=vm.id), origin="sdk-contract",
                     severity=types.LogSeverity.NORMAL, custom_id=1,
                     description="contract run done"))
    events = call("GET /events?search", events_service.list,
                  search="contract run")
    assert events and events[0].description == "contract run done"
    check_date(events[0], "time")

    connection.close()
    CALLS.append("POST /ovirt-engine/services/sso-logout")
    print(json.dumps({"calls": len(CALLS), "names": CALLS, "full": full,
                      "dirty": dirty}))


if __name__ == "__main__":
    main()
