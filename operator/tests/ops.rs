//! The operator's configuration and metrics.

use clap::Parser;
use stagely_operator::Config;
use stagely_operator::metrics::{BuildLabels, Metrics};

#[test]
fn config_has_defaults_and_rejects_a_bad_address_clearly() {
    let config = Config::try_parse_from(["stagely-operator"]).unwrap();
    assert_eq!(config.ops_addr.to_string(), "0.0.0.0:8080");
    let err = Config::try_parse_from(["stagely-operator", "--ops-addr", "not-an-address"]).unwrap_err();
    assert!(err.to_string().contains("invalid value 'not-an-address' for '--ops-addr <OPS_ADDR>'"), "{err}");
}

#[test]
fn the_local_provider_is_off_unless_the_flag_allows_it() {
    let config = Config::try_parse_from(["stagely-operator"]).unwrap();
    assert!(!config.clouds.endpoints().allow_local, "off by default");
    let config = Config::try_parse_from(["stagely-operator", "--allow-local-provider"]).unwrap();
    assert!(config.clouds.endpoints().allow_local);
}

#[test]
fn metrics_carry_the_binary_prefix() {
    let metrics = Metrics::default();
    metrics
        .build_duration
        .get_or_create(&BuildLabels { platform: "linux/arm64".into(), result: "succeeded".into() })
        .observe(42.0);
    metrics.reconciled("environment", "ok");
    let text = metrics.register(env!("CARGO_PKG_VERSION")).encode();
    assert!(
        text.contains(concat!("stagely_operator_build_info{version=\"", env!("CARGO_PKG_VERSION"), "\"} 1")),
        "{text}"
    );
    assert!(
        text.contains(r#"stagely_operator_build_duration_seconds_count{platform="linux/arm64",result="succeeded"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"stagely_operator_reconciles_total{controller="environment",outcome="ok"} 1"#), "{text}");
}
