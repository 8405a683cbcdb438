//! `stagely-agent`: parses its configuration and runs [`stagely_agent::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = stagely_agent::Config::parse();
    stagely_api::ops::init_logging(config.log_format);
    stagely_agent::run(config).await?;
    Ok(())
}
