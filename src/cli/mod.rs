//! The command line: `keygate serve | check-config | gen-key | hash-key | keys …`
//! (`keys import FILE` loads existing keys in bulk).

mod import;
mod keys;
mod table;

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, KeySource};
use crate::key::{self, KeyDigest};

#[derive(Parser)]
#[command(name = "keygate", version, about = "API-key enforcement gateway")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node that the config file describes.
    Serve {
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: PathBuf,
        /// Take over the listening sockets of a running instance (send it SIGQUIT).
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file and the files it names; list every error.
    CheckConfig {
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: PathBuf,
    },
    /// Print a new key and, on a second line, its hash.
    GenKey {
        #[arg(long, default_value = key::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Read one key on stdin and print its sha256 hash.
    HashKey,
    /// Manage keys through the admin API; `keys import FILE` loads existing keys in bulk.
    Keys(keys::KeysArgs),
}

/// Runs the command line; clap itself exits with 2 on a bad command line.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, upgrade } => {
            init_logging();
            crate::server::serve(&config, upgrade)
        }
        Command::CheckConfig { config } => return check_config(&config),
        Command::GenKey { prefix } => return gen_key(&prefix),
        Command::HashKey => hash_key(),
        Command::Keys(args) => return keys::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYGATE_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn,pingora_load_balancing=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn check_config(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s) in {}", errors.0.len(), path.display());
            return ExitCode::from(1);
        }
    };
    let mut tls_errors = Vec::new();
    for listener in config.listeners.iter() {
        if let Some(tls) = &listener.tls {
            if let Err(e) = crate::proxy::tls::load_certified_key(&tls.cert, &tls.key) {
                tls_errors.push(format!("listener {}: {e}", listener.address));
            }
        }
    }
    for (name, upstream) in &config.upstreams {
        if let Some(ca) = upstream.tls.as_ref().and_then(|t| t.ca.as_deref()) {
            if let Err(e) = crate::proxy::tls::load_upstream_ca(ca) {
                tls_errors.push(format!("upstreams.{name}.tls.ca: {e}"));
            }
        }
    }
    if !tls_errors.is_empty() {
        for error in &tls_errors {
            eprintln!("{}: {error}", path.display());
        }
        eprintln!("{} error(s) in {}", tls_errors.len(), path.display());
        return ExitCode::from(1);
    }
    let mut key_count = None;
    if let (KeySource::File, Some(file)) = (config.keys.source, &config.keys.file) {
        match crate::index::load_keys_file(file, &config.plans) {
            Ok(records) => key_count = Some(records.len()),
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("{} error(s) in {}", errors.0.len(), file.display());
                return ExitCode::from(1);
            }
        }
    }
    let mut summary = format!("{}: ok (mode {}", path.display(), config.mode.as_str());
    if config.mode != config::Mode::ControlPlane {
        summary += &format!(
            ", {} listener(s), {} route(s), {} upstream(s)",
            config.listeners.len(),
            config.routes.len(),
            config.upstreams.len()
        );
    }
    if let Some(n) = key_count {
        summary += &format!(", {n} key(s)");
    }
    println!("{summary})");
    ExitCode::SUCCESS
}

fn gen_key(prefix: &str) -> ExitCode {
    match key::generate(prefix) {
        Ok(raw) => {
            // A closed pipe (`| head -1`) is the reader's choice, not an error worth a panic.
            let _ = writeln!(std::io::stdout(), "{raw}\n{}", KeyDigest::of(&raw));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: --prefix {prefix:?}: {e}");
            ExitCode::from(2)
        }
    }
}

fn hash_key() -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let raw = input.trim();
    if raw.is_empty() {
        anyhow::bail!("no key on stdin");
    }
    if raw.contains(char::is_whitespace) {
        anyhow::bail!("expected one key on stdin, found several words");
    }
    if key::parse(raw).is_err() {
        eprintln!("warning: this is not a well-formed keygate key; printing its hash anyway");
    }
    println!("{}", KeyDigest::of(raw));
    Ok(())
}
