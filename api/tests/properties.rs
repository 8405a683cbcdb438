//! Properties of the wire formats and names, checked on generated inputs: agent protocol
//! messages and route records survive JSON, Environment names are valid object names, and
//! `stagely.yaml` parsing never panics.

use proptest::prelude::*;
use stagely_api::config;
use stagely_api::names::{self, MAX_NAME};
use stagely_api::protocol::{ErrorCode, ErrorMessage, Heartbeat, Log, LogStream, Message, Terminate};
use stagely_api::route::{Route, RouteStatus};

fn log_stream() -> impl Strategy<Value = LogStream> {
    prop_oneof![Just(LogStream::Stdout), Just(LogStream::Stderr), Just(LogStream::System)]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::InvalidToken),
        Just(ErrorCode::ExpiredToken),
        Just(ErrorCode::TokenReplayed),
        Just(ErrorCode::WrongScope),
        Just(ErrorCode::BadMessage),
        Just(ErrorCode::UnknownJob),
        Just(ErrorCode::Internal),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(seq, sent_at_ms)| Message::Heartbeat(Heartbeat { seq, sent_at_ms })),
        (any::<String>(), log_stream(), any::<u64>(), any::<u64>(), any::<String>()).prop_map(
            |(job_id, stream, seq, timestamp_ms, data)| Message::Log(Log { job_id, stream, seq, timestamp_ms, data })
        ),
        (any::<String>(), any::<String>(), any::<u32>()).prop_map(|(job_id, reason, grace_period_seconds)| {
            Message::Terminate(Terminate { job_id, reason, grace_period_seconds })
        }),
        (error_code(), any::<String>(), any::<Option<String>>())
            .prop_map(|(code, message, job_id)| Message::Error(ErrorMessage { code, message, job_id })),
    ]
}

fn route_status() -> impl Strategy<Value = RouteStatus> {
    prop_oneof![
        Just(RouteStatus::Building),
        Just(RouteStatus::Deploying),
        Just(RouteStatus::Ready),
        Just(RouteStatus::Failed),
    ]
}

/// A DNS-1123 subdomain, as Kubernetes checks an object name.
fn is_dns_subdomain(name: &str) -> bool {
    let label = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !name.is_empty() && name.len() <= MAX_NAME && name.split('.').all(label)
}

proptest! {
    #[test]
    fn agent_messages_round_trip(message in message()) {
        let frame = serde_json::to_string(&message).unwrap();
        prop_assert_eq!(serde_json::from_str::<Message>(&frame).unwrap(), message);
    }

    #[test]
    fn route_records_round_trip(
        status in route_status(),
        ip in any::<Option<String>>(),
        port in any::<Option<u16>>(),
        (project, namespace, environment) in (any::<String>(), any::<String>(), any::<String>()),
        pr in any::<u64>(),
    ) {
        let route = Route { status, ip, port, project, namespace, environment, pr };
        let record = serde_json::to_string(&route).unwrap();
        prop_assert_eq!(serde_json::from_str::<Route>(&record).unwrap(), route);
    }

    /// A Project's name is an object name already; its Environments' names must be too, whatever
    /// the pull request number (`names` promises an object name, at most [`MAX_NAME`]).
    #[test]
    fn environment_names_are_object_names(
        project in "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?){0,4}",
        number in any::<i64>(),
    ) {
        let name = names::environment_name(&project, number);
        prop_assert!(is_dns_subdomain(&name), "{name:?}");
        prop_assert_eq!(name, names::environment_name(&project, number));
    }

    #[test]
    fn stagely_yaml_parsing_never_panics(yaml in any::<String>()) {
        if let Err(err) = config::parse(&yaml) {
            prop_assert!(!err.errors.is_empty() && err.errors.iter().all(|e| !e.path.is_empty()));
        }
    }

    #[test]
    fn yaml_like_text_never_panics(yaml in "([a-z]{1,8}: ?|- |  |\\? |\"\"|[{}\\[\\],:&*!|>~]|[0-9a-z ]{1,6}|\n){0,40}") {
        if let Err(err) = config::parse(&yaml) {
            prop_assert!(!err.errors.is_empty() && err.errors.iter().all(|e| !e.path.is_empty()));
        }
    }
}
