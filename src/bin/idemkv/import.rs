//! `idemkv import-to-cluster`: a single-node store's records into a cluster.

use std::io::Write;
use std::sync::Arc;

use idemkv::Engine;
use idemkv::cluster::{ClusterOptions, ImportReport, Node};

use crate::Failure;

/// Joins the cluster as a client-only member and imports `engine`'s
/// records through it.
pub fn import(
    engine: &Arc<Engine>,
    nats: Vec<String>,
    name: String,
    partitions: u32,
    concurrency: usize,
) -> Result<ImportReport, Failure> {
    let scratch = std::env::temp_dir().join(format!("idemkv-import-{}", std::process::id()));
    let mut options = ClusterOptions::new(format!("import-{}", std::process::id()), &scratch, nats);
    options.name = name;
    options.partitions = partitions;
    options.serve = false;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Error(format!("cannot start a runtime: {e}")))?;
    let result = runtime.block_on(async {
        let node = Node::start(options).await?;
        let report = node.import(Arc::clone(engine), concurrency).await;
        node.shutdown().await;
        report
    });
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(result?)
}

/// The report, one count a line.
pub fn import_text(out: &mut impl Write, report: &ImportReport) -> Result<(), Failure> {
    writeln!(out, "imported  {}", report.imported)?;
    writeln!(
        out,
        "already   {} (the cluster held them, same outcome)",
        report.already
    )?;
    writeln!(
        out,
        "conflicts {} (the cluster holds them differently; left as they are)",
        report.conflicts
    )?;
    writeln!(
        out,
        "in flight {} (in progress here; not imported)",
        report.in_flight
    )?;
    writeln!(
        out,
        "expired   {} (their lifetime ended during the import)",
        report.expired
    )?;
    Ok(())
}
