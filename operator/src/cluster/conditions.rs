//! Standard conditions (`type`, `status`, `reason`, `message`,
//! `lastTransitionTime`, `observedGeneration`) kept as a list-map keyed by
//! `type`: setting one replaces the entry of that type and keeps its
//! transition time when its status did not change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A condition to set, without its timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted<'a> {
    /// Condition type (`Ready`, `SpecValid`, `Draining`).
    pub type_: &'a str,
    /// `true` → `"True"`.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'a str,
    /// Human-readable detail.
    pub message: String,
}

/// `conditions` with `wanted` set; `now` is used for a new transition.
pub fn set(
    conditions: &[Condition],
    wanted: Wanted<'_>,
    generation: Option<i64>,
    now: jiff::Timestamp,
) -> Vec<Condition> {
    let status = if wanted.status { "True" } else { "False" };
    let previous = conditions.iter().find(|c| c.type_ == wanted.type_);
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: wanted.type_.to_string(),
        status: status.to_string(),
        reason: wanted.reason.to_string(),
        message: wanted.message,
        last_transition_time,
        observed_generation: generation,
    };
    let mut out: Vec<Condition> = conditions
        .iter()
        .filter(|c| c.type_ != wanted.type_)
        .cloned()
        .collect();
    out.push(condition);
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// `conditions` without the condition of `type_`.
pub fn remove(conditions: &[Condition], type_: &str) -> Vec<Condition> {
    conditions
        .iter()
        .filter(|c| c.type_ != type_)
        .cloned()
        .collect()
}

/// Whether `type_` is set with `status`.
pub fn is(conditions: &[Condition], type_: &str, status: bool) -> bool {
    let want = if status { "True" } else { "False" };
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(secs).unwrap()
    }

    fn ready(status: bool, message: &str) -> Wanted<'static> {
        Wanted {
            type_: "Ready",
            status,
            reason: if status {
                "AllReplicasReady"
            } else {
                "Progressing"
            },
            message: message.into(),
        }
    }

    #[test]
    fn keeps_transition_time_while_status_holds_and_moves_it_on_change() {
        let first = set(&[], ready(false, "0/1"), Some(1), at(100));
        assert_eq!(first[0].last_transition_time, Time(at(100)));
        let same = set(&first, ready(false, "0/2"), Some(2), at(200));
        assert_eq!(same[0].last_transition_time, Time(at(100)));
        assert_eq!(same[0].message, "0/2");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = set(&same, ready(true, "2/2"), Some(2), at(300));
        assert_eq!(flipped[0].last_transition_time, Time(at(300)));
        assert!(is(&flipped, "Ready", true));
    }

    #[test]
    fn one_entry_per_type_sorted_by_type() {
        let c = set(&[], ready(true, ""), None, at(1));
        let c = set(
            &c,
            Wanted {
                type_: "Draining",
                status: true,
                reason: "WaitingForPods",
                message: String::new(),
            },
            None,
            at(2),
        );
        let c = set(&c, ready(false, ""), None, at(3));
        let types: Vec<_> = c.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Draining", "Ready"]);
        assert_eq!(remove(&c, "Draining").len(), 1);
    }
}
