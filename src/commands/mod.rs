//! One function per subcommand. They print; the library computes.

mod annotate;
mod data;
mod eval;
mod inspect;
mod model;
mod run;
mod store;
mod train;

pub use annotate::annotate;
pub use data::{construct, data, sample};
pub use eval::{compare, eval, report, synth};
pub use inspect::{diff, lineage, list, show};
pub use model::model;
pub use run::{cancel, exec_node, exec_step, plan, run, verify};
pub use store::{fsck, gc, pull, push, store};
pub use train::train;

use std::path::PathBuf;

use anyhow::Context;
use fuselab::store::Store;
use indicatif::{MultiProgress, ProgressDrawTarget};

/// Exit status of a command that ran to completion: 0, or 1 when a check found problems.
pub type Status = anyhow::Result<i32>;

/// Open an existing store (every command but `run` and `store add`).
pub fn open_store(path: &std::path::Path) -> anyhow::Result<Store> {
    Store::open(path).with_context(|| format!("opening the store at {}", path.display()))
}

/// Open the store, creating it in a missing or empty directory (`run`, `store add`).
pub fn create_store(path: &std::path::Path) -> anyhow::Result<Store> {
    Store::open_or_create(path).with_context(|| format!("opening the store at {}", path.display()))
}

/// Progress bars on stderr, drawn only when it is a terminal.
pub fn progress() -> MultiProgress {
    MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
}

pub fn project_dir() -> anyhow::Result<PathBuf> {
    std::env::current_dir().context("reading the current directory")
}

pub fn print_json(v: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("output serialises")
    );
}

/// `--var name=value` pairs as a JSON object of chat-template variables.
pub fn template_vars(list: &[String]) -> anyhow::Result<serde_json::Value> {
    let mut m = serde_json::Map::new();
    for v in list {
        let (k, val) = v
            .split_once('=')
            .with_context(|| format!("--var {v}: expected NAME=VALUE"))?;
        m.insert(k.to_string(), serde_json::Value::String(val.to_string()));
    }
    Ok(serde_json::Value::Object(m))
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}
