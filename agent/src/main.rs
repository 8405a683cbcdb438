//! `stagely-agent`: parses its configuration and runs [`stagely_agent::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = stagely_agent::Cli::parse();
    stagely_api::ops::init_logging(cli.log_format);
    if cli.teardown {
        stagely_agent::teardown(cli).await?;
    } else {
        stagely_agent::run(cli).await?;
    }
    Ok(())
}
