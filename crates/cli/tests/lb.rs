//! `statehouse lb` as a process: a bad configuration is refused with the key
//! and the reason; SIGTERM shuts it down cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn statehouse() -> Command {
    Command::new(env!("CARGO_BIN_EXE_statehouse"))
}

#[test]
fn an_invalid_configuration_names_the_key_and_exits_non_zero() {
    let out = statehouse()
        .args(["lb", "--set", "health.interval=2x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("health.interval"), "{stderr}");
    assert!(stderr.contains("2x"), "{stderr}");
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut child = statehouse()
        .args([
            "lb",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../lb/lb.example.toml"),
            "--set",
            "listen=127.0.0.1:0",
            "--set",
            "admin.listen=127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The first line says where it listens: it is up.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("proxying on http://127.0.0.1:"), "{line}");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit after SIGTERM: {exit}");
}
