use clap::Parser;
use holdfast_capture::app;
use holdfast_capture::config::{Cli, Command, LogFormat};

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: logs written to a file or a pipe stay plain.
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
async fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result: anyhow::Result<()> = async {
        match cli.command {
            Command::Serve(args) => app::serve(args.validate()?).await?,
            Command::Flush(args) => {
                let kafka = args.kafka.validate()?;
                let stats = app::flush(args, kafka).await?;
                println!("{}", app::render_stats(&stats));
            }
            Command::DeadLetters(cmd) => {
                print!("{}", holdfast_capture::dead_letters::run(cmd).await?)
            }
            Command::Openapi => print!("{}", holdfast_capture::http::openapi::document_json()),
            Command::Inspect(args) => {
                let stats = app::inspect(&args)?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&stats)?);
                } else {
                    print!("{}", app::render_stats(&stats));
                }
            }
        }
        Ok(())
    }
    .await;
    // Exit here rather than wait for the runtime to wind down blocking work:
    // everything that must be durable was committed before this point.
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "exiting");
            eprintln!("holdfast-capture: {e:#}");
            std::process::exit(1)
        }
    }
}
