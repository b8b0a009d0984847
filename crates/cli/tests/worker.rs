//! The order queue is at-least-once across a worker's death: a worker
//! process killed with -9 while it holds an order leaves a lease that
//! expires, another worker process takes the order, and every order ends
//! fulfilled exactly once — on SQLite and on Postgres. And every order's
//! status changes reach its live channel, ending with `fulfilled`, the
//! killed worker notwithstanding (the orders table is the outbox).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use statehouse_app::db::Db;
use statehouse_testkit::{shared_postgres, unique_db_name};

const ORDERS: usize = 8;

struct Worker(Child);

impl Worker {
    fn start(name: &str, database: &str, broker: &str) -> Worker {
        Worker(
            Command::new(env!("CARGO_BIN_EXE_statehouse"))
                .args(["worker", "--name", name, "--database", database])
                .args(["--broker", broker])
                .args(["--lease", "2s", "--work", "400ms"])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn killed_worker_loses_no_order(database: String) {
    let dir = tempfile::tempdir().unwrap();
    let broker_url = format!("sqlite://{}", dir.path().join("fanout.db").display());
    let db = Db::open(&database).await.unwrap();
    let user = db
        .create_user("buyer@shop.example", "not-a-real-hash")
        .await
        .unwrap();
    let items: BTreeMap<String, u32> = [("tea".to_owned(), 1)].into();
    for i in 0..ORDERS {
        db.place_order(user.id, &format!("k{i}"), &items, 450, "test")
            .await
            .unwrap();
    }
    let mut a = Worker::start("worker-a", &database, &broker_url);
    // worker-a holds an order: kill it there.
    wait_until(
        "worker-a takes an order",
        Duration::from_secs(30),
        || async {
            db.orders(user.id)
                .await
                .unwrap()
                .iter()
                .any(|o| o.status == "processing")
        },
    )
    .await;
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let orphan = db
        .orders(user.id)
        .await
        .unwrap()
        .into_iter()
        .find(|o| o.status == "processing")
        .expect("the killed worker's order is still leased to it");
    assert_eq!(orphan.processed_by, "worker-a");

    let _b = Worker::start("worker-b", &database, &broker_url);
    wait_until("every order fulfilled", Duration::from_secs(60), || async {
        db.orders(user.id)
            .await
            .unwrap()
            .iter()
            .all(|o| o.status == "fulfilled")
    })
    .await;
    let orders = db.orders(user.id).await.unwrap();
    assert_eq!(orders.len(), ORDERS, "one order per key");
    let retaken = orders.iter().find(|o| o.id == orphan.id).unwrap();
    assert_eq!(
        retaken.processed_by, "worker-b",
        "taken again after the lease ran out"
    );
    assert!(retaken.attempts >= 2, "{retaken:?}");

    // Live status: each order's messages run placed → processing… →
    // fulfilled, and none is missing its last.
    let broker = statehouse_fanout::open(statehouse_fanout::BrokerConfig::new(&broker_url))
        .await
        .unwrap();
    let channel = statehouse_app::live::channel(user.id);
    let deadline = Instant::now() + Duration::from_secs(30);
    let statuses = loop {
        let mut statuses: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        let log = broker.read(&channel, 0, None, 1000).await.unwrap();
        for m in &log.messages {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            statuses
                .entry(v["order"].as_i64().unwrap())
                .or_default()
                .push(v["status"].as_str().unwrap().to_owned());
        }
        let done = statuses.len() == ORDERS
            && statuses
                .values()
                .all(|s| s.last().map(String::as_str) == Some("fulfilled"));
        if done {
            break statuses;
        }
        assert!(
            Instant::now() < deadline,
            "not every fulfilment was published: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (order, seen) in &statuses {
        let rank = |s: &str| {
            ["placed", "processing", "fulfilled"]
                .iter()
                .position(|x| *x == s)
        };
        assert!(
            seen.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])),
            "order {order}: statuses out of order: {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_queue_survives_a_killed_worker() {
    let dir = tempfile::tempdir().unwrap();
    killed_worker_loses_no_order(format!("sqlite://{}", dir.path().join("shop.db").display()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_queue_survives_a_killed_worker() {
    let url = shared_postgres()
        .create_database(&unique_db_name("queue"))
        .unwrap();
    killed_worker_loses_no_order(url).await;
}
