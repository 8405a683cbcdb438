//! `stagely-webhook-receiver`: parses its configuration and runs [`stagely_webhook_receiver::run`].

use clap::Parser;

// Every delivery allocates its body and parses it; glibc's malloc took a sixth of the receiver's
// CPU at its maximum rate (perf), jemalloc much less.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = stagely_webhook_receiver::Config::parse();
    stagely_api::ops::init_logging(config.log_format);
    stagely_webhook_receiver::run(config).await?;
    Ok(())
}
