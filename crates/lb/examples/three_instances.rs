// Run: cargo run -p statehouse-lb --example three_instances
// (builds the test backend first: cargo build -p statehouse-lb --bin lb-test-backend)
//
// Starts three `lb-test-backend` instances on free loopback ports and a balancer in front of
// them on 127.0.0.1:8080 (admin API on 127.0.0.1:9901), P2C peak-EWMA. Then try:
//   curl -si localhost:8080/ | grep -i x-served-by
//   curl -s localhost:9901/instances
//   curl -s -XPOST 'localhost:9901/instances/app-2/drain?wait=10s'
//   curl -s localhost:9901/metrics | grep requests_total
// Ctrl-C drains and stops.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use statehouse_lb::{LbConfig, run, shutdown_signal};

fn start_backend(name: &str) -> (Child, u16) {
    // The backend binary sits next to this example's directory in the target dir.
    let exe = std::env::current_exe().expect("own path");
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join("lb-test-backend");
    let mut child = Command::new(&bin)
        .arg(name)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run `cargo build -p statehouse-lb --bin lb-test-backend`)",
                bin.display()
            )
        });
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("port line");
    let port = line
        .trim()
        .trim_start_matches("listening on ")
        .parse()
        .expect("a port");
    (child, port)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut children = Vec::new();
    let mut toml = String::from("policy = \"p2c_ewma\"\n");
    for name in ["app-1", "app-2", "app-3"] {
        let (child, port) = start_backend(name);
        children.push(child);
        toml.push_str(&format!(
            "[[instances]]\nname = \"{name}\"\naddr = \"127.0.0.1:{port}\"\n"
        ));
    }
    let config = LbConfig::from_toml_str(&toml)?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let admin = tokio::net::TcpListener::bind(config.admin.listen).await?;
    println!(
        "balancer on http://{}  admin on http://{}",
        config.listen, config.admin.listen
    );
    let result = run(listener, admin, config, shutdown_signal()).await;
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(result?)
}
