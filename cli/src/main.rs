//! `msctl`: parses the command line and runs it (see the library for what each command does).

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = msctl::Cli::parse();
    // A follower stopped with Ctrl-C has done what it was asked.
    let outcome = tokio::select! {
        outcome = msctl::run(cli) => outcome,
        _ = tokio::signal::ctrl_c() => Ok(()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("msctl: {err}");
            ExitCode::FAILURE
        }
    }
}
