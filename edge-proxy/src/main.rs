//! `stagely-edge-proxy`: parses its configuration and runs [`stagely_edge_proxy::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = stagely_edge_proxy::Config::parse();
    stagely_api::ops::init_logging(config.log_format);
    stagely_edge_proxy::run(config).await?;
    Ok(())
}
