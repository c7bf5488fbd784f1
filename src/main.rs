use std::process::ExitCode;

use clap::Parser;
use kiln::cli::{Cli, Command, exit_code};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = kiln::logging::init(cli.log_format, &cli.log) {
        eprintln!("kiln: {e}");
        return ExitCode::from(2);
    }
    let workspace = cli.workspace_dir();
    let result = match cli.command {
        Command::Predict(args) => kiln::cli::predict::run(args),
        Command::Inspect(args) => kiln::cli::inspect::run(args),
        Command::Serve(args) => kiln::cli::serve::run(*args, workspace),
        Command::Model(cmd) => kiln::cli::model::run(workspace, cmd),
        Command::Workspace(cmd) => kiln::cli::workspace::run(workspace, cmd),
        Command::Image(cmd) => kiln::cli::image::run(workspace, cmd),
        Command::Fpga(cmd) => kiln::cli::fpga::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the whole cause chain, no backtrace.
            let msg = e.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ");
            eprintln!("kiln: error: {msg}");
            ExitCode::from(exit_code(&e))
        }
    }
}
