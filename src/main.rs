use clap::Parser;

fn main() {
    let cli = bitsync::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if let Err(e) = bitsync::cli::run_sync(&cli) {
        eprintln!("bitsync: {e}");
        std::process::exit(e.exit_code());
    }
}
