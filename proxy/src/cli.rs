//! The command line.

use std::path::{Path, PathBuf};

use base64::Engine;
use clap::{Parser, Subcommand};
use sidecar_config::Config;

use crate::server::{serve_with, Upgrade};

pub use crate::server::UPSTREAM_POOL;

/// An authenticating egress sidecar: point your API base URL at it and it injects, refreshes
/// and (when safe) replays bearer tokens.
#[derive(Debug, Parser)]
#[command(name = "token-sidecar", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve with a config file.
    Run {
        /// Config file.
        #[arg(short, long, env = "TOKEN_SIDECAR_CONFIG")]
        config: PathBuf,
        /// Zero-downtime upgrade: take the listening sockets over from a running sidecar, which
        /// hands them over when it gets SIGQUIT.
        #[arg(long)]
        upgrade: bool,
        /// Unix socket the listening sockets are handed over on during an upgrade.
        #[arg(long, default_value = "/tmp/token-sidecar-upgrade.sock")]
        upgrade_sock: String,
    },
    /// Validate a config file and print it resolved, secrets redacted.
    Check {
        /// Config file.
        #[arg(short, long, env = "TOKEN_SIDECAR_CONFIG")]
        config: PathBuf,
    },
    /// Start a mock identity provider and API on loopback with the sidecar in front, show what
    /// it does, then keep serving.
    Demo {
        /// Data-plane address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Admin address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin_listen: String,
        /// Exit after the scripted run instead of serving on.
        #[arg(long)]
        exit: bool,
    },
    /// Print a fresh random 32-byte key (base64) for the token store.
    Keygen,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            upgrade,
            upgrade_sock,
        } => match Config::load_with(&config, Some(crate::app::provider_check)) {
            Ok(c) => serve_with(
                c,
                None,
                Upgrade {
                    upgrade,
                    upgrade_sock,
                },
            ),
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
        Command::Demo {
            listen,
            admin_listen,
            exit,
        } => crate::demo::run(&listen, &admin_listen, exit),
        Command::Keygen => {
            let key: [u8; 32] = rand::random();
            println!("{}", base64::engine::general_purpose::STANDARD.encode(key));
            0
        }
    }
}

/// `check`: what `run` would refuse is an error (exit 1); what is allowed but looks like a
/// mistake is a warning on stderr (exit 0). Offline: nothing is resolved or connected to.
fn check(path: &Path) -> i32 {
    match Config::load_with(path, Some(crate::app::provider_check)) {
        Ok(c) => {
            print!("{}", c.redacted_yaml());
            for w in &c.warnings {
                eprintln!("{w}");
            }
            match c.warnings.len() {
                0 => eprintln!("{}: configuration is valid", path.display()),
                n => eprintln!(
                    "{}: configuration is valid, with {n} warning{}",
                    path.display(),
                    if n == 1 { "" } else { "s" }
                ),
            }
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}
