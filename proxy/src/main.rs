#![forbid(unsafe_code)]
//! `token-sidecar` binary.

/// mimalloc: Pingora allocates many short-lived objects per request; glibc malloc was 14 % of
/// a bare Pingora profile here (bench/PROFILE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(token_sidecar::cli::main());
}
