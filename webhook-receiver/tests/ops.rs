//! The webhook receiver's configuration and metrics.

use clap::Parser;
use stagely_webhook_receiver::{Config, metrics};

#[test]
fn config_has_defaults_and_rejects_a_bad_address_clearly() {
    let config = Config::try_parse_from(["stagely-webhook-receiver"]).unwrap();
    assert_eq!(config.ops_addr.to_string(), "0.0.0.0:9090");
    let err = Config::try_parse_from(["stagely-webhook-receiver", "--ops-addr", "not-an-address"]).unwrap_err();
    assert!(err.to_string().contains("invalid value 'not-an-address' for '--ops-addr <OPS_ADDR>'"), "{err}");
}

#[test]
fn metrics_carry_the_binary_prefix() {
    let text = metrics().encode();
    assert!(
        text.contains(concat!("stagely_webhook_build_info{version=\"", env!("CARGO_PKG_VERSION"), "\"} 1")),
        "{text}"
    );
}
