//! `holdfast-operator`: parse the command line, then `crd` or `run` (see the library docs).

use std::process::ExitCode;

use clap::Parser;
use holdfast_operator::config::{Cli, Command, LogFormat};

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Crd => {
            print!("{}", holdfast_operator::crd_yaml());
            Ok(())
        }
        Command::Run(args) => {
            init_logging(cli.log_format);
            holdfast_operator::app::run(args).await.map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "exiting");
            eprintln!("holdfast-operator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
