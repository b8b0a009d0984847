use std::io::ErrorKind;
use std::net::TcpStream;
use std::process::Command;

use statehouse_testkit::{Postgres, unique_db_name};

use crate::must;

#[test]
fn database_and_committed_rows_survive_kill_and_restart() {
    let mut pg = must(Postgres::start());
    let db = unique_db_name("kit");
    let url = must(pg.create_database(&db));
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{}/{db}", pg.addr().port())
    );

    // The URL works for the psql binary as given.
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", &url, "-c", "SELECT 1"])
        .output()
        .expect("psql is installed with postgresql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");

    // Kill right after a commit: an acknowledged commit must survive a kill -9.
    must(pg.psql(
        &db,
        "CREATE TABLE t (n int); INSERT INTO t SELECT generate_series(1, 1000)",
    ));
    pg.kill();
    assert!(!pg.is_running());
    let refused = TcpStream::connect(pg.addr()).expect_err("nothing listens after a kill");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);

    must(pg.restart());
    assert_eq!(must(pg.psql(&db, "SELECT 1")), "1");
    assert_eq!(must(pg.psql(&db, "SELECT count(*) FROM t")), "1000");
    assert_eq!(
        pg.url(),
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            pg.addr().port()
        )
    );
}

#[test]
fn unsafe_database_names_are_refused() {
    let pg = statehouse_testkit::shared_postgres();
    for name in ["", "Upper", "1st", "a;drop", "a-b"] {
        assert!(pg.create_database(name).is_err(), "{name:?} accepted");
    }
}
