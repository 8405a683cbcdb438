//! The webhook receiver's configuration and metrics.

use clap::Parser;
use stagely_webhook_receiver::{Config, metrics};

#[test]
fn config_has_defaults_and_rejects_a_bad_address_clearly() {
    let config = Config::try_parse_from(["stagely-webhook-receiver"]).unwrap();
    assert_eq!(config.listen_addr.to_string(), "0.0.0.0:8080");
    assert_eq!(config.ops_addr.to_string(), "0.0.0.0:9090");
    assert_eq!(config.max_body_bytes, 5 * 1024 * 1024);
    let err = Config::try_parse_from(["stagely-webhook-receiver", "--ops-addr", "not-an-address"]).unwrap_err();
    assert!(err.to_string().contains("invalid value 'not-an-address' for '--ops-addr <OPS_ADDR>'"), "{err}");
    let err = Config::try_parse_from(["stagely-webhook-receiver", "--max-body-bytes", "5MiB"]).unwrap_err();
    assert!(err.to_string().contains("invalid value '5MiB' for '--max-body-bytes <MAX_BODY_BYTES>'"), "{err}");
}

#[test]
fn metrics_carry_the_binary_prefix() {
    let (registry, metrics) = metrics();
    metrics.wrote("created", std::time::Duration::from_millis(3));
    let text = registry.encode();
    assert!(
        text.contains(concat!("stagely_webhook_build_info{version=\"", env!("CARGO_PKG_VERSION"), "\"} 1")),
        "{text}"
    );
    assert!(text.contains("stagely_webhook_environment_writes_total{outcome=\"created\"} 1"), "{text}");
    assert!(text.contains("# TYPE stagely_webhook_ack_duration_seconds histogram"), "{text}");
}
