//! The `statehouse` binary. It only parses the command line and delegates.

fn main() {
    println!("statehouse {}", env!("CARGO_PKG_VERSION"));
}
