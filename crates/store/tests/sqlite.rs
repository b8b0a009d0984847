//! The conformance suite on SQLite files, and two processes sharing one file.

use std::path::PathBuf;
use std::sync::OnceLock;

use statehouse_store::{MapPatch, Store, StoreConfig, open};

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
}

fn db_path(name: &str) -> PathBuf {
    dir().path().join(format!("{name}.db"))
}

async fn open_store(test: &str) -> Store {
    let url = format!("sqlite://{}", db_path(test).display());
    open(StoreConfig::new(url)).await.expect("open SQLite file")
}

statehouse_store::conformance_suite!(open_store);

const ROLE: &str = "STATEHOUSE_SQLITE_ROLE";
const FILE: &str = "STATEHOUSE_SQLITE_FILE";
const WRITES: usize = 300;

/// Two OS processes write different fields of one map and increment one
/// counter field in one SQLite file at the same time; nothing may be lost.
/// The test binary re-runs itself (this same test) as the two writers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_file_without_losing_writes() {
    if let Ok(role) = std::env::var(ROLE) {
        let url = format!("sqlite://{}", std::env::var(FILE).unwrap());
        let store = open(StoreConfig::new(url)).await.unwrap();
        for i in 0..WRITES {
            store
                .map_patch(
                    "shared",
                    &MapPatch::new()
                        .set(format!("{role}-{i}"), "x")
                        .incr("total", 1),
                )
                .await
                .unwrap_or_else(|e| panic!("writer {role} write {i}: {e}"));
        }
        return;
    }

    let path = db_path("two_processes");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|role| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "two_processes_share_one_file_without_losing_writes",
                    "--nocapture",
                ])
                .env(ROLE, role)
                .env(FILE, &path)
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        assert!(status.success(), "a writer process failed: {status}");
    }
    let store = open(StoreConfig::new(format!("sqlite://{}", path.display())))
        .await
        .unwrap();
    let map = store
        .map_read("shared")
        .await
        .unwrap()
        .into_inner()
        .unwrap();
    assert_eq!(map.counter("total"), Some(2 * WRITES as i64));
    assert_eq!(
        map.fields.len(),
        2 * WRITES + 1,
        "every field write is there"
    );
}

#[tokio::test]
async fn corrupt_rows_and_bad_paths_are_reported() {
    use statehouse_store::StoreError;
    let path = db_path("corrupt");
    let store = open(StoreConfig::new(format!("sqlite://{}", path.display())).prefix(""))
        .await
        .unwrap();
    // Write rows behind the store's back, through a second connection.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("INSERT INTO sh_kv (key, value, version) VALUES ('text', 'x', 'not a number')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO sh_kv (key, value, version) VALUES ('neg', x'00', -1)")
        .execute(&pool)
        .await
        .unwrap();
    for key in ["text", "neg"] {
        let err = store.get(key).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{key}: {err:?}");
    }

    let err = open(StoreConfig::new("sqlite:///proc/no/such/dir/x.db"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
    assert!(err.to_string().contains("/proc/no/such/dir/x.db"), "{err}");
}
