//! The comparison harness: one workload against idemkv, a sharded
//! `RwLock<HashMap>`, redb, fjall and Redis; one table.
//!
//! ```sh
//! cargo run --release --manifest-path benches/compare/Cargo.toml -- [--records N] [--threads T]
//! ```
//!
//! Each system runs in a child process of this binary (so one system's
//! memory does not flatter or burden the next one's RSS delta); the parent
//! measures the disk, collects the children's rows and prints the table.
//! See README.md beside Cargo.toml.

mod systems;
mod workload;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use systems::fjall::Fjall;
use systems::hashmap::{self as hashmap, Sharded};
use systems::idemkv::{Idemkv, get_hit};
use systems::redb::Redb;
use systems::redis::Redis;
use workload::{Res, System, Workload, replay_hit};

const USAGE: &str = "\
usage: cargo run --release --manifest-path benches/compare/Cargo.toml -- [options]
  --records N       records loaded per system, then looked up (default 1000000)
  --threads T       threads for the load and lookup phases (default: cores)
  --users U         distinct user ids the records are spread over (default 10000)
  --callers C       concurrent callers in the durable phase (default 64)
  --secs S          seconds of each lookup phase (default 3)
  --durable-secs S  seconds of each durable phase (default 3)
  --only LIST       comma-separated subset of idemkv,idemkv-async,hashmap,redb,fjall,redis,
                    idemkv-cluster1,idemkv-cluster3
  --tasks N         tasks of the async durable phase (idemkv-async; default 4096)
  --cluster-tasks N tasks of the cluster durable phases (idemkv-cluster1/3; default 256)
  --cluster-report  run only the cluster measurements (latency of one caller, failover,
                    catch-up) and print their table
  --failover-records N   records loaded before the failover (default 20000)
  --catchup-records N    records a new node catches up on (default 20000)";

const SYSTEMS: [&str; 8] = [
    "idemkv",
    "idemkv-async",
    "hashmap",
    "redb",
    "fjall",
    "redis",
    "idemkv-cluster1",
    "idemkv-cluster3",
];

#[derive(Clone)]
struct Config {
    records: usize,
    threads: usize,
    users: usize,
    callers: usize,
    secs: f64,
    durable_secs: f64,
    /// Tasks of the async durable phase.
    tasks: usize,
    /// Tasks of the cluster durable phases.
    cluster_tasks: usize,
    /// Run the cluster report instead of the table.
    cluster_report: bool,
    /// Records loaded before the failover.
    failover_records: usize,
    /// Records of the catch-up.
    catchup_records: usize,
    /// Set in a child that runs one cluster node (`VARIANT:ID:DIR:URLS`).
    node_child: Option<String>,
    only: Vec<String>,
    /// Set in a child: which system, and durable or not.
    child: Option<(String, bool)>,
}

impl Config {
    fn parse(args: &[String]) -> Result<Config, String> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut c = Config {
            records: 1_000_000,
            threads: cores,
            users: 10_000,
            callers: 64,
            secs: 3.0,
            durable_secs: 3.0,
            tasks: 4096,
            cluster_tasks: 256,
            cluster_report: false,
            failover_records: 20_000,
            catchup_records: 20_000,
            node_child: None,
            only: SYSTEMS.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "-h" || flag == "--help" {
                return Err(String::new());
            }
            if flag == "--cluster-report" {
                c.cluster_report = true;
                continue;
            }
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let num = |v: &str| -> Result<usize, String> {
                v.replace('_', "")
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("{flag}: not a positive number: {v}"))
            };
            let secs = |v: &str| -> Result<f64, String> {
                v.parse::<f64>()
                    .ok()
                    .filter(|s| *s > 0.0)
                    .ok_or_else(|| format!("{flag}: not a positive number of seconds: {v}"))
            };
            match flag.as_str() {
                "--records" => c.records = num(value)?,
                "--threads" => c.threads = num(value)?,
                "--users" => c.users = num(value)?,
                "--callers" => c.callers = num(value)?,
                "--secs" => c.secs = secs(value)?,
                "--durable-secs" => c.durable_secs = secs(value)?,
                "--tasks" => c.tasks = num(value)?,
                "--cluster-tasks" => c.cluster_tasks = num(value)?,
                "--failover-records" => c.failover_records = num(value)?,
                "--catchup-records" => c.catchup_records = num(value)?,
                "--only" => {
                    c.only = value.split(',').map(str::to_owned).collect();
                    if let Some(bad) = c.only.iter().find(|s| !SYSTEMS.contains(&s.as_str())) {
                        return Err(format!("--only: unknown system {bad}"));
                    }
                }
                "--child" if value.starts_with("cluster-node:") => {
                    c.node_child = Some(value["cluster-node:".len()..].to_owned());
                }
                "--child" => {
                    let (system, mode) = value.split_once(':').ok_or("--child SYSTEM:MODE")?;
                    c.child = Some((system.to_owned(), mode == "durable"));
                }
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        Ok(c)
    }

    /// The options as given to a child.
    fn child_args(&self, system: &str, durable: bool) -> Vec<String> {
        let mode = if durable { "durable" } else { "volatile" };
        [
            ("--records", self.records.to_string()),
            ("--threads", self.threads.to_string()),
            ("--users", self.users.to_string()),
            ("--callers", self.callers.to_string()),
            ("--secs", self.secs.to_string()),
            ("--durable-secs", self.durable_secs.to_string()),
            ("--tasks", self.tasks.to_string()),
            ("--cluster-tasks", self.cluster_tasks.to_string()),
            ("--child", format!("{system}:{mode}")),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect()
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match Config::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(if e.is_empty() { 0 } else { 64 });
        }
    };
    let result = match (&config.child, &config.node_child) {
        (_, Some(spec)) => systems::cluster::run_node_child(spec),
        (Some((system, durable)), None) => child(&config, system, *durable),
        (None, None) if config.cluster_report => cluster_report(&config, &args),
        (None, None) => parent(&config, &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------- child --

/// Prints one result row for the parent.
fn row(phase: &str, rate: f64, bytes_per_record: Option<f64>) {
    let bytes = bytes_per_record.map_or("-".to_owned(), |b| format!("{b:.1}"));
    println!("ROW\t{phase}\t{rate:.1}\t{bytes}");
}

/// Runs one system's phases (durable, or load + lookups) in this process.
fn child(c: &Config, system: &str, durable: bool) -> Res<()> {
    let dir = tempfile::Builder::new()
        .prefix("idemkv-compare-")
        .tempdir()?;
    let path = dir.path();
    if durable {
        let work = Workload::new(0, c.users);
        let rate = match system {
            "idemkv" => {
                workload::durable(&Idemkv::open(path, true)?, &work, c.callers, c.durable_secs)?
            }
            "idemkv-async" => systems::idemkv::async_durable(
                path,
                std::sync::Arc::new(work),
                c.tasks,
                c.durable_secs,
            )?,
            "redb" => {
                workload::durable(&Redb::open(path, true)?, &work, c.callers, c.durable_secs)?
            }
            "fjall" => {
                workload::durable(&Fjall::open(path, true)?, &work, c.callers, c.durable_secs)?
            }
            "redis" => {
                workload::durable(&Redis::start(path, true)?, &work, c.callers, c.durable_secs)?
            }
            "idemkv-cluster1" | "idemkv-cluster3" => {
                let nodes = if system == "idemkv-cluster1" { 1 } else { 3 };
                let (rate, begins) = systems::cluster::durable(
                    nodes,
                    std::sync::Arc::new(work),
                    c.cluster_tasks,
                    c.durable_secs,
                )?;
                row("durable", rate, None);
                println!(
                    "LAT\tdurable\t{:.2}\t{:.2}",
                    begins.quantile_us(0.50),
                    begins.quantile_us(0.99)
                );
                return Ok(());
            }
            _ => return Err(format!("no durable mode for {system}").into()),
        };
        row("durable", rate, None);
        return Ok(());
    }
    let work = Workload::new(c.records, c.users);
    match system {
        "idemkv" => {
            let s = Idemkv::open(path, false)?;
            volatile(c, &s, &work)?;
            let rate = workload::lookups(&s, &work, c.threads, c.secs, get_hit)?;
            row("get", rate, None);
        }
        "hashmap" => {
            let s = Sharded::new();
            volatile(c, &s, &work)?;
            let rate = workload::lookups(&s, &work, c.threads, c.secs, hashmap::get_hit)?;
            row("get", rate, None);
        }
        "redb" => volatile(c, &Redb::open(path, false)?, &work)?,
        "fjall" => volatile(c, &Fjall::open(path, false)?, &work)?,
        "redis" => volatile(c, &Redis::start(path, false)?, &work)?,
        _ => return Err(format!("unknown system {system}").into()),
    }
    Ok(())
}

/// Load (with the memory it takes), then lookups.
fn volatile<S: System>(c: &Config, system: &S, work: &Workload) -> Res<()> {
    let (rss0, used0) = (workload::rss_bytes(), system.used_memory()?);
    let (rate, begins) = workload::load(system, work, c.threads)?;
    let (rss1, used1) = (workload::rss_bytes(), system.used_memory()?);
    let grown = match (used0, used1) {
        (Some(a), Some(b)) => b as f64 - a as f64,
        _ => rss1 as f64 - rss0 as f64,
    };
    row("load", rate, Some(grown / work.len() as f64));
    println!(
        "LAT\tload\t{:.2}\t{:.2}",
        begins.quantile_us(0.50),
        begins.quantile_us(0.99)
    );
    let rate = workload::lookups(system, work, c.threads, c.secs, replay_hit)?;
    row("lookup", rate, None);
    Ok(())
}

// --------------------------------------------------------------- parent --

/// One row of the table.
struct Row {
    phase: &'static str,
    system: &'static str,
    setting: String,
    rate: Option<f64>,
    bytes: Option<f64>,
    /// p50 and p99 (µs) of the phase's timed calls (the load's fresh begins).
    latency: Option<(f64, f64)>,
    note: String,
}

fn parent(c: &Config, args: &[String]) -> Res<()> {
    let mut out = String::new();
    writeln!(out, "{}", header(c, args))?;
    eprint!("{out}");

    eprintln!("measuring fdatasync (2 s) ...");
    let fsync_rate = fdatasync_rate(Duration::from_secs(2))?;

    let redis = redis_available();
    let nats = nats_available();
    let cluster_setting = |nodes: usize| {
        format!(
            "Durability::Sync, {nodes} node{} on 3 nats-servers (R3), 16 partitions, {} tasks on 2 tokio workers",
            if nodes == 1 { "" } else { "s" },
            c.cluster_tasks
        )
    };
    let (cluster1_setting, cluster3_setting) = (cluster_setting(1), cluster_setting(3));
    let async_setting = format!(
        "Durability::Sync, AsyncEngine, {} tasks on 2 tokio workers",
        c.tasks
    );
    let plan: [(&str, bool, &str); 12] = [
        ("idemkv", true, "Durability::Sync"),
        ("idemkv-async", true, async_setting.as_str()),
        ("redb", true, "Durability::Immediate"),
        ("fjall", true, "PersistMode::SyncData"),
        ("redis", true, "appendonly yes, appendfsync always"),
        ("idemkv-cluster1", true, cluster1_setting.as_str()),
        ("idemkv-cluster3", true, cluster3_setting.as_str()),
        ("idemkv", false, "Durability::None"),
        ("hashmap", false, "memory only"),
        ("redb", false, "Durability::None"),
        ("fjall", false, "PersistMode::Buffer"),
        ("redis", false, "appendonly yes, appendfsync no"),
    ];
    let mut rows = Vec::new();
    for (system, durable, setting) in plan {
        if !c.only.iter().any(|s| s == system) {
            continue;
        }
        let phases: &[&'static str] = match (system, durable) {
            (_, true) => &["durable"],
            ("idemkv" | "hashmap", false) => &["load", "lookup", "get"],
            (_, false) => &["load", "lookup"],
        };
        let system: &'static str = SYSTEMS
            .iter()
            .find(|s| **s == system)
            .copied()
            .unwrap_or("?");
        let results = match (system, &redis, &nats) {
            ("redis", Err(why), _) => Err(why.clone()),
            ("idemkv-cluster1" | "idemkv-cluster3", _, Err(why)) => Err(why.clone()),
            _ => {
                eprintln!(
                    "running {system} ({}) ...",
                    if durable { "durable" } else { "load + lookups" }
                );
                run_child(c, system, durable)
            }
        };
        for &phase in phases {
            let (rate, bytes, latency, note) = match &results {
                Ok(found) => match found.iter().find(|(p, _, _, _)| p == phase) {
                    Some((_, rate, bytes, lat)) => (Some(*rate), *bytes, *lat, String::new()),
                    None => (None, None, None, "failed: see stderr".to_owned()),
                },
                Err(why) => (None, None, None, format!("not run: {why}")),
            };
            rows.push(Row {
                phase,
                system,
                setting: setting.to_owned(),
                rate,
                bytes,
                latency,
                note,
            });
        }
    }

    let order = ["durable", "load", "lookup", "get"];
    rows.sort_by_key(|r| order.iter().position(|p| *p == r.phase));
    writeln!(
        out,
        "disk: single-writer append of 160 B + fdatasync: {fsync_rate:.0} /s ({:.2} ms each)\n",
        1000.0 / fsync_rate
    )?;
    out.push_str(&table(c, &rows));
    print!("{out}");
    std::io::stdout().flush()?;
    Ok(())
}

/// A child's row: phase, rate, bytes per record, and the p50 and p99 in
/// microseconds of the phase's timed calls, if it times them.
type ChildRow = (String, f64, Option<f64>, Option<(f64, f64)>);

/// Runs a child for one system and mode; returns its rows.
fn run_child(c: &Config, system: &str, durable: bool) -> Result<Vec<ChildRow>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(c.child_args(system, durable))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start child: {e}"))?;
    let mut rows = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let f: Vec<&str> = line.split('\t').collect();
            if let ["ROW", phase, rate, bytes] = f[..] {
                let rate = rate.parse().unwrap_or(f64::NAN);
                rows.push((phase.to_owned(), rate, bytes.parse().ok(), None));
            }
            if let ["LAT", phase, p50, p99] = f[..]
                && let Some(row) = rows.iter_mut().find(|r| r.0 == phase)
            {
                row.3 = p50.parse().ok().zip(p99.parse().ok());
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if rows.is_empty() && !status.success() {
        return Err(format!("failed ({status}): see stderr"));
    }
    Ok(rows)
}

/// Whether `redis-server` can be run, with its version.
fn redis_available() -> Result<String, String> {
    Redis::version().ok_or_else(|| {
        "redis-server not found on PATH (Debian: apt-get install -y redis-server)".to_owned()
    })
}

/// Whether `nats-server` can be run, with its version.
fn nats_available() -> Result<String, String> {
    systems::cluster::Nats::version().ok_or_else(|| {
        "nats-server not found on PATH (Debian: apt-get install -y nats-server)".to_owned()
    })
}

/// Appends 160 bytes and fdatasyncs, in a loop, for `span`; returns the
/// rate per second.
fn fdatasync_rate(span: Duration) -> Res<f64> {
    let mut file = tempfile::Builder::new()
        .prefix("idemkv-compare-fsync-")
        .tempfile()?;
    let block = [0x5a_u8; 160];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < span {
        file.write_all(&block)?;
        file.as_file().sync_data()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The lines above the table: machine, command, settings.
fn header(c: &Config, args: &[String]) -> String {
    let mut h = machine_header("idemkv comparison", args);
    let _ = writeln!(
        h,
        "settings: {} records over {} users, UUID v4 keys, 160-byte bodies; \
         {} threads for load and lookups ({} s each lookup phase); \
         {} callers for {} s in each durable phase",
        c.records, c.users, c.threads, c.secs, c.callers, c.durable_secs
    );
    h
}

/// Title, command, machine, and the servers' versions.
fn machine_header(title: &str, args: &[String]) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let redis = redis_available().unwrap_or_else(|e| e);
    let mut h = String::new();
    let _ = writeln!(h, "# {title}, {}", utc_now());
    let _ = writeln!(
        h,
        "command: cargo run --release --manifest-path benches/compare/Cargo.toml{}",
        if args.is_empty() {
            String::new()
        } else {
            format!(" -- {}", args.join(" "))
        }
    );
    let _ = writeln!(
        h,
        "machine: {cores} cores ({model}), {mem_gib:.1} GiB, Linux {}, data in {}",
        kernel.trim(),
        std::env::temp_dir().display()
    );
    let _ = writeln!(h, "redis: {redis}");
    let nats = nats_available().unwrap_or_else(|e| e);
    let _ = writeln!(h, "nats-server: {nats}");
    h
}

/// The table, as Markdown.
fn table(c: &Config, rows: &[Row]) -> String {
    let phase_name = |p: &str| match p {
        "durable" => format!("durable begin+complete, {} callers (pairs/s)", c.callers),
        "load" => format!(
            "load {} records: begin+complete+replay, {} threads (records/s; p50/p99 of the fresh begin)",
            c.records, c.threads
        ),
        "lookup" => format!(
            "lookup: replay hit with body, {} threads (lookups/s)",
            c.threads
        ),
        "get" => format!(
            "get: state and status, no body, {} threads (lookups/s)",
            c.threads
        ),
        _ => p.to_owned(),
    };
    let mut t = String::new();
    t.push_str(
        "| phase | system | durability | ops/s | vs idemkv | bytes/record | begin p50 / p99 (µs) |\n",
    );
    t.push_str("|---|---|---|---:|---:|---:|---:|\n");
    let mut last = "";
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.phase == r.phase && b.system == "idemkv")
            .and_then(|b| b.rate);
        let rate = r.rate.map_or_else(|| r.note.clone(), thousands);
        let ratio = match (r.rate, base) {
            (Some(x), Some(b)) if b > 0.0 => format!("{:.2}x", x / b),
            _ => "-".to_owned(),
        };
        let bytes = r.bytes.map_or("-".to_owned(), |b| format!("{b:.0}"));
        let latency = r.latency.map_or("-".to_owned(), |(p50, p99)| {
            if p50 >= 100.0 {
                format!("{p50:.0} / {p99:.0}")
            } else {
                format!("{p50:.2} / {p99:.2}")
            }
        });
        let phase = if r.phase == last {
            String::new()
        } else {
            phase_name(r.phase)
        };
        last = r.phase;
        let _ = writeln!(
            t,
            "| {phase} | {} | {} | {rate} | {ratio} | {bytes} | {latency} |",
            r.system, r.setting
        );
    }
    t
}

/// `1234567.8` as `1,234,568`.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

// ------------------------------------------------------- cluster report --

/// Pairs of each kind in the sequential-caller measurement.
const SEQUENTIAL_PAIRS: usize = 2000;

/// `--cluster-report`: the cluster measurements only (see README.md), as
/// a second table.
fn cluster_report(c: &Config, args: &[String]) -> Res<()> {
    use systems::cluster;
    let mut out = machine_header("idemkv cluster report", args);
    let defaults = cluster::options("x", std::path::Path::new("."), &[]);
    writeln!(
        out,
        "settings: 3 nats-servers on loopback (one JetStream cluster), R3 streams, \
         {} partitions, Durability::Sync, ownership TTL {:?}, forward timeout {:?}, \
         trim_after {} unless said; records over {} users, 160-byte bodies",
        cluster::PARTITIONS,
        defaults.ownership_ttl,
        defaults.forward_timeout,
        defaults.trim_after,
        c.users
    )?;
    eprint!("{out}");
    if let Err(why) = nats_available() {
        writeln!(out, "\nnot run: {why}")?;
        print!("{out}");
        return Ok(());
    }
    let ms = |us: f64| format!("{:.2} ms", us / 1000.0);
    let secs = |d: std::time::Duration| format!("{:.2} s", d.as_secs_f64());
    let mut rows: Vec<(String, String, String)> = Vec::new();

    eprintln!("cluster report: sequential caller ...");
    match cluster::sequential(SEQUENTIAL_PAIRS, c.users) {
        Ok(s) => {
            for (kind, b, cpl) in [
                ("local", &s.local_begin, &s.local_complete),
                ("forwarded", &s.forwarded_begin, &s.forwarded_complete),
            ] {
                rows.push((
                    format!("one sequential caller, {kind} partition"),
                    format!(
                        "3 nodes, the caller on n0; {} fresh begin+complete pairs, one call at a time",
                        thousands(b.count() as f64)
                    ),
                    format!(
                        "begin p50 {} / p99 {}; complete p50 {} / p99 {}",
                        ms(b.quantile_us(0.5)),
                        ms(b.quantile_us(0.99)),
                        ms(cpl.quantile_us(0.5)),
                        ms(cpl.quantile_us(0.99))
                    ),
                ));
            }
        }
        Err(e) => rows.push((
            "one sequential caller".into(),
            "3 nodes".into(),
            format!("failed: {e}"),
        )),
    }

    for v in cluster::FAILOVER_VARIANTS {
        eprintln!("cluster report: failover ({}) ...", v.name);
        let name = format!("failover: SIGKILL of a node → first answer ({})", v.setting);
        match cluster::failover(v.name, &v.configure, c.failover_records, c.users) {
            Ok(f) if !f.times.is_empty() => {
                let moved: Vec<String> = f.moved.iter().map(u32::to_string).collect();
                rows.push((
                    name,
                    format!(
                        "3 nodes (n2 in a child process, killed), {} records loaded, ownership TTL {:?}; \
                         n2 served partitions {}",
                        thousands(c.failover_records as f64),
                        f.ownership_ttl,
                        moved.join(",")
                    ),
                    format!(
                        "prober (attempts of {} ms): fastest {}, median {}, last {} ({} partitions, {} attempts gave up); \
                         plain caller (each call waits up to the forward timeout): fastest {}, median {}, last {}; \
                         then all {} of their records replayed; {} calls failed and were retried meanwhile{}",
                        cluster::PROBE_ATTEMPT.as_millis(),
                        secs(f.times[0]),
                        secs(f.times[f.times.len() / 2]),
                        secs(f.times[f.times.len() - 1]),
                        f.times.len(),
                        f.probe_timeouts,
                        secs(f.plain_times[0]),
                        secs(f.plain_times[f.plain_times.len() / 2]),
                        secs(f.plain_times[f.plain_times.len() - 1]),
                        thousands(f.checked as f64),
                        f.failed_calls,
                        if f.errors.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", f.errors.join("; "))
                        }
                    ),
                ));
            }
            Ok(f) => rows.push((
                name,
                format!("moved partitions {:?}", f.moved),
                "failed: the killed node served no partition with a loaded record".into(),
            )),
            Err(e) => rows.push((name, "3 nodes".into(), format!("failed: {e}"))),
        }
    }
    for (trim_after, trim) in [
        (
            0,
            "trim_after 0 (never trimmed: the whole history)".to_owned(),
        ),
        (
            defaults.trim_after,
            format!("trim_after {} (the default)", defaults.trim_after),
        ),
    ] {
        eprintln!("cluster report: catch-up ({trim}) ...");
        let setting = format!(
            "1 partition, {} records completed by node a, then a shuts down; {trim}",
            thousands(c.catchup_records as f64)
        );
        match cluster::catch_up(c.catchup_records, c.users, trim_after) {
            Ok(r) => {
                let rate = |d: std::time::Duration| thousands(r.records as f64 / d.as_secs_f64());
                rows.push((
                    "catch-up: a new node (empty data dir): start → serving + one replay".into(),
                    setting.clone(),
                    format!(
                        "{}: {} records/s (then all {} records replayed on it)",
                        secs(r.fresh),
                        rate(r.fresh),
                        thousands(r.checked as f64)
                    ),
                ));
                rows.push((
                    "catch-up: the former owner restarts on its own copy".into(),
                    setting,
                    format!("{}: {} records/s", secs(r.restart), rate(r.restart)),
                ));
            }
            Err(e) => rows.push(("catch-up".into(), setting, format!("failed: {e}"))),
        }
    }

    out.push_str("\n| measurement | setting | result |\n|---|---|---|\n");
    for (m, s, r) in rows {
        writeln!(out, "| {m} | {s} | {r} |")?;
    }
    print!("{out}");
    std::io::stdout().flush()?;
    Ok(())
}
