//! Status conditions as every controller writes them, and a short stable hash for names.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Sets the condition `type_` in `conditions`: its last transition time moves only when its
/// status flips.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" };
    let last_transition_time = match conditions.iter().find(|c| c.type_ == type_) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time,
        observed_generation: generation,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => *existing = condition,
        None => conditions.push(condition),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let t1 = Timestamp::from_second(1_000).unwrap();
        let t2 = Timestamp::from_second(2_000).unwrap();
        let mut conditions = Vec::new();
        set_condition(&mut conditions, "Ready", false, "A", "a", Some(1), t1);
        set_condition(&mut conditions, "Ready", false, "B", "b", Some(2), t2);
        assert_eq!((conditions.len(), conditions[0].reason.as_str()), (1, "B"));
        assert_eq!(conditions[0].last_transition_time, Time(t1));
        set_condition(&mut conditions, "Ready", true, "C", "c", Some(2), t2);
        assert_eq!(conditions[0].last_transition_time, Time(t2));
    }
}
