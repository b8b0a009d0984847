use std::time::Duration;

use statehouse_testkit::RedisCluster;

use crate::{must, ping};

#[test]
fn six_nodes_three_masters_and_a_failover() {
    let mut cluster = must(RedisCluster::start());
    assert_eq!(cluster.node_count(), 6);
    assert_eq!(cluster.urls().len(), 6);
    for i in 0..cluster.node_count() {
        assert_eq!(ping(cluster.node(i).addr()).unwrap(), "+PONG");
    }
    let info = must(cluster.redis_cli(&["CLUSTER", "INFO"]));
    assert!(info.contains("cluster_state:ok"), "{info}");
    assert!(info.contains("cluster_known_nodes:6"), "{info}");
    assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
    let masters = cluster.master_indices();
    assert_eq!(masters.len(), 3, "masters: {masters:?}");

    // Kill a master: wait_healthy must wait for its replica to take the slots over.
    let victim = masters[0];
    cluster.kill_node(victim);
    must(cluster.wait_healthy(Duration::from_secs(30)));
    let after_failover = cluster.master_indices();
    assert_eq!(after_failover.len(), 3, "masters: {after_failover:?}");
    assert!(!after_failover.contains(&victim));

    // The old master comes back (with its nodes.conf) and rejoins as a replica.
    must(cluster.restart_node(victim));
    must(cluster.wait_healthy(Duration::from_secs(30)));
    let info = must(cluster.redis_cli(&["CLUSTER", "INFO"]));
    assert!(info.contains("cluster_state:ok"), "{info}");
}
