use clap::Parser;
use shardgate::config::{Cli, Command, Config};

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => Config::from_args(args).and_then(shardgate::shard::run),
    };
    if let Err(message) = result {
        eprintln!("shardgate: {message}");
        std::process::exit(2);
    }
}
