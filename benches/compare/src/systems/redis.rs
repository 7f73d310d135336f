//! Redis, through a minimal RESP client (one blocking connection per
//! caller). `begin` is `SET k v NX GET PX lease`: it claims a free key, or
//! (Redis >= 7.0) returns the record already there in the same round trip.
//! `complete` is `SET k v XX PX ttl` (no token check: fencing would need a
//! Lua script). Lookups are `GET`. Expiry is Redis's own (`PX`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::workload::record::{self, COMPLETED, Found, IN_PROGRESS};
use crate::workload::{Claim, Client, LEASE_MS, Reply, Res, System, TTL_MS, next_token, now_ms};

/// A `redis-server` this harness started, on a free loopback port.
pub struct Redis {
    server: Child,
    port: u16,
}

impl Redis {
    /// Starts `redis-server` with its files in `dir`: with `durable`,
    /// `appendonly yes` + `appendfsync always`; otherwise `appendonly yes` +
    /// `appendfsync no` (every write goes to the OS, which decides when it
    /// reaches the disk: what idemkv's `Durability::None` does). No RDB
    /// snapshots either way.
    pub fn start(dir: &Path, durable: bool) -> Res<Redis> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"));
        if durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "yes", "--appendfsync", "no"]);
        }
        let server = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server: {e}"))?;
        let mut redis = Redis { server, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = Conn::connect(port)
                && let Ok(Resp::Simple(s)) = c.call(&[b"PING"])
                && s == "PONG"
            {
                return Ok(redis);
            }
            if let Some(status) = redis.server.try_wait()? {
                return Err(format!("redis-server exited at start-up ({status})").into());
            }
            if Instant::now() > deadline {
                return Err("redis-server did not answer PING within 10 s".into());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis-server --version`, first line.
    pub fn version() -> Option<String> {
        let out = Command::new("redis-server")
            .arg("--version")
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Ok(mut c) = Conn::connect(self.port) {
            let _ = c.call(&[b"SHUTDOWN", b"NOSAVE"]);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.server.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

impl System for Redis {
    type Client = Conn;

    fn client(&self) -> Res<Conn> {
        Conn::connect(self.port)
    }

    /// `used_memory` from `INFO memory`.
    fn used_memory(&self) -> Res<Option<u64>> {
        let mut c = Conn::connect(self.port)?;
        let Resp::Bulk(Some(info)) = c.call(&[b"INFO", b"memory"])? else {
            return Err("unexpected INFO reply".into());
        };
        let info = String::from_utf8_lossy(&info).into_owned();
        let used = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or("no used_memory in INFO")?;
        Ok(Some(used))
    }
}

/// A RESP reply (the kinds the commands used here return; an integer comes
/// back as its text).
pub enum Resp {
    Simple(String),
    Error(String),
    Bulk(Option<Vec<u8>>),
}

/// One blocking connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    out: Vec<u8>,
}

impl Conn {
    fn connect(port: u16) -> Res<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            out: Vec::with_capacity(512),
        })
    }

    /// Sends one command and reads its reply.
    pub fn call(&mut self, args: &[&[u8]]) -> Res<Resp> {
        self.out.clear();
        write!(self.out, "*{}\r\n", args.len())?;
        for a in args {
            write!(self.out, "${}\r\n", a.len())?;
            self.out.extend_from_slice(a);
            self.out.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&self.out)?;
        match self.read()? {
            Resp::Error(e) => Err(format!("redis: {e}").into()),
            r => Ok(r),
        }
    }

    fn line(&mut self) -> Res<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err("redis closed the connection".into());
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }

    fn read(&mut self) -> Res<Resp> {
        let line = self.line()?;
        let (kind, rest) = line.split_at_checked(1).ok_or("empty RESP line")?;
        Ok(match kind {
            "+" => Resp::Simple(rest.to_owned()),
            "-" => Resp::Error(rest.to_owned()),
            ":" => Resp::Simple(rest.to_owned()),
            "$" => {
                let len: i64 = rest.parse()?;
                if len < 0 {
                    Resp::Bulk(None)
                } else {
                    let mut v = vec![0; len as usize + 2];
                    self.reader.read_exact(&mut v)?;
                    v.truncate(len as usize);
                    Resp::Bulk(Some(v))
                }
            }
            _ => return Err(format!("bad RESP line {line:?}").into()),
        })
    }
}

pub struct RedisLease {
    key: Vec<u8>,
    fp: u128,
    token: u64,
}

impl Client for Conn {
    type Lease = RedisLease;

    fn begin(&mut self, user: &[u8], key: &[u8], fp: u128) -> Res<Claim<RedisLease>> {
        let k = record::flat_key(user, key);
        let token = next_token();
        let now = now_ms();
        let rec = record::encode(IN_PROGRESS, fp, token, now + LEASE_MS, 0, b"");
        let lease_ms = LEASE_MS.to_string();
        let reply = self.call(&[b"SET", &k, &rec, b"NX", b"GET", b"PX", lease_ms.as_bytes()])?;
        match reply {
            Resp::Bulk(None) => Ok(Claim::Started(RedisLease { key: k, fp, token })),
            Resp::Bulk(Some(v)) => Ok(match record::judge(&v, fp, now) {
                Found::Replay(r) => Claim::Replay(r),
                Found::Mismatch => Claim::Mismatch,
                // Redis expires keys itself; a record it still holds is live.
                Found::InFlight | Found::Free => Claim::InFlight,
            }),
            _ => Err("unexpected SET reply".into()),
        }
    }

    fn complete(&mut self, lease: RedisLease, status: u16, body: &Bytes) -> Res<()> {
        let rec = record::encode(
            COMPLETED,
            lease.fp,
            lease.token,
            now_ms() + TTL_MS,
            status,
            body,
        );
        let ttl = TTL_MS.to_string();
        match self.call(&[b"SET", &lease.key, &rec, b"XX", b"PX", ttl.as_bytes()])? {
            Resp::Simple(_) => Ok(()),
            _ => Err("lease lost (key gone)".into()),
        }
    }

    fn lookup(&mut self, user: &[u8], key: &[u8], fp: u128) -> Res<Option<Reply>> {
        let k = record::flat_key(user, key);
        Ok(match self.call(&[b"GET", &k])? {
            Resp::Bulk(Some(v)) => match record::judge(&v, fp, now_ms()) {
                Found::Replay(r) => Some(r),
                _ => None,
            },
            _ => None,
        })
    }
}
