//! The link checker: turns WireGuard handshake times into [`LinkStatus`] and the
//! `NetworkReady` condition of a `ForeignCluster`.
//!
//! WireGuard has no event for "handshake happened" or "peer went silent", so reading the
//! interface periodically is the only way to watch a link; the interval is the caller's.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use liqo_core::{
    ClusterId, FabricError, LinkState, LinkStatus,
    conditions::{self, Condition, Status},
    crds::{ForeignCluster, foreign_cluster_condition::NETWORK_READY},
};
use tokio::{sync::watch, task::JoinHandle};

/// The status of a link whose last handshake was at `latest` (if ever), as seen at `now`.
pub fn link_status(
    latest: Option<SystemTime>,
    rx_bytes: u64,
    tx_bytes: u64,
    now: SystemTime,
    timeout: Duration,
) -> LinkStatus {
    let (state, message) = match latest {
        None => (
            LinkState::Connecting,
            "no handshake with the peer gateway yet".to_owned(),
        ),
        Some(t) => {
            // A handshake "in the future" (clock step) counts as just now.
            let age = now.duration_since(t).unwrap_or_default();
            if age <= timeout {
                (
                    LinkState::Connected,
                    format!("last handshake {}s ago", age.as_secs()),
                )
            } else {
                (
                    LinkState::Disconnected,
                    format!(
                        "last handshake {}s ago, more than {}s",
                        age.as_secs(),
                        timeout.as_secs()
                    ),
                )
            }
        }
    };
    LinkStatus {
        state,
        latest_handshake: latest,
        rx_bytes,
        tx_bytes,
        message,
    }
}

/// Sets the `NetworkReady` condition from `status`; returns whether it changed.
pub fn set_network_ready(
    conds: &mut Vec<Condition>,
    status: &LinkStatus,
    observed_generation: Option<i64>,
) -> bool {
    let (s, reason) = match status.state {
        LinkState::Connected => (Status::True, "TunnelConnected"),
        LinkState::Connecting => (Status::Unknown, "TunnelConnecting"),
        LinkState::Disconnected => (Status::False, "TunnelDisconnected"),
    };
    conditions::set(
        conds,
        NETWORK_READY,
        s,
        reason,
        &status.message,
        observed_generation,
    )
}

/// Writes the `NetworkReady` condition of `ForeignCluster` `name` from `status`, only when it
/// changed (so a periodic checker does not churn the object). Returns whether it wrote.
pub async fn report_network_ready(
    api: &Api<ForeignCluster>,
    name: &str,
    status: &LinkStatus,
) -> Result<bool, FabricError> {
    let err = |action: &str, e: kube::Error| FabricError::Backend {
        backend: "ForeignCluster status".into(),
        message: format!("{action} ForeignCluster {name}: {e}"),
    };
    let fc = api.get_status(name).await.map_err(|e| err("reading", e))?;
    let mut conds = fc.status.map(|s| s.conditions).unwrap_or_default();
    if !set_network_ready(&mut conds, status, fc.metadata.generation) {
        return Ok(false);
    }
    let patch = serde_json::json!({ "status": { "conditions": conds } });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| err("patching", e))?;
    Ok(true)
}

/// How soon a link still connecting is checked again, during [`FAST_WINDOW`].
pub const CONNECTING_RECHECK: Duration = Duration::from_millis(250);
/// How long after a link is made (or the checker starts) a connecting link is checked every
/// [`CONNECTING_RECHECK`]; a peer that stays unreachable is then checked every interval.
pub const FAST_WINDOW: Duration = Duration::from_secs(15);

/// Something that can report the status of all its links.
#[async_trait]
pub trait LinkSource: Send + Sync + 'static {
    /// The status of every link.
    async fn link_statuses(&self) -> Result<BTreeMap<ClusterId, LinkStatus>, FabricError>;
}

/// Reads the links of a [`LinkSource`] every interval and publishes them on a watch channel
/// (only when a state, a handshake or the byte counters changed: at most once an interval while
/// traffic flows, so `Tunnel` status and metrics show live counters). Stops when dropped.
#[derive(Debug)]
pub struct LinkChecker {
    rx: watch::Receiver<BTreeMap<ClusterId, LinkStatus>>,
    task: JoinHandle<()>,
}

type Summary<'a> = Vec<(&'a ClusterId, LinkState, Option<SystemTime>, u64, u64)>;

fn summary(m: &BTreeMap<ClusterId, LinkStatus>) -> Summary<'_> {
    m.iter()
        .map(|(c, s)| (c, s.state, s.latest_handshake, s.rx_bytes, s.tx_bytes))
        .collect()
}

impl LinkChecker {
    /// Starts checking `source` every `interval`.
    pub fn spawn<L: LinkSource + ?Sized>(source: Arc<L>, interval: Duration) -> Self {
        Self::spawn_rechecking(source, interval, None)
    }

    /// Like [`spawn`](Self::spawn), and also checks at once whenever `recheck` changes (a link
    /// made), then every [`CONNECTING_RECHECK`] while a link is still connecting, for at most
    /// [`FAST_WINDOW`]: a new link's first handshake gates NetworkReady, so recovery after a
    /// restart, and should not wait for the next `interval`.
    pub fn spawn_rechecking<L: LinkSource + ?Sized>(
        source: Arc<L>,
        interval: Duration,
        mut recheck: Option<watch::Receiver<u64>>,
    ) -> Self {
        let (tx, rx) = watch::channel(BTreeMap::new());
        let task = tokio::spawn(async move {
            let mut fast_until = tokio::time::Instant::now() + FAST_WINDOW;
            loop {
                match source.link_statuses().await {
                    Ok(now) => {
                        tx.send_if_modified(|cur| {
                            let changed = summary(cur) != summary(&now);
                            *cur = now;
                            changed
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "link check failed"),
                }
                if tx.is_closed() {
                    return;
                }
                let connecting = tx
                    .borrow()
                    .values()
                    .any(|s| s.state == LinkState::Connecting);
                let wait = if connecting && tokio::time::Instant::now() < fast_until {
                    interval.min(CONNECTING_RECHECK)
                } else {
                    interval
                };
                let rechecked = async {
                    match recheck.as_mut() {
                        Some(r) => r.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    open = rechecked => {
                        if open {
                            fast_until = tokio::time::Instant::now() + FAST_WINDOW;
                        } else {
                            // Its source is gone: back to the plain interval.
                            recheck = None;
                        }
                    }
                }
            }
        });
        Self { rx, task }
    }

    /// The latest statuses; `changed().await` on it waits for the next change.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<ClusterId, LinkStatus>> {
        self.rx.clone()
    }
}

impl Drop for LinkChecker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_age_decides_state() {
        let now = SystemTime::now();
        let t = Duration::from_secs(180);
        assert_eq!(link_status(None, 0, 0, now, t).state, LinkState::Connecting);
        let fresh = link_status(Some(now - Duration::from_secs(5)), 1, 2, now, t);
        assert_eq!(fresh.state, LinkState::Connected);
        assert!(fresh.message.contains("5s ago"), "{}", fresh.message);
        let stale = link_status(Some(now - Duration::from_secs(200)), 1, 2, now, t);
        assert_eq!(stale.state, LinkState::Disconnected);
        let future = link_status(Some(now + Duration::from_secs(3)), 0, 0, now, t);
        assert_eq!(future.state, LinkState::Connected);
    }

    #[test]
    fn network_ready_condition_follows_state() {
        let now = SystemTime::now();
        let t = Duration::from_secs(180);
        let mut conds = vec![];
        assert!(set_network_ready(
            &mut conds,
            &link_status(None, 0, 0, now, t),
            Some(1)
        ));
        assert_eq!(conds[0].status, "Unknown");
        let up = link_status(Some(now), 0, 0, now, t);
        assert!(set_network_ready(&mut conds, &up, Some(1)));
        assert!(conditions::is_true(&conds, NETWORK_READY));
        assert_eq!(conds[0].reason, "TunnelConnected");
        assert!(
            !set_network_ready(&mut conds, &up, Some(1)),
            "no change, no write"
        );
        let down = link_status(Some(now - Duration::from_secs(999)), 0, 0, now, t);
        assert!(set_network_ready(&mut conds, &down, Some(1)));
        assert_eq!(conds[0].status, "False");
        assert_eq!(conds.len(), 1);
    }

    struct Flipping(std::sync::Mutex<u32>);

    #[async_trait]
    impl LinkSource for Flipping {
        async fn link_statuses(&self) -> Result<BTreeMap<ClusterId, LinkStatus>, FabricError> {
            let mut n = self.0.lock().unwrap();
            *n += 1;
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
            // Reads 1-2: no handshake; 3: handshake; 4 and later: traffic.
            let latest = (*n >= 3).then_some(now);
            let rx = if *n >= 4 { 100 } else { 0 };
            Ok([(
                "rome".parse().unwrap(),
                link_status(latest, rx, 0, now, Duration::from_secs(180)),
            )]
            .into())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn checker_publishes_changes_only() {
        let checker = LinkChecker::spawn(Arc::new(Flipping(0.into())), Duration::from_secs(1));
        let mut rx = checker.subscribe();
        rx.changed().await.unwrap();
        assert_eq!(
            rx.borrow_and_update()[&"rome".parse::<ClusterId>().unwrap()].state,
            LinkState::Connecting
        );
        // The second read (nothing new) is not a change; the third (handshake) is, and so is
        // the fourth (bytes moved); the fifth (same again) is not.
        let rome: ClusterId = "rome".parse().unwrap();
        rx.changed().await.unwrap();
        let s = rx.borrow_and_update()[&rome].clone();
        assert_eq!((s.state, s.rx_bytes), (LinkState::Connected, 0));
        rx.changed().await.unwrap();
        let s = rx.borrow_and_update()[&rome].clone();
        assert_eq!((s.state, s.rx_bytes), (LinkState::Connected, 100));
        let quiet = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
        assert!(quiet.is_err(), "unchanged reads publish nothing");
    }
}
