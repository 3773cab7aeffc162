//! Validate a plugin configuration file the way the filter does: `cargo run --example check_config -- FILE`.
//! Prints the one-line summary the filter logs, or the one-line error, and exits non-zero on error.
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: check_config FILE.json  (use - for standard input)");
        return ExitCode::from(2);
    };
    let bytes = if path == "-" {
        let mut buf = Vec::new();
        match std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf) {
            Ok(_) => buf,
            Err(err) => {
                eprintln!("{path}: {err}");
                return ExitCode::from(2);
            }
        }
    } else {
        match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) => {
                eprintln!("{path}: {err}");
                return ExitCode::from(2);
            }
        }
    };
    match canary_router::config::parse(&bytes) {
        Ok(config) => {
            println!("ok: {}", config.summary());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("invalid: {err}");
            ExitCode::FAILURE
        }
    }
}
