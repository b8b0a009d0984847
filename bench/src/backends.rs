//! The servers behind each backend, all private to this run (statehouse-testkit): nothing is
//! measured on, or written to, a server the machine may already run.

use statehouse_testkit::{Postgres, RedisCluster, RedisServer};
use tempfile::TempDir;

use crate::{Backend, BoxError};

/// A running backend. Dropping it stops its servers and removes their directories.
#[derive(Debug)]
pub(crate) enum Server {
    Memory,
    // The `_` fields are held only so that dropping the `Server` stops and removes them.
    Sqlite { _dir: TempDir, url: String },
    Redis(RedisServer),
    RedisCluster { _cluster: RedisCluster, url: String },
    Postgres { _server: Postgres, url: String },
}

impl Server {
    pub(crate) async fn start(backend: Backend) -> Result<Server, BoxError> {
        // The testkit blocks (it polls until a server answers): keep it off the runtime's threads.
        let server = tokio::task::spawn_blocking(move || start_blocking(backend)).await??;
        Ok(server)
    }

    /// The store URL.
    pub(crate) fn url(&self) -> String {
        match self {
            Server::Memory => "memory://".to_owned(),
            Server::Redis(redis) => redis.url(),
            Server::Sqlite { url, .. }
            | Server::RedisCluster { url, .. }
            | Server::Postgres { url, .. } => url.clone(),
        }
    }
}

fn start_blocking(backend: Backend) -> Result<Server, BoxError> {
    Ok(match backend {
        Backend::Memory => Server::Memory,
        Backend::Sqlite => {
            let dir = tempfile::Builder::new()
                .prefix("statehouse-bench-")
                .tempdir()?;
            let url = format!("sqlite://{}", dir.path().join("store.db").display());
            Server::Sqlite { _dir: dir, url }
        }
        Backend::Redis => Server::Redis(RedisServer::start()?),
        Backend::RedisCluster => {
            let cluster = RedisCluster::start()?;
            let nodes: Vec<String> = cluster
                .urls()
                .iter()
                .map(|u| u.trim_start_matches("redis://").to_owned())
                .collect();
            let url = format!("redis+cluster://{}", nodes.join(","));
            Server::RedisCluster {
                _cluster: cluster,
                url,
            }
        }
        Backend::Postgres => {
            let server = Postgres::start()?;
            let url = server.create_database("bench")?;
            Server::Postgres {
                _server: server,
                url,
            }
        }
    })
}
