//! The dashboard: one page, and the JSON it polls.
//!
//! | request | effect |
//! |---|---|
//! | `GET /` | the page |
//! | `GET /api/state` | every child with its balancer view (health, in-flight, requests/s, mean latency) and its own (visitors active in the last 5 minutes), and the most recent requests over all instances |
//! | `POST /api/instances` | start one more instance and add it to the balancer |
//! | `POST /api/instances/{name}/kill` | kill -9 |
//! | `POST /api/instances/{name}/restart` | drain, stop, start, undrain (a killed one is just started) |
//! | `POST /api/instances/{name}/drain`, `.../undrain` | through the balancer's admin API |
//!
//! It listens on loopback only, and state-changing requests must come from
//! the page itself (the shop's Origin check).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::Method;
use serde_json::{Value, json};

use super::Tier;
use crate::error::AppError;

/// One instance's balancer counters when last sampled: when, requests,
/// latency sum (s) and latency count.
type Sample = (Instant, f64, f64, f64);

#[derive(Debug, Clone)]
struct Dash {
    tier: Arc<Tier>,
    samples: Arc<Mutex<HashMap<String, Sample>>>,
}

pub(super) fn router(tier: Arc<Tier>) -> Router {
    let dash = Dash {
        tier,
        samples: Arc::default(),
    };
    Router::new()
        .route(
            "/",
            get(|| async { Html(include_str!("../../assets/dashboard.html")) }),
        )
        .route("/api/state", get(state))
        .route("/api/instances", post(add))
        .route("/api/instances/{name}/{action}", post(act))
        .layer(middleware::from_fn(same_origin))
        .with_state(dash)
}

async fn same_origin(req: Request, next: Next) -> Response {
    if *req.method() == Method::GET {
        return next.run(req).await;
    }
    match crate::shop::check_origin(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// `name{instance="x"} value` lines of one metric, by instance.
fn metric_by_instance(text: &str, metric: &str) -> HashMap<String, f64> {
    let prefix = format!("{metric}{{instance=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (instance, rest) = rest.split_once("\"}")?;
            Some((instance.to_owned(), rest.trim().parse().ok()?))
        })
        .collect()
}

async fn state(State(dash): State<Dash>) -> Result<Json<Value>, AppError> {
    let tier = &dash.tier;
    let lb = tier
        .admin("GET", "/instances", None)
        .await
        .unwrap_or_default();
    let metrics = tier
        .http
        .get(format!("http://{}/metrics", tier.lb_admin))
        .send()
        .await
        .ok();
    let metrics = match metrics {
        Some(r) => r.text().await.unwrap_or_default(),
        None => String::new(),
    };
    let sums = metric_by_instance(&metrics, "statehouse_lb_request_duration_seconds_sum");
    let counts = metric_by_instance(&metrics, "statehouse_lb_request_duration_seconds_count");
    let children = tier.children();
    let mut per_instance = HashMap::new();
    for c in children
        .iter()
        .filter(|c| c.role == super::Role::Instance && c.pid.is_some())
    {
        if let Some(s) = tier.instance_stats(c.port).await {
            per_instance.insert(c.name.clone(), s);
        }
    }
    // The most recent requests over every instance, newest first.
    let mut recent: Vec<Value> = per_instance
        .iter()
        .flat_map(|(name, s)| {
            s["recent"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |mut r| {
                    r["instance"] = json!(name);
                    r
                })
        })
        .collect();
    recent.sort_by_key(|r| std::cmp::Reverse(r["at_ms"].as_u64().unwrap_or(0)));
    recent.truncate(15);
    let now = Instant::now();
    let mut samples = dash.samples.lock().unwrap_or_else(|p| p.into_inner());
    let children: Vec<Value> = children
        .into_iter()
        .map(|c| {
            let mut v = json!(c);
            if let Some(s) = per_instance.get(&c.name) {
                v["active_visitors"] = s["active_visitors"].clone();
            }
            let seen = lb
                .as_array()
                .and_then(|list| list.iter().find(|i| i["name"] == c.name.as_str()));
            if let Some(seen) = seen {
                v["lb"] = seen.clone();
                let requests = seen["requests"].as_f64().unwrap_or(0.0);
                let sum = sums.get(&c.name).copied().unwrap_or(0.0);
                let count = counts.get(&c.name).copied().unwrap_or(0.0);
                if let Some((then, r0, s0, c0)) = samples.get(&c.name) {
                    let secs = now.duration_since(*then).as_secs_f64().max(0.001);
                    v["rps"] = json!(((requests - r0) / secs).max(0.0));
                    if count > *c0 {
                        v["mean_ms"] = json!((sum - s0) / (count - c0) * 1000.0);
                    }
                }
                samples.insert(c.name.clone(), (now, requests, sum, count));
            }
            v
        })
        .collect();
    Ok(Json(json!({
        "arch": tier.plan.arch.as_str(),
        "shop_url": tier.shop_url,
        "session_store": crate::db::redact(&tier.plan.session_store),
        "database": crate::db::redact(&tier.plan.database),
        "uptime_s": tier.started.elapsed().as_secs(),
        "children": children,
        "recent": recent,
    })))
}

async fn add(State(dash): State<Dash>) -> Result<Json<Value>, AppError> {
    let name = dash.tier.add_instance().await?;
    Ok(Json(json!({ "added": name })))
}

async fn act(
    State(dash): State<Dash>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Json<Value>, AppError> {
    let tier = &dash.tier;
    match action.as_str() {
        "kill" => {
            let pid = tier.kill(&name)?;
            Ok(Json(json!({ "killed": name, "pid": pid })))
        }
        "restart" => {
            tier.restart(&name).await?;
            Ok(Json(json!({ "restarted": name })))
        }
        "drain" | "undrain" => {
            let v = tier
                .admin("POST", &format!("/instances/{name}/{action}"), None)
                .await?;
            Ok(Json(v))
        }
        _ => Err(AppError::NotFound(format!(
            "no action {action:?}; expected kill, restart, drain or undrain"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_per_instance_metrics() {
        let text =
            "# HELP x\nm_sum{instance=\"app-1\"} 1.5\nm_sum{instance=\"app-2\"} 2\nother 3\n";
        let m = metric_by_instance(text, "m_sum");
        assert_eq!(m.get("app-1"), Some(&1.5));
        assert_eq!(m.get("app-2"), Some(&2.0));
        assert_eq!(m.len(), 2);
    }
}
