use clap::Parser;
use shardgate::chat::auth::{default_data_dir, Authenticator};
use shardgate::config::{Cli, Command, Config};

fn main() {
    // Operational messages go to stderr through `tracing` (RUST_LOG filters them; info by
    // default); stdout carries the report lines and the histogram only.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => Config::from_args(args).and_then(shardgate::shard::run),
        Command::Token(args) => {
            let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
            Authenticator::load(args.auth_secret_file.as_deref(), &data_dir)
                .and_then(|auth| auth.mint(&args.user, args.ttl))
                .map(|token| println!("{token}"))
        }
    };
    if let Err(message) = result {
        eprintln!("shardgate: {message}");
        std::process::exit(2);
    }
}
