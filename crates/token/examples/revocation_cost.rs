// Run with: cargo run --release -p statehouse-token --example revocation_cost [-- ITERATIONS]
//
// What the revocation list costs a verification: verifies one EdDSA access token ITERATIONS
// times (default 20000) without a revocation check, then with the check against a private
// redis-server (started by statehouse-testkit on a free loopback port) and against memory://,
// and prints the latency of each, one call at a time. Also times a raw store GET on the same
// Redis, which is what the check adds.

use std::time::{Duration, Instant};

use statehouse_store::{StoreConfig, open};
use statehouse_token::{
    IssuerConfig, KeyRing, RevocationList, TokenIssuer, TokenVerifier, VerifierConfig,
};

struct Stats {
    mean: Duration,
    p50: Duration,
    p99: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        mean: samples.iter().sum::<Duration>() / samples.len() as u32,
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// One round of `n` timed calls of `op`, appended to `samples`.
async fn round<F, Fut>(n: usize, samples: &mut Vec<Duration>, mut op: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..n {
        let start = Instant::now();
        op().await;
        samples.push(start.elapsed());
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iterations: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 20_000,
    };
    let redis = tokio::task::spawn_blocking(statehouse_testkit::RedisServer::start).await??;
    let redis_store = open(StoreConfig::new(redis.url()).prefix("revocation-cost:")).await?;
    let memory_store = open(StoreConfig::new("memory://")).await?;

    let ring = KeyRing::generate_ed25519("bench")?;
    let issuer = TokenIssuer::new(ring.clone(), IssuerConfig::new("https://bench", "bench"))?;
    let (token, claims) = issuer.issue_access("user", Default::default())?;
    let config = VerifierConfig::new("https://bench", "bench");
    let plain = TokenVerifier::new(ring.clone(), config.clone());
    let with_redis = TokenVerifier::new(ring.clone(), config.clone())
        .with_revocations(RevocationList::new(redis_store.clone()));
    let with_memory =
        TokenVerifier::new(ring, config).with_revocations(RevocationList::new(memory_store));
    // A few revoked tokens so the list is not empty (the checked one is not among them).
    let list = RevocationList::new(redis_store.clone());
    for i in 0..100 {
        list.revoke(&format!("other-{i}"), claims.exp).await?;
    }

    let jti_key = format!("revoked:{}", claims.jti);
    let names = [
        "verify, no revocation check",
        "verify + revocation check (memory://)",
        "verify + revocation check (redis)",
        "raw store GET (redis), for reference",
    ];
    // The modes take turns in rounds, so drift on a shared machine (other builds, frequency
    // changes) spreads over all of them instead of landing on one. Round 0 is a warm-up.
    const ROUNDS: usize = 20;
    let per_round = (iterations / ROUNDS).max(1);
    let mut samples: [Vec<Duration>; 4] = Default::default();
    for r in 0..=ROUNDS {
        let mut scratch = Vec::new();
        let sink = |i: usize, samples: &mut [Vec<Duration>; 4], scratch: &mut Vec<Duration>| {
            if r > 0 {
                samples[i].append(scratch);
            }
            scratch.clear();
        };
        round(per_round, &mut scratch, || async {
            plain.verify(&token).await.map(drop).expect("valid")
        })
        .await;
        sink(0, &mut samples, &mut scratch);
        round(per_round, &mut scratch, || async {
            with_memory.verify(&token).await.map(drop).expect("valid")
        })
        .await;
        sink(1, &mut samples, &mut scratch);
        round(per_round, &mut scratch, || async {
            with_redis.verify(&token).await.map(drop).expect("valid")
        })
        .await;
        sink(2, &mut samples, &mut scratch);
        round(per_round, &mut scratch, || async {
            redis_store.get(&jti_key).await.map(drop).expect("redis up")
        })
        .await;
        sink(3, &mut samples, &mut scratch);
    }
    let rows: Vec<(&str, Stats)> = names.into_iter().zip(samples.map(stats)).collect();

    println!(
        "revocation-check cost, EdDSA token, {} sequential calls each ({ROUNDS} interleaved rounds)",
        per_round * ROUNDS
    );
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>10}",
        "", "mean", "p50", "p99", "calls/s"
    );
    for (name, s) in &rows {
        println!(
            "{name:<40} {:>8.1}µs {:>8.1}µs {:>8.1}µs {:>10.0}",
            s.mean.as_secs_f64() * 1e6,
            s.p50.as_secs_f64() * 1e6,
            s.p99.as_secs_f64() * 1e6,
            1.0 / s.mean.as_secs_f64()
        );
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "redis check adds {:.1}µs at p50 ({:.1}µs mean) per verification, {:.2}x the p50 of a \
         plain verify; a raw GET is {:.1}µs at p50; memory:// adds {:.1}µs at p50",
        us(rows[2].1.p50) - us(rows[0].1.p50),
        us(rows[2].1.mean) - us(rows[0].1.mean),
        us(rows[2].1.p50) / us(rows[0].1.p50),
        us(rows[3].1.p50),
        us(rows[1].1.p50) - us(rows[0].1.p50),
    );
    drop(redis);
    Ok(())
}
