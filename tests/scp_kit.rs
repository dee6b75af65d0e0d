//! The conformance kit (every check, bytes compared) against provider-scp
//! on the mock's SCP, over NBD and over HotAdd, with linked VMs of three
//! disks of different sizes (`scenarios::scp::ScpDriver`).

use std::sync::Arc;

use provider_api::BackupProvider;
use provider_scp::AccessMode;
use scenarios::scp::{Env, ScpDriver};
use serde_json::json;

async fn run_kit(env: &Env, provider: Arc<provider_scp::ScpProvider>) {
    let driver = ScpDriver::new(env, vec![provider.clone()]).await;
    let kit = conformance::Kit::new(provider as Arc<dyn BackupProvider>, Arc::new(driver));
    match kit.run_all().await {
        Ok(report) => eprintln!("{report}"),
        Err(failure) => panic!("{failure}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kit_over_nbd() {
    let env = Env::start(|_, _| {}).await;
    let provider = env.provider();
    run_kit(&env, provider).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kit_over_hot_add() {
    let env = Env::start(|_, _| {}).await;
    let proxy = env
        .admin
        .server(json!({"name": "backup-proxy", "disks": [{"size": 1 << 20}]}))
        .await;
    let provider = env.provider_with(env.options(AccessMode::HotAdd {
        proxy_server_id: proxy["id"].as_str().expect("proxy id").to_owned(),
    }));
    run_kit(&env, provider).await;
}
