//! Contract tests of the mock SCP with a real Open API client: the
//! `sangfor-scp` package (PyPI, pinned in `tests/python/requirements.txt`)
//! runs `tests/python/scp/contract.py` against the mock started in this
//! process. Login (RSA-encrypted password, a wrong one refused),
//! access-key signing, version, paged servers, volumes, images, resource
//! pools and tasks (through their states, and one failing with the
//! platform's error) must work as the client expects. Skipped without the
//! Python environment unless `CI` is set (then it fails).

use scenarios::python;
use scenarios::scp::Env;
use serde_json::json;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_client_works_against_the_mock() {
    if python::interpreter().is_none() {
        return;
    }
    let env = Env::start(|_, _| {}).await;
    let base = env
        .admin
        .base_image(
            "base-contract",
            8 * MIB,
            json!([{"offset": 0, "length": MIB, "pattern": "random", "seed": 1}]),
        )
        .await;
    env.admin
        .server(json!({"name": "linked-1", "storage_id": "storage-local",
            "disks": [{"size": 16 * MIB, "base_image_id": base}, {"size": 4 * MIB}]}))
        .await;
    env.admin
        .server(json!({"name": "plain-1", "disks": [{"size": 4 * MIB}]}))
        .await;
    env.admin
        .server(json!({"name": "plain-2", "disks": [{"size": 6 * MIB}]}))
        .await;
    let ep = env.mock.endpoints();
    let scp = ep.platforms["scp"].clone();
    let text = |k: &str| scp[k].as_str().expect(k).to_owned();
    let vars = vec![
        ("SCP_URL", ep.scp_url().to_owned()),
        ("SCP_ADMIN", ep.admin_url.clone()),
        ("SCP_USER", text("username")),
        ("SCP_PASSWORD", text("password")),
        ("SCP_ACCESS_KEY", text("access_key")),
        ("SCP_SECRET_KEY", text("secret_key")),
        ("SCP_SERVERS", "3".to_owned()),
        ("SCP_DISKS", "4".to_owned()),
        ("SCP_IMAGES", "1".to_owned()),
    ];
    let logins_before = env.mock.scp().logins();
    let (out, calls) = python::run_contract("scp/contract.py", vars).await;
    println!("sangfor-scp made {calls} calls against the mock");
    assert!(calls >= 40, "{out}");
    // The right password logged in (the wrong one did not).
    assert_eq!(env.mock.scp().logins(), logins_before + 1);
}
