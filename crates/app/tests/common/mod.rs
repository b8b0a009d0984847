//! What the shop's in-process tests share: an instance's configuration on
//! files in a temp directory.

use std::path::Path;
use std::time::Duration;

use statehouse_app::{Arch, ServeConfig};
use statehouse_session::SessionKeys;

/// A shared-sqlite instance named `name` keeping everything under `dir`,
/// with `dash` as its admin token and cookies without `Secure` (plain
/// HTTP in tests).
pub(crate) fn config(dir: &Path, name: &str) -> ServeConfig {
    ServeConfig {
        name: name.into(),
        arch: Arch::SharedSqlite,
        session_store: format!("sqlite://{}", dir.join("sessions.db").display()),
        database: format!("sqlite://{}", dir.join("shop.db").display()),
        objects: dir.join("objects").display().to_string(),
        session_keys: SessionKeys::generate("t1"),
        token_keys: None,
        admin_token: Some("dash".into()),
        insecure_cookies: true,
        drain_delay: Duration::ZERO,
        broker: None,
        live_keys: None,
    }
}
