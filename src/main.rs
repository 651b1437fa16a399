//! The `fuselab` binary: parses the command line, dispatches, prints the error chain, picks the exit code.

mod cli;
mod commands;

use clap::Parser;

use cli::{Cli, Command};

fn main() {
    // Rust ignores SIGPIPE, so `fuselab fsck | head -1` made println! panic on the closed pipe.
    // Restore the Unix default: a reader that stops reading ends the writer quietly. Every command
    // prints its results after its work is done, so the signal never interrupts a store mutation.
    // SAFETY: setting a signal disposition before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    fuselab::util::tune_allocator(!matches!(
        cli.command,
        Command::Construct(_) | Command::Data(_)
    ));
    let store = cli.store.as_path();
    let result = match &cli.command {
        Command::Run(a) => commands::run(store, a),
        Command::Plan(a) => commands::plan(store, a),
        Command::List(a) => commands::list(store, a),
        Command::Show(a) => commands::show(store, a),
        Command::Lineage(a) => commands::lineage(store, a),
        Command::Verify(a) => commands::verify(store, a),
        Command::Diff(a) => commands::diff(store, a),
        Command::Gc(a) => commands::gc(store, a),
        Command::Fsck(a) => commands::fsck(store, a),
        Command::ExecStep(a) => commands::exec_step(store, a),
        Command::ExecNode(a) => commands::exec_node(store, a),
        Command::Cancel(a) => commands::cancel(store, a),
        Command::Push(a) => commands::push(store, a),
        Command::Pull(a) => commands::pull(store, a),
        Command::Store(c) => commands::store(store, c),
        Command::Model(c) => commands::model(c),
        Command::Train(c) => commands::train(c),
        Command::Annotate(c) => commands::annotate(c),
        Command::Data(c) => commands::data(c),
        Command::Construct(a) => commands::construct(a),
        Command::Sample(a) => commands::sample(store, a),
        Command::Eval(a) => commands::eval(store, a),
        Command::Compare(a) => commands::compare(store, a),
        Command::Report(a) => commands::report(store, a),
        Command::Synth(a) => commands::synth(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::exit(1);
        }
    }
}
