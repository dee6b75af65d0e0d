//! Contract tests of the mock ZStack's message API (`POST /zstack/api`)
//! with a real client: `zstack_mcp.zstack_client` from ZStack's
//! `zstack-mcp-server` package (PyPI, pinned in
//! `tests/python/requirements-nodeps.txt`) runs
//! `tests/python/zstack/contract.py` against the mock started in this
//! process. Login (SHA-512 password, a wrong one refused), the queries a
//! backup product makes (conditions, paging, counts), an asynchronous
//! snapshot create + delete through result polling, and the client's own
//! re-login after its session is ended must work as the client expects.
//! Skipped without the Python environment unless `CI` is set (then it
//! fails).

use scenarios::python;
use scenarios::zstack::Zs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_client_works_against_the_mock() {
    if python::interpreter().is_none() {
        return;
    }
    let zs = Zs::start().await;
    zs.vm("contract-vm-1", 1, true).await;
    zs.vm("contract-vm-2", 2, false).await;
    zs.vm("contract-vm-3", 3, false).await;
    let ep = zs.env.mock.endpoints();
    let z = ep.platforms["zstack"].clone();
    let text = |k: &str| z[k].as_str().expect(k).to_owned();
    let backup_storages = mock_hypervisor::zstack::ZStackConfig::default()
        .backup_storages
        .len();
    let vars = vec![
        ("ZSTACK_URL", ep.http_url.clone()),
        ("ZSTACK_ADMIN", ep.admin_url.clone()),
        ("ZSTACK_ACCOUNT", text("account")),
        ("ZSTACK_PASSWORD", text("password")),
        ("ZSTACK_BACKUP_STORAGES", backup_storages.to_string()),
    ];
    let (out, calls) = python::run_contract("zstack/contract.py", vars).await;
    println!("zstack_mcp made {calls} calls against the mock\n{out}");
    assert!(calls >= 40, "{out}");
    // Nothing the script created is left behind.
    let objects = zs.objects().await;
    assert_eq!(objects["snapshots"], serde_json::json!([]), "{objects}");
    assert_eq!(objects["running_jobs"], serde_json::json!([]), "{objects}");
}
