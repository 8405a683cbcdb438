//! The agent's configuration and metrics.

use clap::Parser;
use stagely_agent::{Cli, metrics};

#[test]
fn config_has_defaults_and_rejects_a_bad_address_clearly() {
    let cli = Cli::try_parse_from(["stagely-agent", "--config", "/etc/stagely/agent.json"]).unwrap();
    assert_eq!(cli.ops_addr, None);
    assert_eq!(cli.config.unwrap().to_str(), Some("/etc/stagely/agent.json"));
    let err = Cli::try_parse_from(["stagely-agent", "--ops-addr", "not-an-address"]).unwrap_err();
    assert!(err.to_string().contains("invalid value 'not-an-address' for '--ops-addr <OPS_ADDR>'"), "{err}");
}

#[test]
fn metrics_carry_the_binary_prefix() {
    let text = metrics().encode();
    assert!(
        text.contains(concat!("stagely_agent_build_info{version=\"", env!("CARGO_PKG_VERSION"), "\"} 1")),
        "{text}"
    );
}
