//! The `prompter` binary.

fn main() -> std::process::ExitCode {
    let code = prompter_engine::cli::main(
        std::env::args_os().collect(),
        Box::new(std::io::stdout()),
        Box::new(std::io::stderr()),
    );
    std::process::ExitCode::from(code)
}
