//! The conformance suite on a real six-node Redis Cluster (three masters,
//! three replicas), and a live resharding under load.

use std::collections::BTreeSet;
use std::time::Duration;

use statehouse_store::{MapPatch, Store, StoreConfig, open};
use statehouse_testkit::{RedisCluster, shared_cluster, unique_prefix};

fn cluster_url(cluster: &RedisCluster) -> String {
    let hosts: Vec<String> = cluster
        .urls()
        .iter()
        .map(|u| u.trim_start_matches("redis://").to_owned())
        .collect();
    format!("redis+cluster://{}", hosts.join(","))
}

async fn open_store(test: &str) -> Store {
    open(StoreConfig::new(cluster_url(shared_cluster())).prefix(unique_prefix(test)))
        .await
        .expect("open the private Redis Cluster")
}

statehouse_store::conformance_suite!(open_store);

/// Moves slots between masters while writers patch maps spread over every
/// slot: the client follows MOVED/ASK and no write is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_under_load_loses_nothing() {
    let cluster = RedisCluster::start().expect("start a private cluster");
    let store = open(StoreConfig::new(cluster_url(&cluster)).prefix("reshard:"))
        .await
        .unwrap();
    let keys = 64;
    let rounds = 60;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for round in 0..rounds {
                for k in 0..keys {
                    store
                        .map_patch(
                            &format!("map{k}"),
                            &MapPatch::new().set(format!("r{round}"), "x").incr("n", 1),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("round {round} key {k}: {e}"));
                }
            }
        })
    };
    // Move a third of the slots from one master to another, in the middle
    // of the writes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let masters = cluster.master_indices();
    let node_id = |i: usize| {
        let port = cluster.node(i).addr().port().to_string();
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port, "cluster", "myid"])
            .output()
            .expect("redis-cli cluster myid");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let from = node_id(masters[0]);
    let to = node_id(masters[1]);
    let target = cluster.urls()[masters[0]]
        .trim_start_matches("redis://")
        .to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args([
                "--cluster",
                "reshard",
                &target,
                "--cluster-from",
                &from,
                "--cluster-to",
                &to,
                "--cluster-slots",
                "2000",
                "--cluster-yes",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "reshard failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    writer.await.unwrap();
    for k in 0..keys {
        let map = store
            .map_read(&format!("map{k}"))
            .await
            .unwrap()
            .into_inner()
            .unwrap();
        assert_eq!(map.counter("n"), Some(rounds as i64), "key {k}");
        let rounds_seen: BTreeSet<_> = map.fields.keys().filter(|f| f.starts_with('r')).collect();
        assert_eq!(rounds_seen.len(), rounds, "key {k}");
    }
}
