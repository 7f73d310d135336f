//! `idemkv`: the operator CLI for an idemkv data directory.
//!
//! ```sh
//! cargo run --release --features cli --bin idemkv -- verify DIR
//! ```
//!
//! Commands: `stats` (records by state, segments, live and dead bytes,
//! counters; `--json` for one JSON object), `verify` (a read-only check of
//! every record), `get` (one record and its body), `dump` (every live record
//! as JSON lines), `compact` (a full sweep and compaction), `backup` (a
//! copy that opens as is) and `salvage` (keep every valid record of a
//! damaged directory, quarantine the damaged bytes). `get`, `dump` and
//! `compact` take `--key-file` for a store whose bodies are sealed
//! (feature `encryption`).
//!
//! # Output conventions
//! - JSON is written by hand (no serde). A byte string that is valid UTF-8
//!   is a JSON string, escaped per RFC 8259 (`\"`, `\\`, `\n`, `\r`, `\t`,
//!   `\b`, `\f`, other control characters as `\u00XX`). A byte string that
//!   is not valid UTF-8 is written as lowercase hex under the field name
//!   with `_hex` appended (`user_hex`, `key_hex`, `body_hex`), never as a
//!   lossy string.
//! - `dump` writes `"derived":true` for a record whose key the HTTP layer
//!   derived for a request that carried none (its key starts with
//!   `derived:`; no client key is stored so), `false` for the others; `get`
//!   says so after the key.
//! - Deadlines are milliseconds since the Unix epoch; the text output adds
//!   the UTC time (`2100-01-01T00:00:30.000Z`).
//! - Errors are one line on stderr; the exit codes are in [`LONG_ABOUT`].

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing))]

use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idemkv::{CorruptKind, Engine, Error, Options, RecordState};

#[cfg(feature = "cluster")]
mod import;
mod keys;
mod render;
mod salvage;
use render::*;

/// Success.
const EXIT_OK: u8 = 0;
/// Any error other than corruption: a missing or locked directory, I/O, a
/// rejected argument.
const EXIT_ERROR: u8 = 1;
/// The log holds damaged bytes (not a torn tail).
const EXIT_CORRUPT: u8 = 2;
/// `get`: no live record for the user and key.
const EXIT_NOT_FOUND: u8 = 3;
/// The command line did not parse (sysexits' `EX_USAGE`).
const EXIT_USAGE: u8 = 64;

/// The `--help` text: what the commands touch, and the exit codes.
const LONG_ABOUT: &str = "\
Inspect and maintain an idemkv data directory.

Every command except `verify` and `salvage` opens the directory as an
engine (no background thread, Durability::Sync). Like any open, this cuts
off a torn tail left by a crash, and it fails if a running engine holds the
directory. These commands and `salvage` refuse a directory that holds no
segment file (*.log), so a mistyped path is never turned into a new data
directory.
`verify` only reads (it holds the directory lock while it does).

`salvage` is for a directory that the other commands refuse as corrupt: it
keeps every record whose checksum is valid, in its own segment file and
order, moves each damaged byte range to a file beside the data
(NNNNNN.log.OFFSET.quarantine), and prints what it kept and dropped. It is
offline (it refuses a directory a running engine holds) and safe to
interrupt: a directory it was interrupted in is refused by every other
command until `salvage` runs again and finishes.

JSON output (`stats --json`, `dump`) is written by hand: byte strings that
are valid UTF-8 are JSON strings; others are lowercase hex under a field
name ending in `_hex` (`user_hex`, `key_hex`, `body_hex`).

KEY FILES (--key-file PATH, for get, dump and compact): the keys of a
store whose bodies are sealed (Options::encryption; a build with the
`encryption` feature). One key a line: its id in decimal, whitespace, and
its 32 bytes as 64 hex digits. The first key line is the current key
(compact seals with it); the others only open what they sealed. Blank
lines and lines starting with # are ignored. Keep the file readable by
the service's user only. verify, stats and backup never need keys.

Exit codes:
  0   success (verify: no corruption; a torn tail is reported, but it is
      not corruption; salvage: the directory opens now, whatever was
      dropped, or had nothing to salvage)
  1   error: no such directory, directory locked by a running engine, I/O
      error, rejected user id or key, a bad key file, no key for a sealed
      body, an interrupted salvage to finish
  2   corruption: damaged bytes in the log; stderr names the file and
      offset (`corrupt: <file> at offset <n>: <kind>`); also a sealed body
      that fails authentication (altered, or a wrong key under its id);
      salvage: a segment file of a newer format, or a damaged salvage
      manifest (nothing done)
  3   get: no live record for that user and key
  64  the command line did not parse";

/// The operator CLI for an idemkv data directory.
#[derive(Debug, Parser)]
#[command(name = "idemkv", version, about, long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Records by state, segments, live and dead bytes, and the counters.
    Stats {
        /// The data directory.
        dir: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every record's checksum and layout without changing anything.
    ///
    /// Exit 0 if healthy (a torn tail is reported, but is not corruption),
    /// 2 on corruption (stderr names the file and offset), 1 on other errors.
    Verify {
        /// The data directory.
        dir: PathBuf,
    },
    /// Show one record: state, token, deadlines, status and body.
    ///
    /// The body is printed as is if it is UTF-8, else as hex. Exit 3 if
    /// there is no live record for the user and key.
    Get {
        /// The data directory.
        dir: PathBuf,
        /// The user id (the key's scope; may be empty).
        user: OsString,
        /// The idempotency key.
        key: OsString,
        /// The keys that open sealed bodies (see KEY FILES in --help).
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
    },
    /// Print every live record as one JSON object per line (in no
    /// particular order).
    ///
    /// `"derived":true` marks a record whose key the HTTP layer derived
    /// (`derived:` and a hash) for a request that carried no key.
    Dump {
        /// The data directory.
        dir: PathBuf,
        /// Only the records of this user id.
        #[arg(long)]
        user: Option<OsString>,
        /// The keys that open sealed bodies (see KEY FILES in --help).
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
    },
    /// Sweep expired records and rewrite every segment holding dead ones.
    ///
    /// With --key-file, every record kept is sealed under the file's
    /// current key (plaintext ones, and ones under older keys, which the
    /// file must hold): this completes a key rotation. Without it, sealed
    /// records are copied as they are.
    Compact {
        /// The data directory.
        dir: PathBuf,
        /// The keys to seal with (the first) and to open with (all; see KEY
        /// FILES in --help).
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
    },
    /// Copy the store to DEST (a new or empty directory) that opens as is.
    ///
    /// Offline: refuses a directory a running engine holds. A running
    /// service backs itself up with `Engine::backup_to` (an admin route).
    Backup {
        /// The data directory.
        dir: PathBuf,
        /// Where the copy goes: must not exist yet, or be empty.
        dest: PathBuf,
    },
    /// Keep every valid record of a damaged directory; quarantine the rest.
    ///
    /// Every record whose checksum is valid stays in its own segment file
    /// and order; each damaged byte range goes to
    /// DIR/NNNNNN.log.OFFSET.quarantine, as it was. Prints what was kept and
    /// dropped, and the keys affected where they can be read. Offline:
    /// refuses a directory a running engine holds. Safe to interrupt: run
    /// it again to finish.
    Salvage {
        /// The data directory.
        dir: PathBuf,
    },
    /// Copy every live completed record into a cluster (cargo features
    /// `cli,cluster`).
    ///
    /// Opens DIR as an engine (stop the service that writes it first: its
    /// leases do not carry over), joins the cluster as a client-only member
    /// (it serves no partition, so no partition moves), and writes each
    /// completed record into its user's partition with its fingerprint,
    /// status, body and remaining lifetime. Records in progress are counted
    /// and left out. Safe to run again: a record the cluster already holds
    /// is counted, not written twice. Exit 1 if a call fails (what was
    /// imported stays imported; run it again).
    #[cfg(feature = "cluster")]
    ImportToCluster {
        /// The data directory of the single-node store.
        dir: PathBuf,
        /// NATS server URLs of the cluster, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        nats: Vec<String>,
        /// The cluster's name (`ClusterOptions::name`).
        #[arg(long, default_value = "idemkv")]
        name: String,
        /// The cluster's number of partitions (`ClusterOptions::partitions`).
        #[arg(long, default_value_t = 16)]
        partitions: u32,
        /// Records written at a time.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// The keys that open sealed bodies (see KEY FILES in --help).
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
    },
}

/// Why a command failed; each kind has its own exit code.
#[derive(Debug)]
enum Failure {
    /// Exit 1 with this message.
    Error(String),
    /// Exit 2: damage in the log.
    Corrupt {
        file: PathBuf,
        offset: u64,
        kind: CorruptKind,
    },
    /// Exit 3 with this message.
    NotFound(String),
}

impl From<Error> for Failure {
    fn from(err: Error) -> Failure {
        match err {
            Error::Corrupt { file, offset, kind } => Failure::Corrupt { file, offset, kind },
            Error::Locked { dir } => {
                Failure::Error(format!("{} is locked by a running engine", dir.display()))
            }
            missing @ Error::MissingKey { .. } => {
                Failure::Error(format!("{missing} (give --key-file with that key)"))
            }
            Error::SalvagePending { dir } => Failure::Error(format!(
                "an interrupted salvage of {} is pending; run `idemkv salvage {}` to finish it",
                dir.display(),
                dir.display()
            )),
            other => Failure::Error(with_sources(&other)),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Failure {
        Failure::Error(format!("cannot write the output: {err}"))
    }
}

impl Failure {
    /// Prints the one-line message on stderr and gives the exit code.
    fn report(self) -> ExitCode {
        let (code, line) = match self {
            Failure::Error(msg) => (EXIT_ERROR, format!("error: {msg}")),
            Failure::Corrupt { file, offset, kind } => {
                let file = if file.as_os_str().is_empty() {
                    "<unknown file>".to_owned()
                } else {
                    file.display().to_string()
                };
                (
                    EXIT_CORRUPT,
                    format!("corrupt: {file} at offset {offset}: {kind}"),
                )
            }
            Failure::NotFound(msg) => (EXIT_NOT_FOUND, format!("not found: {msg}")),
        };
        // Nothing more to do if stderr itself is gone.
        let _ = writeln!(io::stderr().lock(), "{line}");
        ExitCode::from(code)
    }
}

/// An error and its sources on one line: `a: b: c`.
fn with_sources(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `--help` and `--version` are not errors.
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let result = run(cli.command, &mut out).and_then(|()| out.flush().map_err(Failure::from));
    match result {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(failure) => {
            // Whatever was printed before the failure goes out first.
            let _ = out.flush();
            failure.report()
        }
    }
}

fn run(command: Command, out: &mut impl Write) -> Result<(), Failure> {
    match command {
        Command::Stats { dir, json } => {
            let engine = open(&dir, None)?;
            let inspection = engine.inspect();
            let stats = engine.stats();
            engine.close()?;
            if json {
                stats_json(out, &dir, &inspection, &stats)
            } else {
                stats_text(out, &dir, &inspection, &stats)
            }
        }
        Command::Verify { dir } => {
            require_dir(&dir)?;
            let report = idemkv::verify(&dir)?;
            verify_text(out, &dir, &report)
        }
        Command::Get {
            dir,
            user,
            key,
            key_file,
        } => {
            let engine = open(&dir, key_file.as_deref())?;
            let (user, key) = (user.as_encoded_bytes(), key.as_encoded_bytes());
            let view = engine.get(user, key)?;
            let body = match view {
                Some(v) if v.state == RecordState::Completed => {
                    engine.outcome(user, key)?.map(|o| o.body)
                }
                _ => None,
            };
            engine.close()?;
            let Some(view) = view else {
                return Err(Failure::NotFound(format!(
                    "no live record for user {} and key {}",
                    text_or_hex(user),
                    text_or_hex(key)
                )));
            };
            get_text(out, user, key, &view, body.as_deref())
        }
        Command::Dump {
            dir,
            user,
            key_file,
        } => {
            let engine = open(&dir, key_file.as_deref())?;
            let mut written: io::Result<()> = Ok(());
            engine.for_each_record(user.as_deref().map(OsStr::as_encoded_bytes), |record| {
                if written.is_ok() {
                    written = writeln!(out, "{}", dump_line(record));
                }
            })?;
            engine.close()?;
            Ok(written?)
        }
        Command::Compact { dir, key_file } => {
            let engine = open(&dir, key_file.as_deref())?;
            let report = engine.compact()?;
            engine.close()?;
            compact_text(out, &dir, &report)
        }
        Command::Backup { dir, dest } => {
            let engine = open(&dir, None)?;
            let report = engine.backup_to(&dest)?;
            engine.close()?;
            writeln!(
                out,
                "backed up {} to {}: {} segment files, {} bytes, in {} ms",
                dir.display(),
                report.path.display(),
                report.segments,
                report.bytes,
                report.duration.as_millis()
            )?;
            Ok(())
        }
        Command::Salvage { dir } => {
            require_data(&dir)?;
            let report = idemkv::salvage(&dir)?;
            salvage::salvage_text(out, &dir, &report)
        }
        #[cfg(feature = "cluster")]
        Command::ImportToCluster {
            dir,
            nats,
            name,
            partitions,
            concurrency,
            key_file,
        } => {
            let engine = std::sync::Arc::new(open(&dir, key_file.as_deref())?);
            let report = import::import(&engine, nats, name, partitions, concurrency);
            engine.close()?;
            import::import_text(out, &report?)
        }
    }
}

/// Fails unless `dir` is an existing directory.
fn require_dir(dir: &Path) -> Result<(), Failure> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(Failure::Error(format!(
            "{} is not a directory",
            dir.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Failure::Error(format!(
            "no data directory at {}",
            dir.display()
        ))),
        Err(e) => Err(Failure::Error(format!(
            "cannot open {}: {e}",
            dir.display()
        ))),
    }
}

/// Fails unless `dir` is an existing directory holding a segment file.
fn require_data(dir: &Path) -> Result<(), Failure> {
    require_dir(dir)?;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Failure::Error(format!("cannot list {}: {e}", dir.display())))?;
    let mut has_segment = false;
    for entry in entries {
        let entry =
            entry.map_err(|e| Failure::Error(format!("cannot list {}: {e}", dir.display())))?;
        if entry.file_name().as_encoded_bytes().ends_with(b".log") {
            has_segment = true;
            break;
        }
    }
    if !has_segment {
        return Err(Failure::Error(format!(
            "no idemkv data in {} (no segment file *.log)",
            dir.display()
        )));
    }
    Ok(())
}

/// Opens the engine on an existing data directory, with the keys of
/// `key_file` if given. Checks first, because `Engine::open` creates a
/// missing directory and an empty log.
fn open(dir: &Path, key_file: Option<&Path>) -> Result<Engine, Failure> {
    require_data(dir)?;
    let options = keys::with_keys(
        Options {
            background: false,
            ..Options::default()
        },
        key_file,
    )?;
    Ok(Engine::open(dir, options)?)
}

// ---------------------------------------------------------------- verify
