//! `stagely-operator`: parses its configuration and runs [`stagely_operator::run`].

use clap::Parser;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = stagely_operator::Config::parse();
    stagely_api::ops::init_logging(config.log_format);
    stagely_operator::run(config).await?;
    Ok(())
}
