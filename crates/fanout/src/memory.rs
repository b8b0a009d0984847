//! In one process's memory: the baseline, and what a stateful WebSocket
//! server has — the log dies with the process (a restart is a new epoch).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use crate::broker::{
    Batch, Broker, BrokerConfig, Message, Offset, Published, Result, check_channel, check_resume,
    new_epoch, no_log,
};

#[derive(Debug)]
struct Log {
    epoch: String,
    last: Offset,
    messages: VecDeque<(Offset, Instant, Bytes)>,
    notify: Arc<Notify>,
}

impl Log {
    fn new() -> Self {
        Log {
            epoch: new_epoch(),
            last: 0,
            messages: VecDeque::new(),
            notify: Arc::new(Notify::new()),
        }
    }

    fn trim(&mut self, config: &BrokerConfig, now: Instant) {
        let keep = config.retention.max_messages as usize;
        while self.messages.len() > keep {
            self.messages.pop_front();
        }
        while self
            .messages
            .front()
            .is_some_and(|(_, at, _)| now.duration_since(*at) > config.retention.max_age)
        {
            self.messages.pop_front();
        }
    }
}

/// The memory broker.
#[derive(Debug)]
pub(crate) struct MemoryBroker {
    config: BrokerConfig,
    logs: Mutex<HashMap<String, Log>>,
}

impl MemoryBroker {
    pub(crate) fn new(config: BrokerConfig) -> Self {
        MemoryBroker {
            config,
            logs: Mutex::default(),
        }
    }

    fn logs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Log>> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn describe(&self) -> &str {
        "memory://"
    }

    async fn publish(&self, channel: &str, payload: Bytes) -> Result<Published> {
        self.config.check_publish(channel, &payload)?;
        let mut logs = self.logs();
        let log = logs.entry(channel.to_owned()).or_insert_with(Log::new);
        log.last += 1;
        let now = Instant::now();
        log.messages.push_back((log.last, now, payload));
        log.trim(&self.config, now);
        log.notify.notify_waiters();
        Ok(Published {
            offset: log.last,
            epoch: log.epoch.clone(),
        })
    }

    async fn read(
        &self,
        channel: &str,
        after: Offset,
        epoch: Option<&str>,
        limit: usize,
    ) -> Result<Batch> {
        check_channel(channel)?;
        let mut logs = self.logs();
        let Some(log) = logs.get_mut(channel) else {
            return no_log(channel, after, epoch);
        };
        log.trim(&self.config, Instant::now());
        let oldest = log.messages.front().map_or(log.last + 1, |(o, _, _)| *o);
        check_resume(channel, after, epoch, &log.epoch, oldest, log.last)?;
        let messages = log
            .messages
            .iter()
            .filter(|(o, _, _)| *o > after)
            .take(limit)
            .map(|(offset, _, payload)| Message {
                channel: channel.to_owned(),
                offset: *offset,
                epoch: log.epoch.clone(),
                payload: payload.clone(),
            })
            .collect();
        Ok(Batch {
            epoch: log.epoch.clone(),
            messages,
            last: log.last,
        })
    }

    async fn wait(&self, channel: &str, after: Offset, timeout: Duration) -> Result<()> {
        check_channel(channel)?;
        let notify = {
            let mut logs = self.logs();
            let log = logs.entry(channel.to_owned()).or_insert_with(Log::new);
            if log.last > after {
                return Ok(());
            }
            log.notify.clone()
        };
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before re-checking, so a publish in between is not missed.
        notified.as_mut().enable();
        if self.logs().get(channel).is_some_and(|l| l.last > after) {
            return Ok(());
        }
        let _ = tokio::time::timeout(timeout, notified).await;
        Ok(())
    }
}
