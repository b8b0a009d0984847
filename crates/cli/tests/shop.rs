//! The whole tier end to end: `statehouse up` with three real instance
//! processes and the worker, scripted users signing up, filling carts and
//! checking out through the balancer, while one instance is killed with -9
//! mid-run (and, separately, while every instance is restarted in turn).
//! Afterwards every user's session, cart and orders are compared with what
//! the client was told.
//!
//! Shared architectures: 0 lost sessions, 0 lost acknowledged writes, no
//! order twice. sticky-memory: the losses happen, are counted, and the test
//! asserts they do — it is the contrast.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use statehouse_app::Arch;
use statehouse_app::up::{UpAddrs, UpConfig};
use statehouse_testkit::{shared_cluster, shared_postgres, shared_redis, unique_db_name};

const USERS: usize = 12;
const ROUNDS: usize = 6;
const MAX_ROUNDS: usize = 500;
const ITEMS: [&str; 4] = ["tea", "mug", "beans", "kettle"];

/// A running `up` in a temp dir, stopped on drop.
struct Tier {
    addrs: UpAddrs,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Tier {
    async fn start(arch: Arch, session_store: Option<String>, database: Option<String>) -> Tier {
        Self::start_with(arch, |c| {
            c.session_store = session_store;
            c.database = database;
        })
        .await
    }

    async fn start_with(arch: Arch, adjust: impl FnOnce(&mut UpConfig)) -> Tier {
        let dir = tempfile::tempdir().unwrap();
        let mut config = UpConfig {
            dir: dir.path().to_owned(),
            instances: 3,
            arch,
            port: 0,
            dashboard_port: 0,
            session_store: None,
            database: None,
            objects: None,
            broker: None,
            exe: Some(env!("CARGO_BIN_EXE_statehouse").into()),
        };
        adjust(&mut config);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            if let Err(e) = statehouse_app::up::run(config, Some(ready_tx), shutdown).await {
                panic!("statehouse up failed: {e}");
            }
        });
        let addrs = tokio::time::timeout(Duration::from_secs(120), ready_rx)
            .await
            .expect("up is ready within 120 s")
            .expect("up reports its addresses");
        let tier = Tier {
            addrs,
            stop: Some(stop_tx),
            task: Some(task),
            _dir: dir,
        };
        // Every instance in rotation before the users come, so each gets its
        // share (and, under sticky-memory, its pinned users).
        for _ in 0..600 {
            let instances = tier.instances().await;
            if instances.len() == 3 && instances.iter().all(|i| i["lb"]["healthy"] == true) {
                return tier;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the balancer did not see three healthy instances within 30 s");
    }

    /// The dashboard's `/api/state`.
    async fn state(&self) -> serde_json::Value {
        let text = reqwest::get(format!("http://{}/api/state", self.addrs.dashboard))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// The dashboard's view of the instances (not the worker).
    async fn instances(&self) -> Vec<serde_json::Value> {
        self.state().await["children"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c["role"] == "instance")
            .collect()
    }

    async fn dashboard(&self, path: &str) -> serde_json::Value {
        let origin = format!("http://{}", self.addrs.dashboard);
        let r = reqwest::Client::new()
            .post(format!("{origin}{path}"))
            .header("origin", &origin)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Stops `up` and checks that it stopped every child process.
    async fn stop(mut self) {
        let pids: Vec<u64> = self.state().await["children"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["pid"].as_u64())
            .collect();
        assert!(!pids.is_empty());
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
        for pid in pids {
            assert!(
                !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "child {pid} outlived up"
            );
        }
    }
}

/// What went wrong, counted over all users.
#[derive(Debug, Default)]
struct Tally {
    /// Requests answered with an error or no answer (each then retried).
    failed_requests: AtomicU64,
    /// A request that needed the login found none.
    lost_sessions: AtomicU64,
    /// An acknowledged cart line or order missing (or wrong) at the end.
    lost_writes: AtomicU64,
    /// The same idempotency key placed twice.
    duplicate_orders: AtomicU64,
    /// Checkouts acknowledged so far: the fault waits for a share of them,
    /// so it lands mid-run however fast the machine is.
    checkouts: AtomicU64,
    /// Set when the fault is over: users go on until then (and for at least
    /// `ROUNDS`), so the fault always meets load.
    fault_over: AtomicBool,
}

impl Tally {
    async fn wait_for_checkouts(&self, n: u64) {
        while self.checkouts.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One scripted user with a cookie jar (session and sticky cookies).
struct User {
    http: reqwest::Client,
    base: String,
    cookies: BTreeMap<String, String>,
    email: String,
}

struct Answer {
    status: u16,
    body: serde_json::Value,
}

impl User {
    fn new(base: &str, email: String) -> User {
        User {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            base: base.to_owned(),
            cookies: BTreeMap::new(),
            email,
        }
    }

    /// The jar as a `Cookie` header value.
    fn cookie_header(&self) -> String {
        let jar: Vec<String> = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        jar.join("; ")
    }

    /// One request; `None` when no answer came (connection cut).
    async fn once(
        &mut self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        key: Option<&str>,
    ) -> Option<Answer> {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .header("origin", &self.base);
        if !self.cookies.is_empty() {
            req = req.header("cookie", self.cookie_header());
        }
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = req.send().await.ok()?;
        for set in response.headers().get_all("set-cookie") {
            let set = set.to_str().unwrap();
            let pair = set.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            if value.is_empty() || set.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
        let status = response.status().as_u16();
        let text = response.text().await.ok()?;
        Some(Answer {
            status,
            body: serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        })
    }

    /// Retries while there is no answer or a 5xx (the instance died under
    /// the request), counting each failure. Retrying is safe for every call
    /// the script makes: PUTs set values, checkout carries its key.
    async fn call(
        &mut self,
        tally: &Tally,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        key: Option<&str>,
    ) -> Answer {
        for _ in 0..50 {
            match self.once(method, path, body.clone(), key).await {
                Some(a) if a.status < 500 => return a,
                answer => {
                    match answer {
                        Some(a) => eprintln!("{method} {path}: {} {} (retrying)", a.status, a.body),
                        None => eprintln!("{method} {path}: no answer (retrying)"),
                    }
                    tally.failed_requests.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        panic!("{method} {path}: no success after 50 tries");
    }

    async fn log_in(&mut self, tally: &Tally, signup: bool) {
        let creds = serde_json::json!({ "email": self.email, "password": "correct horse" });
        if signup {
            let a = self
                .call(tally, "POST", "/api/signup", Some(creds.clone()), None)
                .await;
            // 409: an earlier attempt whose answer was lost did sign us up.
            if a.status == 201 {
                return;
            }
            assert_eq!(a.status, 409, "signup: {}", a.body);
        }
        let a = self
            .call(tally, "POST", "/api/login", Some(creds), None)
            .await;
        assert_eq!(a.status, 200, "login: {}", a.body);
    }
}

/// One user's run: sign up, then rounds of two cart lines and a checkout,
/// then two final cart lines left in the cart. Returns what the client was
/// told (orders by key, the final cart), and checks it against the tier.
async fn user_script(base: String, n: usize, tally: Arc<Tally>, may_lose: bool) {
    let t = &*tally;
    let mut user = User::new(&base, format!("user{n}@shop.example"));
    user.log_in(t, true).await;
    let mut acked_orders: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    let mut cart: BTreeMap<String, u32> = BTreeMap::new();
    let mut last = usize::MAX;
    for round in 0..MAX_ROUNDS {
        for line in 0..2 {
            let item = ITEMS[(n + round + line) % ITEMS.len()];
            let qty = (round + line + 1) as u32;
            let a = user
                .call(
                    t,
                    "PUT",
                    &format!("/api/cart/{item}"),
                    Some(serde_json::json!({ "qty": qty })),
                    None,
                )
                .await;
            assert_eq!(a.status, 200, "cart: {}", a.body);
            cart.insert(item.to_owned(), qty);
        }
        if round == last {
            break;
        }
        if last == usize::MAX && round + 1 >= ROUNDS && t.fault_over.load(Ordering::SeqCst) {
            // One more round of cart lines, left in the cart, and stop.
            last = round + 1;
        }
        let key = format!("u{n}-r{round}");
        // `call` retries (same key) until an answer that is not a 5xx.
        let a = user
            .call(t, "POST", "/api/checkout", None, Some(&key))
            .await;
        match a.status {
            200 | 201 => {
                let items: BTreeMap<String, u32> =
                    serde_json::from_value(a.body["order"]["items"].clone()).unwrap();
                if items != cart {
                    t.lost_writes.fetch_add(1, Ordering::Relaxed);
                }
                acked_orders.insert(key.clone(), cart.clone());
                t.checkouts.fetch_add(1, Ordering::SeqCst);
                cart.clear();
            }
            401 | 422 if may_lose => {
                // The session (and the cart with it) died with its instance.
                t.lost_sessions.fetch_add(1, Ordering::Relaxed);
                t.lost_writes
                    .fetch_add(cart.len() as u64, Ordering::Relaxed);
                cart.clear();
                user.cookies.clear();
                user.log_in(t, false).await;
            }
            s => panic!("checkout {key}: {s} {}", a.body),
        }
    }
    // What the tier says now.
    let me = user.call(t, "GET", "/api/me", None, None).await;
    if me.body["user"].is_null() {
        t.lost_sessions.fetch_add(1, Ordering::Relaxed);
    }
    let seen: BTreeMap<String, u32> = serde_json::from_value(me.body["cart"].clone()).unwrap();
    if seen != cart {
        t.lost_writes.fetch_add(1, Ordering::Relaxed);
        assert!(may_lose, "user {n}: cart {seen:?}, told {cart:?}");
    }
    if me.body["user"].is_null() {
        user.log_in(t, false).await;
    }
    let orders = user.call(t, "GET", "/api/orders", None, None).await;
    let orders = orders.body["orders"].as_array().unwrap().clone();
    let mut by_key: HashMap<String, u32> = HashMap::new();
    for o in &orders {
        *by_key
            .entry(o["idempotency_key"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for (key, items) in &acked_orders {
        let found = orders.iter().find(|o| o["idempotency_key"] == key.as_str());
        let ok = found.is_some_and(|o| {
            serde_json::from_value::<BTreeMap<String, u32>>(o["items"].clone()).unwrap() == *items
        });
        if !ok {
            t.lost_writes.fetch_add(1, Ordering::Relaxed);
            panic!("user {n}: acknowledged order {key} missing or wrong: {found:?}");
        }
    }
    let duplicates = by_key.values().filter(|c| **c > 1).count();
    t.duplicate_orders
        .fetch_add(duplicates as u64, Ordering::Relaxed);
}

/// Runs every user at once; `fault` runs beside them once they are going.
async fn run_users<F, Fut>(tier: &Tier, may_lose: bool, fault: F) -> Arc<Tally>
where
    F: FnOnce(Arc<Tally>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let tally = Arc::new(Tally::default());
    let base = format!("http://{}", tier.addrs.shop);
    let users: Vec<_> = (0..USERS)
        .map(|n| tokio::spawn(user_script(base.clone(), n, tally.clone(), may_lose)))
        .collect();
    fault(tally.clone()).await;
    tally.fault_over.store(true, Ordering::SeqCst);
    for u in users {
        u.await.unwrap();
    }
    tally
}

fn report(arch: Arch, what: &str, t: &Tally) -> (u64, u64, u64, u64) {
    let r = (
        t.failed_requests.load(Ordering::Relaxed),
        t.lost_sessions.load(Ordering::Relaxed),
        t.lost_writes.load(Ordering::Relaxed),
        t.duplicate_orders.load(Ordering::Relaxed),
    );
    println!(
        "{arch} {what}: {USERS} users; failed requests (retried) {}, lost sessions {}, lost acknowledged writes {}, duplicate orders {}",
        r.0, r.1, r.2, r.3
    );
    r
}

/// kill -9 of app-2 once the users are under way.
async fn kill_one_mid_run(
    arch: Arch,
    session_store: Option<String>,
    database: Option<String>,
) -> (u64, u64, u64, u64) {
    let tier = Tier::start(arch, session_store, database).await;
    let at_kill = AtomicU64::new(0);
    let (tier_ref, at_kill_ref) = (&tier, &at_kill);
    let tally = run_users(&tier, arch == Arch::StickyMemory, |tally| async move {
        let third = (USERS * ROUNDS / 3) as u64;
        tally.wait_for_checkouts(third).await;
        // The kill must bite: app-2 is in rotation and has served users.
        let app2 = tier_ref
            .instances()
            .await
            .into_iter()
            .find(|i| i["name"] == "app-2")
            .unwrap();
        assert!(
            app2["lb"]["healthy"] == true && app2["lb"]["requests"].as_u64() > Some(0),
            "app-2 is not serving before the kill: {app2}"
        );
        tier_ref.dashboard("/api/instances/app-2/kill").await;
        at_kill_ref.store(tally.checkouts.load(Ordering::SeqCst), Ordering::SeqCst);
    })
    .await;
    let total = tally.checkouts.load(Ordering::SeqCst);
    let before = at_kill.load(Ordering::SeqCst);
    println!("{arch}: killed app-2 after {before} of {total} checkouts");
    assert!(before < total, "the kill came after the run");
    tier.stop().await;
    report(arch, "kill -9 of one of three instances", &tally)
}

fn assert_nothing_lost((_, lost_sessions, lost_writes, duplicates): (u64, u64, u64, u64)) {
    assert_eq!(lost_sessions, 0, "lost sessions");
    assert_eq!(lost_writes, 0, "lost acknowledged writes");
    assert_eq!(duplicates, 0, "orders placed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_sqlite_loses_nothing_when_an_instance_is_killed() {
    assert_nothing_lost(kill_one_mid_run(Arch::SharedSqlite, None, None).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_redis_loses_nothing_when_an_instance_is_killed() {
    let url = shared_redis().url();
    assert_nothing_lost(kill_one_mid_run(Arch::SharedRedis, Some(url), None).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_redis_cluster_loses_nothing_when_an_instance_is_killed() {
    let hosts: Vec<String> = shared_cluster()
        .urls()
        .iter()
        .map(|u| u.trim_start_matches("redis://").to_owned())
        .collect();
    let url = format!("redis+cluster://{}", hosts.join(","));
    assert_nothing_lost(kill_one_mid_run(Arch::SharedRedisCluster, Some(url), None).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_postgres_loses_nothing_when_an_instance_is_killed() {
    let url = shared_postgres()
        .create_database(&unique_db_name("shop"))
        .unwrap();
    assert_nothing_lost(kill_one_mid_run(Arch::SharedPostgres, Some(url), None).await);
}

/// No session at all: identity in tokens, the cart in a sealed cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mode_loses_nothing_when_an_instance_is_killed() {
    assert_nothing_lost(kill_one_mid_run(Arch::Token, None, None).await);
}

/// The contrast: sessions in instance memory die with the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_memory_loses_the_killed_instances_sessions() {
    let (_, lost_sessions, lost_writes, duplicates) =
        kill_one_mid_run(Arch::StickyMemory, None, None).await;
    assert!(
        lost_sessions > 0,
        "sticky-memory lost no session: the kill did not bite"
    );
    assert!(lost_writes > 0);
    assert_eq!(duplicates, 0, "orders are durable in every architecture");
}

/// Drain, stop, start each instance in turn under load: nobody sees a
/// failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_fails_no_request() {
    let arch = Arch::SharedSqlite;
    let tier = Tier::start(arch, None, None).await;
    let tier_ref = &tier;
    let tally = run_users(&tier, false, |tally| async move {
        tally.wait_for_checkouts(USERS as u64).await;
        for name in ["app-1", "app-2", "app-3"] {
            tier_ref
                .dashboard(&format!("/api/instances/{name}/restart"))
                .await;
        }
    })
    .await;
    tier.stop().await;
    println!(
        "{arch}: {} checkouts across the rolling restart",
        tally.checkouts.load(Ordering::SeqCst)
    );
    let r = report(arch, "rolling restart", &tally);
    assert_eq!(r.0, 0, "failed requests during the rolling restart");
    assert_nothing_lost(r);
}

/// A person's view, in headless Chromium (the distribution's package,
/// driven by playwright-core from npm; `scripts/test.sh` installs both): log
/// in, fill the cart, kill -9 the serving instance from the dashboard,
/// reload, find the cart intact. Screenshots go to
/// `target/tmp/browser-shop/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_cart_survives_killing_the_serving_instance() {
    let script_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists()
            && script_dir.join("node_modules/playwright-core").exists(),
        "the browser test needs {chromium} (apt-get install chromium) and playwright-core \
         (npm ci in {}); ./scripts/test.sh installs both",
        script_dir.display()
    );
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-shop");
    std::fs::create_dir_all(&out).unwrap();
    let tier = Tier::start(Arch::SharedSqlite, None, None).await;
    let result = tokio::process::Command::new("node")
        .arg(script_dir.join("shop.mjs"))
        .arg(format!("http://{}/", tier.addrs.shop))
        .arg(format!("http://{}/", tier.addrs.dashboard))
        .arg(&out)
        .env("CHROMIUM", &chromium)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), result)
        .await
        .expect("the browser run ends within 120 s")
        .expect("node runs (apt-get install nodejs)");
    tier.stop().await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "browser test failed (screenshots in {}):\n{stdout}\n{stderr}",
        out.display()
    );
    for shot in [
        "1-cart-before.png",
        "2-dashboard-after-kill.png",
        "3-cart-after-kill.png",
    ] {
        assert!(out.join(shot).exists(), "{shot} was not written");
    }
}

/// A private S3-compatible server: moto's (PyPI `moto[server]`, installed by
/// `scripts/test.sh`), on a free loopback port, killed on drop.
struct S3Server {
    child: std::process::Child,
    port: u16,
}

impl S3Server {
    async fn start() -> S3Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server runs (pip install 'moto[server]'; ./scripts/test.sh installs it)");
        let mut server = S3Server { child, port };
        let http = reqwest::Client::new();
        // moto is Python (behind a pyenv shim here): a few seconds to start
        // when idle, many more while the other end-to-end tests load the
        // machine's two cores.
        for _ in 0..1200 {
            if http.get(server.url("/")).send().await.is_ok() {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("moto_server exited at startup: {status}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("moto_server did not answer on port {port} within 60 s");
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Avatars in an S3-compatible store: uploaded through one instance, served
/// by every instance, still there after the uploading instance is killed,
/// and in the bucket — not on any instance's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avatars_in_s3_are_served_by_every_instance() {
    let s3 = S3Server::start().await;
    let http = reqwest::Client::new();
    let made = http.put(s3.url("/shop-avatars")).send().await.unwrap();
    assert!(
        made.status().is_success(),
        "create bucket: {}",
        made.status()
    );
    let objects = format!(
        "s3://shop-avatars/shop?aws_endpoint={}&aws_allow_http=true&aws_region=us-east-1\
         &aws_access_key_id=test&aws_secret_access_key=test",
        s3.url("")
    );
    let tier = Tier::start_with(Arch::SharedSqlite, |c| c.objects = Some(objects.clone())).await;
    let tally = Tally::default();
    let base = format!("http://{}", tier.addrs.shop);
    let mut user = User::new(&base, "avatar@shop.example".into());
    user.log_in(&tally, true).await;

    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend((0..4096u32).map(|i| (i % 251) as u8));
    let put = user
        .http
        .put(format!("{base}/api/avatar"))
        .header("origin", &base)
        .header("cookie", user.cookie_header())
        .body(png.clone())
        .send()
        .await
        .unwrap();
    let status = put.status();
    let uploader_header = put.headers().get("x-served-by").cloned();
    assert_eq!(
        status,
        200,
        "{:?}: {}",
        uploader_header,
        put.text().await.unwrap()
    );
    let put_by = uploader_header.unwrap();
    let uploader = put_by.to_str().unwrap().to_owned();

    let fetch = |user: &User| {
        let req = user
            .http
            .get(format!("{base}/api/avatar"))
            .header("cookie", user.cookie_header());
        async move {
            let r = req.send().await.unwrap();
            let by = r.headers()["x-served-by"].to_str().unwrap().to_owned();
            (r.status(), by, r.bytes().await.unwrap())
        }
    };
    let mut served_by = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (status, by, body) = fetch(&user).await;
        assert_eq!(status, 200, "{by}: {}", String::from_utf8_lossy(&body));
        assert_eq!(&body[..], &png[..], "the same bytes from {by}");
        served_by.insert(by);
    }
    assert_eq!(
        served_by.len(),
        3,
        "every instance serves it: {served_by:?}"
    );

    tier.dashboard(&format!("/api/instances/{uploader}/kill"))
        .await;
    for _ in 0..3 {
        let (status, by, body) = fetch(&user).await;
        assert_eq!(status, 200);
        assert_ne!(by, uploader);
        assert_eq!(&body[..], &png[..]);
    }
    // In the bucket, read with no instance involved.
    let bucket = statehouse_app::objects::Objects::open(&objects).unwrap();
    let stored = bucket
        .avatar(1)
        .await
        .unwrap()
        .expect("the avatar is in the bucket");
    assert_eq!(&stored[..], &png[..]);
    tier.stop().await;
}
