use clap::Parser;
use shardgate::chat::auth::{Authenticator, TokenRules};
use shardgate::config::{default_data_dir, Cli, Command, Config};

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
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Serve(args) => Config::from_args(args)
            .map_err(Into::into)
            .and_then(|config| shardgate::shard::run(config).map_err(Into::into)),
        Command::Token(args) => {
            let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
            let rules = TokenRules {
                audience: args.token_audience,
                issuer: args.token_issuer,
                max_lifetime: None,
            };
            Authenticator::load(args.auth_secret_file.as_deref(), &data_dir, rules)
                .and_then(|auth| {
                    let rooms = (!args.rooms.is_empty()).then_some(args.rooms);
                    auth.mint_with(&args.user, args.ttl, rooms, args.admin)
                })
                .map(|token| println!("{token}"))
                .map_err(Into::into)
        }
    };
    if let Err(message) = result {
        eprintln!("shardgate: {message}");
        std::process::exit(2);
    }
}
