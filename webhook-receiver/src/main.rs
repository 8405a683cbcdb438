//! `stagely-webhook-receiver`: parses its configuration and runs [`stagely_webhook_receiver::run`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = stagely_webhook_receiver::Config::parse();
    stagely_api::ops::init_logging(config.log_format);
    stagely_webhook_receiver::run(config).await?;
    Ok(())
}
