//! The statehouse side of `fanout-bench`, as its own processes.
//!
//! `bench-hub PORT BROKER_URL NAME`: the WebSocket hub on a broker,
//! admitting HS256 tokens signed with `BENCH_HUB_SECRET`. Prints
//! `listening PORT` when ready; stops on SIGTERM or SIGINT.
//!
//! `bench-hub publish BROKER_URL RATE SECONDS SIZE FIRST_SEQ`: the
//! publisher, the counterpart of `socketio-publisher.mjs`: `RATE` messages a
//! second into the channel `bench`, each `"{seq} {send time µs} xxx…"` of
//! `SIZE` bytes; prints `published N last_seq L`.
//!
//! `bench-hub floor PORT REDIS_URL` and `bench-hub floor-publish REDIS_URL
//! RATE SECONDS SIZE FIRST_SEQ`: the floor side, the least a fan-out server
//! can do (see `statehouse_bench::fanout_floor`).

use std::sync::Arc;

use axum::serve::ListenerExt;
use statehouse_fanout::hub::{Hub, HubConfig, TokenAuth};
use statehouse_fanout::{BrokerConfig, open};
use statehouse_token::{Key, KeyRing, TokenVerifier, VerifierConfig};

#[tokio::main]
async fn main() -> Result<(), statehouse_bench::BoxError> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, broker, rate, seconds, size, first] = args.as_slice()
        && mode == "publish"
    {
        let last = statehouse_bench::fanout::publish(
            broker,
            rate.parse()?,
            std::time::Duration::from_secs(seconds.parse()?),
            size.parse()?,
            first.parse()?,
        )
        .await?;
        let first: u64 = first.parse()?;
        println!("published {} last_seq {last}", last + 1 - first);
        return Ok(());
    }
    if let [_, mode, redis, rate, seconds, size, first] = args.as_slice()
        && mode == "floor-publish"
    {
        let first: u64 = first.parse()?;
        let last = statehouse_bench::fanout_floor::publish(
            redis,
            rate.parse()?,
            std::time::Duration::from_secs(seconds.parse()?),
            size.parse()?,
            first,
        )
        .await?;
        println!("published {} last_seq {last}", last + 1 - first);
        return Ok(());
    }
    if let [_, mode, port, redis] = args.as_slice()
        && mode == "floor"
    {
        return statehouse_bench::fanout_floor::serve(port.parse()?, redis).await;
    }
    let [_, port, broker, name] = args.as_slice() else {
        return Err(
            "usage: bench-hub PORT BROKER_URL NAME (token secret in BENCH_HUB_SECRET)".into(),
        );
    };
    let secret = std::env::var("BENCH_HUB_SECRET").map_err(|_| "BENCH_HUB_SECRET is not set")?;
    let ring = KeyRing::new().with_key(Key::hmac("bench", secret.as_bytes())?)?;
    let verifier = TokenVerifier::new(
        ring,
        VerifierConfig::new(
            statehouse_bench::fanout::ISSUER,
            statehouse_bench::fanout::AUDIENCE,
        ),
    );
    let broker = open(BrokerConfig::new(broker.as_str())).await?;
    let hub = Hub::new(
        broker,
        Arc::new(TokenAuth::new(verifier)),
        HubConfig::new(name.as_str()),
        None,
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>()?))
        .await?
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    let app: axum::Router = hub.router("/ws");
    println!("listening {port}");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}
