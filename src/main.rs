//! The `botflow` binary: parse the command line, load the configuration, dispatch.

use botflow::cli::{bootstrap, serve, Cli, Command};
use botflow::config::Config;
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve | Command::Bench(_) | Command::Send(_)) {
        // A command whose output goes into `head` ends quietly when the reader leaves,
        // as other Unix tools do, instead of panicking on the closed pipe. Not the
        // daemon, the bench or `send`: they write to sockets, where a peer that left is
        // an error to report, not a signal to die of.
        // SAFETY: restores the default disposition of one signal, before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve => serve::serve(config),
        Command::Migrate => serve::migrate(config),
        Command::CheckConfig => serve::check_config(config),
        Command::Accounts(cmd) => bootstrap::accounts(config, cmd),
        Command::Keys(cmd) => bootstrap::keys(config, cmd),
        Command::Chatbots(cmd) => bootstrap::chatbots(config, cmd),
        Command::Workflows(cmd) => botflow::cli::workflows::run(config, cmd),
        Command::Executions(cmd) => botflow::cli::executions::run(config, cmd),
        Command::Analytics(args) => botflow::cli::analytics::run(config, args),
        Command::Dlq(cmd) => botflow::cli::dlq::run(config, cmd),
        Command::Limits(cmd) => botflow::cli::limits::run(config, cmd),
        Command::Audit(args) => botflow::cli::lifecycle::audit(config, args),
        Command::Send(args) => match botflow::cli::send::run(config, args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Bench(args) => botflow::cli::bench::run(config, args),
        Command::Prune { dry_run } => bootstrap::prune(config, dry_run),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "botflow", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut std::io::stdout())
            .map_err(anyhow::Error::from),
        Command::Openapi => botflow::admin::openapi()
            .to_pretty_json()
            .map(|doc| println!("{doc}"))
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
