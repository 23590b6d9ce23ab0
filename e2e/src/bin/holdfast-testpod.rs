//! `holdfast-testpod`: a tiny pod program for the Kubernetes harness tests,
//! so they do not depend on the real Holdfast binaries.
//!
//! - `serve --listen ADDR --data DIR [--linger-ms N] [--check-api]`: answers
//!   `GET /readyz` with 200; appends a line to `DIR/starts` on every start;
//!   with `--check-api`, reads its own Pod through the in-cluster config
//!   (standard ServiceAccount token path, `KUBERNETES_SERVICE_HOST/PORT`) and
//!   writes the pod's uid to `DIR/api-ok`. On SIGTERM it writes the time (ms
//!   since the epoch) to `DIR/sigterm`, then keeps writing the time to
//!   `DIR/alive` every 100 ms for `--linger-ms` (default 0) and exits 0.
//! - `exit --code N [--data DIR]`: writes `DIR/ran` and exits with `N`.
//! - `dump --out DIR [--read PATH]...`: writes its environment to `DIR/env`
//!   (`KEY=VALUE` lines, sorted) and, for each `--read`, `PATH=<contents>` to
//!   `DIR/read`, then exits 0.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            let prefix = format!("{name}=");
            args.iter()
                .find_map(|a| a.strip_prefix(&prefix).map(String::from))
        })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args).await,
        Some("exit") => {
            let code: i32 = flag(&args, "--code")
                .unwrap_or_default()
                .parse()
                .unwrap_or(0);
            if let Some(dir) = flag(&args, "--data") {
                std::fs::create_dir_all(&dir)?;
                std::fs::write(Path::new(&dir).join("ran"), now_ms().to_string())?;
            }
            std::process::exit(code);
        }
        Some("dump") => {
            let out = PathBuf::from(flag(&args, "--out").context("--out is required")?);
            std::fs::create_dir_all(&out)?;
            let mut env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
            env.sort();
            std::fs::write(out.join("env"), env.join("\n") + "\n")?;
            let mut read = String::new();
            for (i, arg) in args.iter().enumerate() {
                if arg == "--read"
                    && let Some(path) = args.get(i + 1)
                {
                    let text =
                        std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
                    read.push_str(&format!("{path}={}\n", text.trim()));
                }
            }
            std::fs::write(out.join("read"), read)?;
            Ok(())
        }
        _ => bail!(
            "usage: holdfast-testpod serve --listen ADDR --data DIR | exit --code N | dump --out DIR"
        ),
    }
}

async fn serve(args: &[String]) -> anyhow::Result<()> {
    let listen = flag(args, "--listen").context("--listen is required")?;
    let data = PathBuf::from(flag(args, "--data").context("--data is required")?);
    let linger = Duration::from_millis(
        flag(args, "--linger-ms")
            .unwrap_or_default()
            .parse()
            .unwrap_or(0),
    );
    std::fs::create_dir_all(&data)?;
    let mut starts = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("starts"))?;
    std::io::Write::write_all(&mut starts, format!("{}\n", now_ms()).as_bytes())?;

    if args.iter().any(|a| a == "--check-api") {
        let client = kube::Client::try_default()
            .await
            .context("in-cluster config")?;
        let ns = std::env::var("POD_NAMESPACE").context("POD_NAMESPACE")?;
        let name = std::env::var("POD_NAME").context("POD_NAME")?;
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, &ns);
        let pod = pods.get(&name).await.context("get own pod")?;
        std::fs::write(data.join("api-ok"), pod.metadata.uid.unwrap_or_default())?;
    }

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    eprintln!("holdfast-testpod: listening on {listen}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((mut stream, _)) = accepted {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        let head = String::from_utf8_lossy(&buf[..n]);
                        let ok = head.starts_with("GET /readyz") || head.starts_with("GET /healthz");
                        let response = if ok {
                            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                        } else {
                            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        };
                        let _ = stream.write_all(response.as_bytes()).await;
                    });
                }
            }
            _ = term.recv() => break,
        }
    }
    eprintln!("holdfast-testpod: SIGTERM");
    std::fs::write(data.join("sigterm"), now_ms().to_string())?;
    let until = tokio::time::Instant::now() + linger;
    while tokio::time::Instant::now() < until {
        // Atomic replace: a SIGKILL between truncate and write must not
        // leave an empty file.
        std::fs::write(data.join("alive.tmp"), now_ms().to_string())?;
        std::fs::rename(data.join("alive.tmp"), data.join("alive"))?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
