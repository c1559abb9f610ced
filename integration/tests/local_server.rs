//! `LocalServer`, the in-process server of the measuring tools, serves while it lives and
//! stops listening when it is dropped (a tool that starts several in turn leaves none behind).

use crate::common;

use attncache_server::cli::ServeArgs;
use attncache_server::local_server::LocalServer;
use clap::Parser;
use common::TinyModel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_local_server_stops_listening() {
    let _guard = crate::env_lock().await;
    let model = TinyModel::new("local-server");
    let args = ServeArgs::parse_from([
        "attncache-server",
        "--model",
        model.path().to_str().unwrap(),
    ]);
    let server = LocalServer::start(&args).await.expect("start");
    let e = server.embed("the food was great").await.expect("embed");
    assert_eq!(
        e.embedding.len(),
        attncache_server::tiny_model::EMBEDDING_DIM
    );
    let url = server.url().to_string();
    drop(server);
    let client = reqwest::Client::new();
    let body = serde_json::json!({"model": "default", "input": ["hello"]});
    let mut refused = false;
    for _ in 0..50 {
        if client.post(&url).json(&body).send().await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        refused,
        "{url} still answers after the LocalServer was dropped"
    );
    attncache_plugin::uninstall();
}
