//! The `prompter` binary.

/// mimalloc instead of the system allocator: the engine allocates small, short-lived values on
/// every event (events, template values, outputs) from many tasks at once, which mimalloc's
/// per-thread free lists serve without contention. Only the binary sets it; embedders of
/// `prompter-engine` choose their own.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let code = prompter_cli::cli::main(
        std::env::args_os().collect(),
        Box::new(std::io::stdout()),
        Box::new(std::io::stderr()),
    );
    std::process::ExitCode::from(code)
}
