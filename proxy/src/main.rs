#![forbid(unsafe_code)]
//! `token-sidecar` binary.

fn main() {
    std::process::exit(token_sidecar::cli::main());
}
