//! Status conditions the Kubernetes way: `type`, `status`, `reason`, `message`,
//! `lastTransitionTime` and `observedGeneration`, kept one per type.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

/// A condition's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known yet.
    Unknown,
}

impl Status {
    /// The API string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for Status {
    fn from(b: bool) -> Self {
        if b { Self::True } else { Self::False }
    }
}

/// Sets the condition of type `type_` in `conditions`, returning whether anything changed.
///
/// `lastTransitionTime` moves only when the status changes, so controllers can call this on every
/// reconcile without churning the object. `reason` should be a CamelCase word; `message` is for
/// people.
///
/// ```
/// use liqo_core::conditions::{set, Status, is_true};
/// let mut conds = vec![];
/// assert!(set(&mut conds, "Authenticated", Status::True, "ChallengeSigned", "key verified", Some(3)));
/// assert!(!set(&mut conds, "Authenticated", Status::True, "ChallengeSigned", "key verified", Some(3)));
/// assert!(is_true(&conds, "Authenticated"));
/// ```
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: Status,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
) -> bool {
    let status_str = status.as_str();
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        let unchanged = c.status == status_str
            && c.reason == reason
            && c.message == message
            && c.observed_generation == observed_generation;
        if unchanged {
            return false;
        }
        if c.status != status_str {
            c.last_transition_time = Time(Timestamp::now());
        }
        c.status = status_str.to_owned();
        c.reason = reason.to_owned();
        c.message = message.to_owned();
        c.observed_generation = observed_generation;
        return true;
    }
    conditions.push(Condition {
        type_: type_.to_owned(),
        status: status_str.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation,
        last_transition_time: Time(Timestamp::now()),
    });
    true
}

/// The condition of type `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of type `type_` is present and `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut conds = vec![];
        set(&mut conds, "Ready", Status::False, "Starting", "", Some(1));
        let t0 = conds[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(set(
            &mut conds,
            "Ready",
            Status::False,
            "StillStarting",
            "slow",
            Some(2)
        ));
        assert_eq!(conds[0].last_transition_time, t0);
        assert_eq!(conds[0].observed_generation, Some(2));
        assert!(set(&mut conds, "Ready", Status::True, "Up", "", Some(2)));
        assert_ne!(conds[0].last_transition_time, t0);
        assert_eq!(conds.len(), 1);
        set(&mut conds, "Other", Status::Unknown, "Pending", "", None);
        assert_eq!(conds.len(), 2);
        assert!(is_true(&conds, "Ready") && !is_true(&conds, "Other") && !is_true(&conds, "Nope"));
    }
}
