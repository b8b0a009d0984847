//! The kit's promises about process lifetimes: servers survive the test thread that started them,
//! `Drop` kills them, and nothing outlives the test process.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use statehouse_testkit::{Postgres, RedisServer};

use crate::{must, ping};

/// Set (to an output file path) only when `children_die_with_the_test_process` runs this test
/// binary as a child process.
const HELPER_ENV: &str = "STATEHOUSE_TESTKIT_EXIT_HELPER";

/// Alive in the sense that matters: running, not a zombie waiting to be reaped.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            !matches!(state, Some("Z" | "X"))
        }
        Err(_) => false,
    }
}

fn wait_dead(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn server_outlives_the_thread_that_started_it() {
    // PDEATHSIG fires when the *thread* that forked a child exits. Start from a thread that ends,
    // and wait until the kernel has fully torn that thread down, i.e. after any PDEATHSIG it
    // could trigger has been sent.
    let (server, tid) = std::thread::spawn(|| {
        let tid = std::fs::read_link("/proc/thread-self").expect("procfs");
        (must(RedisServer::start()), tid)
    })
    .join()
    .unwrap();
    let tid = tid.file_name().unwrap().to_string_lossy().into_owned();
    let task = format!("/proc/self/task/{tid}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&task).exists() {
        assert!(
            Instant::now() < deadline,
            "starter thread {tid} never went away"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    assert!(server.is_running());
    assert_eq!(ping(server.addr()).unwrap(), "+PONG");
}

#[test]
fn drop_kills_the_server_and_removes_its_directory() {
    let redis = must(RedisServer::start());
    let pg = must(Postgres::start());
    let pids = [redis.pid().unwrap(), pg.pid().unwrap()];
    let dirs = [redis.dir().to_path_buf(), pg.dir().to_path_buf()];
    assert!(pids.iter().all(|&pid| alive(pid)));

    drop(redis);
    drop(pg);
    for pid in pids {
        // Drop reaps its child, so the /proc entry is gone, not just a zombie.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} survived drop"
        );
    }
    for dir in dirs {
        assert!(!dir.exists(), "{} survived drop", dir.display());
    }
}

/// Not a test of its own: when run by `children_die_with_the_test_process` (with `HELPER_ENV`
/// set) it starts servers, records their pids, and exits the process without dropping anything.
/// In a normal run it does nothing.
#[test]
fn exit_without_cleanup_helper() {
    let Some(out) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let redis = must(RedisServer::start());
    let pg = must(Postgres::start());
    let pids = format!("{} {}", redis.pid().unwrap(), pg.pid().unwrap());
    std::fs::write(out, pids).unwrap();
    // No destructors run past this point: only PDEATHSIG can stop the servers.
    std::process::exit(0);
}

#[test]
fn children_die_with_the_test_process() {
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "lifecycle::exit_without_cleanup_helper",
            "--exact",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, out.path())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "helper failed: {}",
        String::from_utf8_lossy(&status.stdout)
    );
    let pids: Vec<u32> = std::fs::read_to_string(out.path())
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "redis and postgres pids");
    // Postgres runs as the `postgres` user when we are root, so this also shows PDEATHSIG
    // survives the credential change.
    for pid in pids {
        assert!(
            wait_dead(pid, Duration::from_secs(5)),
            "pid {pid} outlived its test process"
        );
    }
}
