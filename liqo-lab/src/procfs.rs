//! Process identity from `/proc`: a pid plus its start time, so that a recycled pid is not mistaken
//! for the process that once had it.

use std::{fmt, str::FromStr};

/// A process identified by its pid and its start time (clock ticks since boot, field 22 of
/// `/proc/<pid>/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessToken {
    /// The process id.
    pub pid: u32,
    /// The start time, in clock ticks since boot.
    pub start_time: u64,
}

impl ProcessToken {
    /// The token of the current process.
    pub fn current() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            start_time: stat(pid).map(|s| s.start_time).unwrap_or(0),
        }
    }

    /// The token of a running process, if `pid` is alive.
    pub fn of(pid: u32) -> Option<Self> {
        let s = stat(pid)?;
        (s.state != 'Z' && s.state != 'X').then_some(Self {
            pid,
            start_time: s.start_time,
        })
    }

    /// Whether this very process (same pid, same start time) is still running (zombies count as
    /// gone).
    pub fn is_alive(&self) -> bool {
        Self::of(self.pid).is_some_and(|t| t.start_time == self.start_time)
    }
}

impl fmt::Display for ProcessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.pid, self.start_time)
    }
}

impl FromStr for ProcessToken {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut it = s.split_whitespace();
        let pid = it.next().and_then(|p| p.parse().ok());
        let start_time = it.next().and_then(|p| p.parse().ok());
        match (pid, start_time, it.next()) {
            (Some(pid), Some(start_time), None) => Ok(Self { pid, start_time }),
            _ => Err(format!("not a process token: {s:?}")),
        }
    }
}

struct Stat {
    state: char,
    start_time: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    if pid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself contain spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3 (state); start time is field 22.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, start_time })
}

/// The executable path (first argument) a live process was started with.
pub(crate) fn argv0(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let first = raw.split(|b| *b == 0).next()?;
    Some(String::from_utf8_lossy(first).into_owned())
}

/// Whether `/proc/<pid>` exists at all (including zombies).
#[cfg(test)]
pub(crate) fn pid_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_alive() {
        let me = ProcessToken::current();
        assert_eq!(me.pid, std::process::id());
        assert!(me.start_time > 0);
        assert!(me.is_alive());
        let parsed: ProcessToken = me.to_string().parse().expect("parse");
        assert_eq!(parsed, me);
    }

    #[test]
    fn recycled_or_missing_pids_are_dead() {
        let me = ProcessToken::current();
        let other_start = ProcessToken {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other_start.is_alive());
        let missing = ProcessToken {
            pid: u32::MAX - 1,
            start_time: 1,
        };
        assert!(!missing.is_alive());
        assert!("12".parse::<ProcessToken>().is_err());
        assert!("12 x".parse::<ProcessToken>().is_err());
        assert!("1 2 3".parse::<ProcessToken>().is_err());
    }
}
