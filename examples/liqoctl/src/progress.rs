//! Long steps with a spinner (on a terminal), a ✓/✗ line each, and one deadline for all.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::CliError;

/// Shows what a running step last saw; the message of a timeout.
#[derive(Clone, Debug)]
pub struct Reporter {
    pb: ProgressBar,
    title: String,
    last: Arc<Mutex<String>>,
}

impl Reporter {
    /// Records (and shows) the latest observation.
    pub fn note(&self, msg: impl Into<String>) {
        let msg = msg.into();
        self.pb.set_message(format!("{}: {msg}", self.title));
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = msg;
    }

    /// The latest observation.
    pub fn last(&self) -> String {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Steps sharing one deadline.
#[derive(Debug)]
pub struct Steps {
    timeout: Duration,
    deadline: Instant,
}

/// Formats a duration for people: `850ms`, `12.3s`, `4m05s`.
pub fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d < Duration::from_secs(60) {
        format!("{:.1}s", d.as_secs_f64())
    } else if d < Duration::from_secs(3600) {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    } else if d < Duration::from_secs(48 * 3600) {
        format!("{}h{:02}m", d.as_secs() / 3600, (d.as_secs() % 3600) / 60)
    } else {
        format!(
            "{}d{:02}h",
            d.as_secs() / 86_400,
            (d.as_secs() % 86_400) / 3600
        )
    }
}

impl Steps {
    /// Steps that must all finish within `timeout` from now.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            deadline: Instant::now() + timeout,
        }
    }

    /// Runs one step: a spinner while `f` runs, `✓ title` when it succeeds, `✗ title` when it
    /// fails or the deadline passes. A timeout names the step, the last observation and `next`.
    pub async fn run<T, Fut>(
        &self,
        title: &str,
        next: &str,
        f: impl FnOnce(Reporter) -> Fut,
    ) -> Result<T, CliError>
    where
        Fut: Future<Output = Result<T, CliError>>,
    {
        let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
            pb.set_style(style);
        }
        pb.set_message(title.to_owned());
        pb.enable_steady_tick(Duration::from_millis(120));
        let rep = Reporter {
            pb: pb.clone(),
            title: title.to_owned(),
            last: Arc::default(),
        };
        let started = Instant::now();
        let outcome = tokio::time::timeout_at(self.deadline.into(), f(rep.clone())).await;
        pb.finish_and_clear();
        match outcome {
            Ok(Ok(v)) => {
                eprintln!("✓ {title} ({})", human(started.elapsed()));
                Ok(v)
            }
            Ok(Err(e)) => {
                eprintln!("✗ {title}");
                Err(e)
            }
            Err(_) => {
                eprintln!("✗ {title}");
                let last = rep.last();
                let seen = if last.is_empty() {
                    String::new()
                } else {
                    format!(" (last seen: {last})")
                };
                Err(CliError::failed(
                    format!(
                        "timed out after {} waiting for: {title}{seen}",
                        human(self.timeout)
                    ),
                    next,
                ))
            }
        }
    }

    /// Prints a skipped step.
    pub fn skipped(&self, title: &str, why: &str) {
        eprintln!("- {title}: skipped ({why})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human(Duration::from_secs(245)), "4m05s");
        assert_eq!(human(Duration::from_secs(3720)), "1h02m");
        assert_eq!(human(Duration::from_secs(365 * 86_400 + 7200)), "365d02h");
    }

    #[tokio::test]
    async fn a_timeout_names_the_step_and_the_last_observation() {
        let steps = Steps::new(Duration::from_millis(50));
        let err = steps
            .run("OfferAccepted", "check the provider", |rep| async move {
                rep.note("False/Pending: waiting");
                futures::future::pending::<Result<(), CliError>>().await
            })
            .await
            .unwrap_err();
        let CliError::Failed { what, next } = err else {
            panic!("not a failure")
        };
        assert!(what.contains("OfferAccepted"), "{what}");
        assert!(what.contains("False/Pending: waiting"), "{what}");
        assert_eq!(next.as_deref(), Some("check the provider"));
    }
}
