use clap::Parser;

fn main() {
    let cli = bitsync::cli::Cli::parse();
    let default = if matches!(cli.command, bitsync::cli::Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = bitsync::cli::run(&cli) {
        eprintln!("bitsync: {e}");
        std::process::exit(e.exit_code());
    }
}
