//! `gc`, `fsck`, `push`, `pull` and `store add|hash|cat|checkout`.

use fuselab::recipe::records::Records;
use fuselab::store::{Ingest, Store};
use indicatif::{ProgressBar, ProgressStyle};

use super::{create_store, human_bytes, open_store, print_json, Status};
use crate::cli::{GcArgs, JsonFlag, RemoteArgs, StoreCommand};

pub fn gc(store_path: &std::path::Path, args: &GcArgs) -> Status {
    let store = open_store(store_path)?;
    // The roots are read by the library under gc's exclusive lock, never before it.
    let report = store.gc(
        |s| Ok(Records::new(s).roots()?),
        args.dry_run,
        || eprintln!("waiting for other fuselab processes using this store to finish..."),
    )?;
    for why in &report.kept_everything_because {
        eprintln!("warning: kept every object: {why}");
    }
    if args.json {
        print_json(&report);
        return Ok(0);
    }
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for (d, size) in &report.removed_objects {
        println!("{verb} {d} ({})", human_bytes(*size));
    }
    println!(
        "{verb} {} objects ({}), {} checkouts, {} temporary files; kept {} objects",
        report.removed_objects.len(),
        human_bytes(report.bytes_freed),
        report.removed_checkouts,
        report.removed_temp_files,
        report.objects_kept
    );
    Ok(0)
}

pub fn fsck(store_path: &std::path::Path, args: &JsonFlag) -> Status {
    let store = open_store(store_path)?;
    let records = Records::new(&store);
    let roots = records.roots()?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("fsck {bar:30} {pos}/{len} objects").expect("valid"),
    );
    let report = store.fsck(&roots, &bar)?;
    bar.finish_and_clear();
    if args.json {
        print_json(&serde_json::json!({"clean": report.is_clean(), "report": report}));
    } else {
        for c in &report.corrupt {
            println!(
                "corrupt  {} at {}: content hashes to {}",
                c.digest,
                c.path.display(),
                c.actual
            );
        }
        for m in &report.missing {
            println!("missing  {} referenced by {}", m.digest, m.referenced_by);
        }
        for s in &report.stray_files {
            println!("stray    {}", s.display());
        }
        for t in &report.unreadable_trees {
            println!(
                "tree     {} referenced by {} cannot be read ({}): its files are unchecked",
                t.digest, t.referenced_by, t.reason
            );
        }
        for u in &report.unreadable_records {
            println!("record   {} cannot be read: {}", u.path.display(), u.reason);
        }
        for c in &report.damaged_checkouts {
            println!(
                "checkout {} is damaged: {} (rebuilt on next use; gc removes it)",
                c.path.display(),
                c.reason
            );
        }
        for o in &report.orphaned {
            println!("orphaned {o} (nothing references it; `fuselab gc` removes it)");
        }
        println!(
            "checked {} objects ({}): {} corrupt, {} missing, {} orphaned, {} temporary files; {}",
            report.objects_checked,
            human_bytes(report.bytes_checked),
            report.corrupt.len(),
            report.missing.len(),
            report.orphaned.len(),
            report.temp_files,
            if report.is_clean() {
                "clean"
            } else {
                "NOT CLEAN"
            }
        );
    }
    Ok(if report.is_clean() { 0 } else { 1 })
}

pub fn store(store_path: &std::path::Path, cmd: &StoreCommand) -> Status {
    match cmd {
        StoreCommand::Hash { path } => {
            let a = Store::digest_path(path)?;
            println!("{}  {}", a.digest, path.display());
        }
        StoreCommand::Add {
            path,
            link,
            pin,
            json,
        } => {
            let store = create_store(store_path)?;
            let _lock = store.lock_shared()?;
            let ingest = if *link { Ingest::Link } else { Ingest::Copy };
            let a = store.put_path_with(path, ingest)?;
            if let Some(name) = pin {
                store.set_ref(
                    &name.under("pins"),
                    [(path.display().to_string(), a.clone())]
                        .into_iter()
                        .collect(),
                )?;
            }
            if *json {
                print_json(&a);
            } else {
                println!("{}  {}", a.digest, path.display());
            }
        }
        StoreCommand::Cat { digest } => {
            let store = open_store(store_path)?;
            let d = store.resolve_prefix(digest)?;
            store.cat(&d, &mut std::io::stdout().lock())?;
        }
        StoreCommand::Checkout { digest, dest, mode } => {
            let store = open_store(store_path)?;
            let d = store.resolve_prefix(digest)?;
            let artifact = store.artifact_of(&d)?;
            store.checkout(&artifact, dest, (*mode).into())?;
            eprintln!("checked out {} at {}", d.short(), dest.display());
        }
    }
    Ok(0)
}

fn transfer_bar(what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} objects {{elapsed}}"
        ))
        .expect("valid template"),
    );
    bar
}

fn print_sync(
    verb: &str,
    remote: &fuselab::remote::RemoteUrl,
    r: &fuselab::remote::SyncReport,
    json: bool,
) {
    if json {
        print_json(r);
    } else {
        println!(
            "{verb} {remote}: {} objects sent, {} received ({}; {} multipart), {} already there, {} records",
            r.objects_sent,
            r.objects_received,
            human_bytes(r.bytes),
            r.multipart_uploads,
            r.objects_already_there,
            r.records
        );
    }
}

pub fn push(store_path: &std::path::Path, args: &RemoteArgs) -> Status {
    let store = open_store(store_path)?;
    let remote = fuselab::remote::Remote::open(&args.remote, args.options())?;
    let bar = transfer_bar("push");
    let report = remote.push(&store, &bar)?;
    bar.finish_and_clear();
    print_sync("pushed to", &args.remote, &report, args.json);
    Ok(0)
}

pub fn pull(store_path: &std::path::Path, args: &RemoteArgs) -> Status {
    let store = create_store(store_path)?;
    let remote = fuselab::remote::Remote::open(&args.remote, args.options())?;
    let bar = transfer_bar("pull");
    let report = remote.pull(&store, &bar)?;
    bar.finish_and_clear();
    print_sync("pulled from", &args.remote, &report, args.json);
    Ok(0)
}
