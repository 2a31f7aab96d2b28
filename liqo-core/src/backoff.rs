//! How every watch and controller of liqo-rs backs off when its API server fails.
//!
//! kube-runtime's default follows client-go: up to 30 s between attempts, reset only after two
//! quiet minutes. After a 15 s outage of a provider's API server (plus the moment its
//! authorizer answers 403 while its caches fill) a watch could sleep 30 s more, and the
//! controllers behind it longer: the chaos suite measured 70-160 s before an offloaded pod ran
//! again. Reconnecting to an API server is one request; a 5 s cap costs little and recovers
//! within seconds of its return.

use std::time::Duration;

use kube::runtime::watcher::ExponentialBackoff;

/// The first wait after an error.
pub const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(250);

/// The longest wait between two attempts.
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The backoff for watches (`WatchStreamExt::backoff`) and controllers
/// (`Controller::trigger_backoff`): 250 ms doubling to 5 s, with jitter, reset by the first
/// success.
pub fn watch_backoff() -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(WATCH_BACKOFF_MIN)
        .with_max_delay(WATCH_BACKOFF_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

#[cfg(test)]
mod tests {
    use kube::runtime::utils::Backoff;

    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = watch_backoff();
        let waits: Vec<Duration> = (&mut b).take(12).collect();
        // Jitter adds up to one delay on top of each step.
        assert!(
            waits[0] >= WATCH_BACKOFF_MIN && waits[0] <= 2 * WATCH_BACKOFF_MIN,
            "{waits:?}"
        );
        assert!(
            waits.iter().all(|w| *w <= 2 * WATCH_BACKOFF_MAX),
            "{waits:?}"
        );
        assert!(waits[11] >= WATCH_BACKOFF_MAX, "{waits:?}");
        b.reset();
        assert!(b.next().is_some_and(|w| w <= 2 * WATCH_BACKOFF_MIN));
    }
}
