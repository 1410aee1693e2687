//! nftlb-bench: the measuring side of `bench/run.sh`.
//!
//! Every measuring subcommand prints one JSON object on stdout; with `--record FILE` it
//! also appends it, together with the `--meta key=value` pairs, as one line of FILE
//! (JSONL). `report` turns such a file into a Markdown table and plots.
//!
//! - `serve`: backend server: on each connection write one byte (the last octet of the
//!   local address, so the prober can tell backends apart), then read to EOF and
//!   acknowledge with one byte (the bulk test).
//! - `connect`: open-loop new-connection prober. Connections are started at a fixed rate
//!   from a timerfd, whatever the earlier ones are doing (no coordinated omission), each
//!   non-blocking, all on one epoll loop. Per connection it measures the connect() time
//!   (SYN to SYN/ACK, as the client sees it) and the time to the backend's first byte,
//!   then closes with RST (SO_LINGER 0) so no TIME_WAIT piles up.
//! - `bulk`: fixed number of bytes over S parallel TCP streams, acknowledged by the server.
//! - `post`, `changes`, `wait-api`: a minimal HTTP/1.1 client for the REST API (one
//!   connection per request, like curl): cold apply of a file, sequential single changes
//!   (add / down / up / remove a backend of a random farm), readiness.
//! - `cli-changes`: the same single changes as minimal deltas for the kube-proxy-style
//!   comparators (`nft -f`, `iptables-restore --noflush`), process start to exit.
//! - `exec`: run a command and report wall time, CPU time and peak RSS (wait4).
//! - `gen`: inputs for every system: nftlb farms JSON, kube-proxy-style nft ruleset,
//!   iptables-restore input, HAProxy configuration, a large blacklist policy.
//! - `record`: append a record assembled from key=value pairs.
//! - `report`: results.jsonl -> results.md (+ PNG plots through gnuplot when installed).
//!
//! Addresses: VIP of farm i is 198.18.(k>>8 & 255).(k & 255) port 80 + (k >> 16) with
//! k = i + 1; backend j is 198.19.0.(j+1) port 8080 (RFC 2544 benchmarking range).

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "nftlb-bench", about = "Measurement helpers for bench/run.sh")]
struct Cli {
    #[command(flatten)]
    rec: RecordOpts,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct RecordOpts {
    /// Append the result (with --meta) as one JSON line to this file
    #[arg(long, global = true)]
    record: Option<PathBuf>,
    /// key=value added to the recorded result (numbers are stored as numbers)
    #[arg(long, global = true)]
    meta: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Backend server (runs until killed)
    Serve {
        /// Ports to listen on (repeat for several)
        #[arg(long, default_values_t = [8080])]
        port: Vec<u16>,
    },
    /// Open-loop new-connection latency prober
    Connect {
        #[arg(long)]
        addr: Ipv4Addr,
        #[arg(long)]
        port: u16,
        /// New connections per second
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Connections measured (after the warm-up)
        #[arg(long, default_value_t = 2000)]
        count: u32,
        /// Connections started first and not counted
        #[arg(long, default_value_t = 0)]
        warmup: u32,
        /// A connection that has not got its first byte by then has failed
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Only connect (do not wait for the backend's byte)
        #[arg(long)]
        connect_only: bool,
        /// The result is not ok unless this many distinct backends answered
        #[arg(long, default_value_t = 0)]
        min_backends: usize,
        /// A second target (ADDR:PORT), probed in alternation with the first under the
        /// same conditions; its results are the alt_* fields (COUNT each)
        #[arg(long)]
        also: Option<SocketAddrV4>,
    },
    /// Bulk throughput: BYTES over STREAMS parallel connections
    Bulk {
        #[arg(long)]
        addr: Ipv4Addr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        streams: u32,
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
    },
    /// POST (or PUT/DELETE) one request and time it
    Post {
        #[arg(long, default_value = "127.0.0.1:5555")]
        api: SocketAddr,
        #[arg(long)]
        key: String,
        #[arg(long, default_value = "/farms")]
        path: String,
        #[arg(long, default_value = "POST")]
        method: String,
        /// Body from this file
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long)]
        body: Option<String>,
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
    /// Sequential single changes through the API on random farms
    Changes {
        #[arg(long, default_value = "127.0.0.1:5555")]
        api: SocketAddr,
        #[arg(long)]
        key: String,
        /// Number of farms (f0 .. f{N-1}) to pick from
        #[arg(long)]
        farms: u32,
        /// Total requests
        #[arg(long, default_value_t = 200)]
        count: u32,
        /// Operations applied in turn to one random farm, then the next farm
        #[arg(long, default_value = "add,down,up,remove")]
        ops: String,
        /// Stop early after this long (at least one full cycle of ops is done)
        #[arg(long, default_value_t = 120)]
        max_seconds: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// Wait until GET /farms answers 200
    WaitApi {
        #[arg(long, default_value = "127.0.0.1:5555")]
        api: SocketAddr,
        #[arg(long)]
        key: String,
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// Wait until a TCP connection to ADDR:PORT gets the backend's byte
    WaitTcp {
        #[arg(long)]
        addr: Ipv4Addr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 30)]
        timeout_s: u64,
    },
    /// Single changes for the kube-proxy-style comparators, as minimal deltas
    CliChanges {
        #[arg(long, value_enum)]
        kind: CliKind,
        #[arg(long)]
        n: u32,
        #[arg(long)]
        m: u32,
        /// Total changes (down and up alternately, on random services)
        #[arg(long, default_value_t = 20)]
        count: u32,
        #[arg(long, default_value_t = 120)]
        max_seconds: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Directory for the delta files
        #[arg(long, default_value = "/tmp")]
        dir: PathBuf,
    },
    /// Run a command; report wall/user/sys time and peak RSS
    Exec {
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
        /// stdout and stderr of the command go here (default: inherited stderr, stdout
        /// to /dev/null)
        #[arg(long)]
        log: Option<PathBuf>,
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Generate inputs
    Gen {
        #[arg(value_enum)]
        what: GenKind,
        #[arg(long, default_value_t = 1)]
        n: u32,
        #[arg(long, default_value_t = 8)]
        m: u32,
        /// Blacklist: number of elements
        #[arg(long, default_value_t = 1_000_000)]
        elements: u32,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Append a record from key=value pairs (with --record and --meta)
    Record {
        fields: Vec<String>,
        /// Start from the JSON object in this file (e.g. a prober's output)
        #[arg(long)]
        merge: Option<PathBuf>,
    },
    /// Print the VIP (addr port) of farm I
    Vip { i: u32 },
    /// results.jsonl -> results.md and plots
    Report {
        /// Directory holding results.jsonl; results.md and *.png are written there
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum CliKind {
    KubeNft,
    IptLegacy,
    IptNft,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum GenKind {
    /// nftlb farms document (dnat, weight)
    Farms,
    /// same, dsr mode
    FarmsDsr,
    /// kube-proxy-style nftables ruleset (`nft -f`)
    KubeNft,
    /// kube-proxy-style iptables-restore input (nat table)
    Ipt,
    /// HAProxy configuration, mode tcp
    Haproxy,
    /// blacklist policy document with ELEMENTS networks
    Blacklist,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rec = cli.rec.clone();
    let r = match cli.cmd {
        Cmd::Serve { port } => serve(port).map(|_| None),
        Cmd::Connect {
            addr,
            port,
            rate,
            count,
            warmup,
            timeout_ms,
            connect_only,
            min_backends,
            also,
        } => connect_probe(
            SocketAddrV4::new(addr, port),
            also,
            rate,
            count,
            warmup,
            Duration::from_millis(timeout_ms),
            connect_only,
        )
        .map(|mut v| {
            let seen = v["backends_seen"].as_u64().unwrap_or(0) as usize;
            if seen < min_backends {
                v["ok"] = json!(false);
                v["error"] = json!(format!(
                    "{seen} distinct backends answered, expected at least {min_backends}"
                ));
            }
            Some(v)
        }),
        Cmd::Bulk {
            addr,
            port,
            bytes,
            streams,
            timeout_s,
        } => bulk(
            SocketAddrV4::new(addr, port),
            bytes,
            streams,
            Duration::from_secs(timeout_s),
        )
        .map(Some),
        Cmd::Post {
            api,
            key,
            path,
            method,
            file,
            body,
            timeout_s,
        } => post(api, &key, &method, &path, file, body, timeout_s).map(Some),
        Cmd::Changes {
            api,
            key,
            farms,
            count,
            ops,
            max_seconds,
            seed,
            timeout_s,
        } => api_changes(api, &key, farms, count, &ops, max_seconds, seed, timeout_s).map(Some),
        Cmd::WaitApi {
            api,
            key,
            timeout_s,
        } => wait_api(api, &key, timeout_s).map(Some),
        Cmd::WaitTcp {
            addr,
            port,
            timeout_s,
        } => wait_tcp(SocketAddrV4::new(addr, port), timeout_s).map(Some),
        Cmd::CliChanges {
            kind,
            n,
            m,
            count,
            max_seconds,
            seed,
            dir,
        } => cli_changes(kind, n, m, count, max_seconds, seed, &dir).map(Some),
        Cmd::Exec {
            timeout_s,
            log,
            cmd,
        } => exec(&cmd, timeout_s, log).map(Some),
        Cmd::Gen {
            what,
            n,
            m,
            elements,
            out,
        } => gen(what, n, m, elements, out).map(|_| None),
        Cmd::Record { fields, merge } => {
            let mut o = Map::new();
            if let Some(p) = merge {
                match fs::read_to_string(&p)
                    .ok()
                    .and_then(|t| serde_json::from_str::<Value>(t.trim()).ok())
                {
                    Some(Value::Object(m)) => o = m,
                    _ => {
                        o.insert("ok".into(), json!(false));
                        o.insert(
                            "error".into(),
                            json!(format!("no result in {}", p.display())),
                        );
                    }
                }
            }
            for f in &fields {
                let (k, v) = kv(f);
                o.insert(k, v);
            }
            Ok(Some(Value::Object(o)))
        }
        Cmd::Vip { i } => {
            let (a, p) = vip(i);
            println!("{a} {p}");
            Ok(None)
        }
        Cmd::Report { dir } => report(&dir).map(|_| None),
    };
    match r {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(v)) => {
            let ok = v.get("ok").and_then(Value::as_bool).unwrap_or(true);
            if let Err(e) = emit(&rec, v) {
                eprintln!("nftlb-bench: {e}");
                return ExitCode::FAILURE;
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        Err(e) => {
            eprintln!("nftlb-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res<T> = Result<T, String>;

fn kv(s: &str) -> (String, Value) {
    let (k, v) = s.split_once('=').unwrap_or((s, ""));
    let val = if let Ok(i) = v.parse::<i64>() {
        json!(i)
    } else if let Ok(f) = v.parse::<f64>() {
        if f.is_finite() {
            json!(f)
        } else {
            json!(v)
        }
    } else if v == "true" || v == "false" {
        json!(v == "true")
    } else {
        json!(v)
    };
    (k.to_string(), val)
}

fn emit(rec: &RecordOpts, v: Value) -> Res<()> {
    // The result's fields first, then --meta (which wins: it names the test).
    let mut o = match v {
        Value::Object(r) => r,
        _ => Map::new(),
    };
    for m in &rec.meta {
        let (k, v) = kv(m);
        o.insert(k, v);
    }
    let line = Value::Object(o).to_string();
    println!("{line}");
    if let Some(p) = &rec.record {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        writeln!(f, "{line}").map_err(|e| e.to_string())?;
    }
    Ok(())
}

// ---------------------------------------------------------------- addresses

/// VIP of farm / service `i` (0-based).
fn vip(i: u32) -> (Ipv4Addr, u16) {
    let k = i + 1;
    (
        Ipv4Addr::new(198, 18, ((k >> 8) & 255) as u8, (k & 255) as u8),
        80 + (k >> 16) as u16,
    )
}

/// Backend `j` (0-based).
fn backend(j: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (j / 250) as u8, (j % 250 + 1) as u8)
}

const BACKEND_PORT: u16 = 8080;

// ---------------------------------------------------------------- statistics

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// Summary of samples (in the unit given) as p50/p90/p99/p999/max/mean fields.
fn summary(prefix: &str, unit: &str, mut v: Vec<f64>, o: &mut Map<String, Value>) {
    v.sort_by(|a, b| a.total_cmp(b));
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    let mean = if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    };
    for (name, val) in [
        ("p50", percentile(&v, 0.5)),
        ("p90", percentile(&v, 0.9)),
        ("p99", percentile(&v, 0.99)),
        ("p999", percentile(&v, 0.999)),
        ("max", v.last().copied().unwrap_or(f64::NAN)),
        ("mean", mean),
    ] {
        let key = format!("{prefix}{name}_{unit}");
        o.insert(
            key,
            if val.is_finite() {
                json!(r(val))
            } else {
                Value::Null
            },
        );
    }
}

// ---------------------------------------------------------------- serve

fn listen(port: u16) -> Res<TcpListener> {
    let l = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind :{port}: {e}"))?;
    // std listens with a backlog of 128; raise it (listen() again only changes it).
    // SAFETY: plain syscall on a socket we own.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    Ok(l)
}

fn serve(ports: Vec<u16>) -> Res<()> {
    let mut ls = Vec::new();
    for p in ports {
        ls.push(listen(p)?);
    }
    let last = ls.pop().ok_or("no port")?;
    for l in ls {
        std::thread::spawn(move || serve_on(l));
    }
    serve_on(last);
    Ok(())
}

fn serve_on(l: TcpListener) {
    loop {
        match l.accept() {
            Ok((mut c, _)) => {
                // The greeting first (what the latency prober waits for), then, in a
                // thread, the bulk protocol: read to EOF and acknowledge. A latency probe
                // resets the connection right after the greeting, which ends the thread.
                let b = match c.local_addr() {
                    Ok(SocketAddr::V4(a)) => a.ip().octets()[3],
                    _ => 0,
                };
                if c.write(&[b]).is_err() {
                    continue;
                }
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) => break,
                            Ok(_) => {}
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => return,
                        }
                    }
                    let _ = c.write_all(b"k");
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

// ---------------------------------------------------------------- connect prober

struct Conn {
    fd: i32,
    start: Instant,
    connected: Option<Duration>,
    counted: bool,
    t: usize,
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[derive(Default)]
struct Stats {
    conn: Vec<f64>,
    fb: Vec<f64>,
    failures: BTreeMap<String, u64>,
    backends: BTreeMap<u8, u64>,
}

fn connect_probe(
    target: SocketAddrV4,
    also: Option<SocketAddrV4>,
    rate: u32,
    count: u32,
    warmup: u32,
    timeout: Duration,
    connect_only: bool,
) -> Res<Value> {
    if rate == 0 || count == 0 {
        return Err("rate and count must be > 0".into());
    }
    let targets: Vec<SocketAddrV4> = std::iter::once(target).chain(also).collect();
    let nt = targets.len() as u32;
    let total = (count + warmup) * nt;
    // SAFETY: the syscalls below operate on descriptors owned by this function; each
    // is closed exactly once (on completion, failure or timeout, or at the end).
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(format!("epoll_create1: {}", io::Error::last_os_error()));
    }
    let tfd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if tfd < 0 {
        return Err(format!("timerfd_create: {}", io::Error::last_os_error()));
    }
    let interval_ns = 1_000_000_000u64 / rate as u64;
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: (interval_ns / 1_000_000_000) as _,
            tv_nsec: (interval_ns % 1_000_000_000) as _,
        },
        it_value: libc::timespec {
            tv_sec: 0,
            tv_nsec: 1000,
        },
    };
    unsafe { libc::timerfd_settime(tfd, 0, &spec, std::ptr::null_mut()) };
    const TIMER: u64 = u64::MAX;
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: TIMER,
    };
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, tfd, &mut ev) };

    let sas: Vec<libc::sockaddr_in> = targets.iter().map(|t| sockaddr_in(*t)).collect();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let mut slots: BTreeMap<u64, Conn> = BTreeMap::new();
    let mut order: VecDeque<u64> = VecDeque::new();
    let mut next_id: u64 = 0;
    let mut started: u32 = 0;
    let mut stats: Vec<Stats> = targets.iter().map(|_| Stats::default()).collect();
    let mut behind: u64 = 0; // timer expirations that fired more than once (prober late)
    let t0 = Instant::now();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];

    let close = |fd: i32| unsafe {
        libc::close(fd);
    };
    let fail = |c: &Conn, why: &str, stats: &mut Vec<Stats>| {
        if c.counted {
            *stats[c.t].failures.entry(why.to_string()).or_default() += 1;
        }
    };

    while started < total || !slots.is_empty() {
        // Expire the oldest connections first (all share one timeout).
        let now = Instant::now();
        while let Some(&id) = order.front() {
            match slots.get(&id) {
                None => {
                    order.pop_front();
                }
                Some(c) if now.duration_since(c.start) >= timeout => {
                    let c = slots.remove(&id).unwrap();
                    order.pop_front();
                    fail(
                        &c,
                        if c.connected.is_some() {
                            "timeout-first-byte"
                        } else {
                            "timeout-connect"
                        },
                        &mut stats,
                    );
                    close(c.fd);
                }
                Some(_) => break,
            }
        }
        let wait_ms = match order.front().and_then(|id| slots.get(id)) {
            Some(c) => {
                let left = timeout.saturating_sub(now.duration_since(c.start));
                left.as_millis().min(100) as i32 + 1
            }
            None => 100,
        };
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, wait_ms) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(format!("epoll_wait: {}", io::Error::last_os_error()));
        }
        for e in &events[..n as usize] {
            let id = e.u64;
            if id == TIMER {
                let mut exp: u64 = 0;
                let r = unsafe { libc::read(tfd, &mut exp as *mut u64 as *mut libc::c_void, 8) };
                if r != 8 {
                    continue;
                }
                if exp > 1 {
                    behind += exp - 1;
                }
                for _ in 0..exp {
                    if started >= total {
                        break;
                    }
                    let t = (started % nt) as usize;
                    started += 1;
                    let counted = started > warmup * nt;
                    let fd = unsafe {
                        libc::socket(
                            libc::AF_INET,
                            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                            0,
                        )
                    };
                    if fd < 0 {
                        if counted {
                            *stats[t]
                                .failures
                                .entry(format!("socket-{}", errno()))
                                .or_default() += 1;
                        }
                        continue;
                    }
                    unsafe {
                        libc::setsockopt(
                            fd,
                            libc::SOL_SOCKET,
                            libc::SO_LINGER,
                            &linger as *const _ as *const libc::c_void,
                            std::mem::size_of::<libc::linger>() as u32,
                        );
                    }
                    let start = Instant::now();
                    let r = unsafe {
                        libc::connect(
                            fd,
                            &sas[t] as *const _ as *const libc::sockaddr,
                            std::mem::size_of::<libc::sockaddr_in>() as u32,
                        )
                    };
                    if r < 0 && errno() != libc::EINPROGRESS {
                        if counted {
                            *stats[t]
                                .failures
                                .entry(format!("connect-{}", errno()))
                                .or_default() += 1;
                        }
                        close(fd);
                        continue;
                    }
                    let id = next_id;
                    next_id += 1;
                    let mut ev = libc::epoll_event {
                        events: libc::EPOLLOUT as u32,
                        u64: id,
                    };
                    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
                    slots.insert(
                        id,
                        Conn {
                            fd,
                            start,
                            connected: None,
                            counted,
                            t,
                        },
                    );
                    order.push_back(id);
                }
                continue;
            }
            let Some(c) = slots.get_mut(&id) else {
                continue;
            };
            let now = Instant::now();
            if c.connected.is_none() {
                let mut err: i32 = 0;
                let mut len = std::mem::size_of::<i32>() as u32;
                unsafe {
                    libc::getsockopt(
                        c.fd,
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        &mut err as *mut i32 as *mut libc::c_void,
                        &mut len,
                    )
                };
                if err != 0 {
                    let c = slots.remove(&id).unwrap();
                    fail(&c, &format!("connect-errno-{err}"), &mut stats);
                    close(c.fd);
                    continue;
                }
                let d = now.duration_since(c.start);
                c.connected = Some(d);
                if c.counted {
                    stats[c.t].conn.push(d.as_secs_f64() * 1e6);
                }
                if connect_only {
                    let c = slots.remove(&id).unwrap();
                    close(c.fd);
                    continue;
                }
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: id,
                };
                unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_MOD, c.fd, &mut ev) };
                continue;
            }
            let mut b = [0u8; 16];
            let r = unsafe { libc::read(c.fd, b.as_mut_ptr() as *mut libc::c_void, b.len()) };
            if r < 0 && errno() == libc::EAGAIN {
                continue;
            }
            let c = slots.remove(&id).unwrap();
            if r > 0 {
                if c.counted {
                    let st = &mut stats[c.t];
                    st.fb.push(now.duration_since(c.start).as_secs_f64() * 1e6);
                    *st.backends.entry(b[0]).or_default() += 1;
                }
            } else {
                fail(&c, if r == 0 { "eof" } else { "read-error" }, &mut stats);
            }
            close(c.fd);
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    unsafe {
        libc::close(tfd);
        libc::close(ep);
    }
    let mut o = Map::new();
    o.insert("test".into(), json!("connect"));
    o.insert("rate".into(), json!(rate));
    o.insert("count".into(), json!(count));
    o.insert("late_ticks".into(), json!(behind));
    o.insert(
        "achieved_rate".into(),
        json!((total as f64 / elapsed).round()),
    );
    let mut failed_all = 0;
    for (k, st) in stats.into_iter().enumerate() {
        let p = if k == 0 { "" } else { "alt_" };
        let failed: u64 = st.failures.values().sum();
        failed_all += failed;
        o.insert(format!("{p}target"), json!(targets[k].to_string()));
        o.insert(format!("{p}ok_connect"), json!(st.conn.len()));
        o.insert(format!("{p}ok_first_byte"), json!(st.fb.len()));
        o.insert(format!("{p}failed"), json!(failed));
        o.insert(format!("{p}failures"), json!(st.failures));
        o.insert(
            format!("{p}backends_seen"),
            json!(st.backends.keys().filter(|k| **k != 0).count()),
        );
        o.insert(
            format!("{p}backend_counts"),
            json!(st
                .backends
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>()),
        );
        summary(&format!("{p}connect_"), "us", st.conn, &mut o);
        summary(&format!("{p}fb_"), "us", st.fb, &mut o);
    }
    o.insert("ok".into(), json!(failed_all == 0));
    Ok(Value::Object(o))
}

fn wait_tcp(target: SocketAddrV4, timeout_s: u64) -> Res<Value> {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(timeout_s);
    let mut last = String::new();
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_millis(500)) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut b = [0u8; 1];
                match s.read(&mut b) {
                    Ok(1) => {
                        return Ok(
                            json!({"test": "wait_tcp", "ready_s": t0.elapsed().as_secs_f64(), "ok": true}),
                        )
                    }
                    Ok(_) => last = "eof".into(),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(json!({"test": "wait_tcp", "ok": false, "error": last}))
}

// ---------------------------------------------------------------- bulk

fn bulk(target: SocketAddrV4, bytes: u64, streams: u32, timeout: Duration) -> Res<Value> {
    let streams = streams.max(1);
    let per = bytes / streams as u64;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || -> Res<()> {
                let mut s = TcpStream::connect_timeout(&SocketAddr::V4(target), timeout)
                    .map_err(|e| format!("connect: {e}"))?;
                s.set_write_timeout(Some(timeout)).ok();
                s.set_read_timeout(Some(timeout)).ok();
                let mut greeting = [0u8; 1];
                s.read_exact(&mut greeting)
                    .map_err(|e| format!("greeting: {e}"))?;
                let buf = vec![0x5au8; 256 * 1024];
                let mut left = per;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    s.write_all(&buf[..n]).map_err(|e| format!("write: {e}"))?;
                    left -= n as u64;
                }
                s.shutdown(Shutdown::Write).ok();
                let mut b = [0u8; 1];
                match s.read(&mut b) {
                    Ok(1) => Ok(()),
                    Ok(_) => Err("no acknowledgement".into()),
                    Err(e) => Err(format!("read: {e}")),
                }
            })
        })
        .collect();
    let mut err = None;
    for h in handles {
        if let Err(e) = h.join().unwrap_or_else(|_| Err("thread panicked".into())) {
            err = Some(e);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let total = per * streams as u64;
    Ok(json!({
        "test": "bulk",
        "bytes": total,
        "streams": streams,
        "seconds": secs,
        "gbps": if err.is_none() {
            json!((total as f64 * 8.0 / secs / 1e9 * 1000.0).round() / 1000.0)
        } else {
            Value::Null
        },
        "ok": err.is_none(),
        "error": err,
    }))
}

// ---------------------------------------------------------------- HTTP client

struct HttpResp {
    status: u16,
    body: String,
}

fn http(
    api: SocketAddr,
    key: &str,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Res<HttpResp> {
    let mut s = TcpStream::connect_timeout(&api, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    s.set_nodelay(true).ok();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nKey: {key}\r\nAccept: */*\r\nConnection: close\r\n"
    )
    .into_bytes();
    if !body.is_empty() || method != "GET" {
        req.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )
            .as_bytes(),
        );
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    s.write_all(&req).map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = [0u8; 65536];
    let mut head_end = None;
    let mut clen: Option<usize> = None;
    loop {
        if let Some(h) = head_end {
            if let Some(cl) = clen {
                if buf.len() >= h + cl {
                    break;
                }
            }
        }
        let n = match s.read(&mut tmp) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read: {e}")),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
        if head_end.is_none() {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                head_end = Some(p + 4);
                let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
                for l in head.lines() {
                    if let Some(v) = l.strip_prefix("content-length:") {
                        clen = v.trim().parse().ok();
                    }
                }
            }
        }
    }
    let h = head_end.ok_or_else(|| {
        format!(
            "no HTTP response ({} bytes: {:?})",
            buf.len(),
            String::from_utf8_lossy(&buf[..buf.len().min(100)])
        )
    })?;
    let status_line = String::from_utf8_lossy(&buf[..h]);
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let end = clen.map(|c| (h + c).min(buf.len())).unwrap_or(buf.len());
    Ok(HttpResp {
        status,
        body: String::from_utf8_lossy(&buf[h..end]).into_owned(),
    })
}

fn post(
    api: SocketAddr,
    key: &str,
    method: &str,
    path: &str,
    file: Option<PathBuf>,
    body: Option<String>,
    timeout_s: u64,
) -> Res<Value> {
    let data = match (file, body) {
        (Some(f), _) => fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?,
        (None, Some(b)) => b.into_bytes(),
        (None, None) => Vec::new(),
    };
    let t0 = Instant::now();
    let r = http(
        api,
        key,
        method,
        path,
        &data,
        Duration::from_secs(timeout_s),
    );
    let wall = t0.elapsed().as_secs_f64();
    Ok(match r {
        Ok(r) => json!({
            "test": "post", "wall_s": wall, "status": r.status, "bytes": data.len(),
            "response_bytes": r.body.len(), "ok": r.status == 200,
            "response": r.body.chars().take(300).collect::<String>(),
        }),
        Err(e) => json!({"test": "post", "wall_s": wall, "ok": false, "error": e}),
    })
}

/// Waits until the API answers. It asks for one farm that does not exist (any answer
/// will do: 404 from ours, whatever the original says), not for every farm: with
/// 100,000 farms a full `GET /farms` takes longer than the 5 s request timeout, and the
/// wait would never end (ours opens the API only once the kernel is reconciled).
fn wait_api(api: SocketAddr, key: &str, timeout_s: u64) -> Res<Value> {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(timeout_s);
    let mut last = String::new();
    while Instant::now() < deadline {
        match http(
            api,
            key,
            "GET",
            "/farms/ready-probe",
            b"",
            Duration::from_secs(5),
        ) {
            Ok(r) if r.status != 401 => {
                return Ok(
                    json!({"test": "wait_api", "ready_s": t0.elapsed().as_secs_f64(), "ok": true}),
                )
            }
            Ok(r) => last = format!("status {}", r.status),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(json!({"test": "wait_api", "ok": false, "error": last}))
}

/// xorshift64*: reproducible farm choice without another dependency.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) % n.max(1) as u64) as u32
    }
}

#[allow(clippy::too_many_arguments)]
fn api_changes(
    api: SocketAddr,
    key: &str,
    farms: u32,
    count: u32,
    ops: &str,
    max_seconds: u64,
    seed: u64,
    timeout_s: u64,
) -> Res<Value> {
    let ops: Vec<&str> = ops.split(',').map(str::trim).collect();
    for o in &ops {
        if !matches!(*o, "add" | "down" | "up" | "remove") {
            return Err(format!("unknown op {o} (add, down, up, remove)"));
        }
    }
    let mut rng = Rng::new(seed);
    let timeout = Duration::from_secs(timeout_s);
    let t0 = Instant::now();
    let mut all = Vec::new();
    let mut per: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut errors = 0u64;
    let mut first_error = None;
    let mut done = 0u32;
    let mut farm = 0;
    while done < count {
        let k = done as usize % ops.len();
        if k == 0 {
            if t0.elapsed() > Duration::from_secs(max_seconds) {
                break;
            }
            farm = rng.below(farms);
        }
        let op = ops[k];
        let f = format!("f{farm}");
        let (method, path, body) = match op {
            "add" => (
                "POST",
                "/farms".to_string(),
                format!(
                    r#"{{"farms":[{{"name":"{f}","backends":[{{"name":"bx","ip-addr":"{}","port":"{BACKEND_PORT}","weight":"1","state":"up"}}]}}]}}"#,
                    Ipv4Addr::new(198, 19, 0, 240)
                ),
            ),
            "down" | "up" => (
                "POST",
                "/farms".to_string(),
                format!(
                    r#"{{"farms":[{{"name":"{f}","backends":[{{"name":"b0","state":"{op}"}}]}}]}}"#
                ),
            ),
            _ => ("DELETE", format!("/farms/{f}/backends/bx"), String::new()),
        };
        let s = Instant::now();
        let r = http(api, key, method, &path, body.as_bytes(), timeout);
        let ms = s.elapsed().as_secs_f64() * 1e3;
        match r {
            Ok(r) if r.status == 200 => {
                all.push(ms);
                per.entry(op).or_default().push(ms);
            }
            Ok(r) => {
                errors += 1;
                first_error.get_or_insert(format!("{op} {f}: {} {}", r.status, r.body));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(format!("{op} {f}: {e}"));
            }
        }
        done += 1;
    }
    let mut o = Map::new();
    o.insert("test".into(), json!("changes"));
    o.insert("requests".into(), json!(done));
    o.insert("errors".into(), json!(errors));
    o.insert("first_error".into(), json!(first_error));
    o.insert("seconds".into(), json!(t0.elapsed().as_secs_f64()));
    summary("", "ms", all, &mut o);
    for (op, v) in per {
        summary(&format!("{op}_"), "ms", v, &mut o);
    }
    o.insert("ok".into(), json!(errors == 0 && done > 0));
    Ok(Value::Object(o))
}

// ---------------------------------------------------------------- exec

fn rusage_secs(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

fn exec(cmd: &[String], timeout_s: u64, log: Option<PathBuf>) -> Res<Value> {
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..]).stdin(Stdio::null());
    match &log {
        Some(p) => {
            let f = File::create(p).map_err(|e| format!("{}: {e}", p.display()))?;
            let g = f.try_clone().map_err(|e| e.to_string())?;
            c.stdout(f).stderr(g);
        }
        None => {
            c.stdout(Stdio::null());
        }
    }
    let t0 = Instant::now();
    let child = c.spawn().map_err(|e| format!("{}: {e}", cmd[0]))?;
    let pid = child.id() as i32;
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(timeout_s);
        while Instant::now() < end {
            if d2.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !d2.load(Ordering::Relaxed) {
            // SAFETY: our own child, not yet reaped (done is set only after wait4).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = loop {
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r < 0 && errno() == libc::EINTR {
            continue;
        }
        break r;
    };
    done.store(true, Ordering::Relaxed);
    let wall = t0.elapsed().as_secs_f64();
    std::mem::forget(child);
    if r < 0 {
        return Err(format!("wait4: {}", io::Error::last_os_error()));
    }
    let exited = libc::WIFEXITED(status);
    let code = if exited {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let timed_out = !exited && libc::WIFSIGNALED(status) && wall >= timeout_s as f64;
    Ok(json!({
        "test": "exec",
        "wall_s": wall,
        "user_s": rusage_secs(ru.ru_utime),
        "sys_s": rusage_secs(ru.ru_stime),
        "maxrss_kb": ru.ru_maxrss,
        "code": code,
        "timed_out": timed_out,
        "ok": exited && code == 0,
    }))
}

// ---------------------------------------------------------------- generators

fn out_writer(out: &Option<PathBuf>) -> Res<Box<dyn Write>> {
    Ok(match out {
        Some(p) => Box::new(BufWriter::with_capacity(
            1 << 20,
            File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => Box::new(BufWriter::with_capacity(1 << 20, io::stdout())),
    })
}

fn gen(what: GenKind, n: u32, m: u32, elements: u32, out: Option<PathBuf>) -> Res<()> {
    let mut w = out_writer(&out)?;
    let e = |e: io::Error| e.to_string();
    match what {
        GenKind::Farms | GenKind::FarmsDsr => gen_farms(&mut w, n, m, what == GenKind::FarmsDsr),
        GenKind::KubeNft => gen_kube_nft(&mut w, n, m),
        GenKind::Ipt => gen_ipt(&mut w, n, m),
        GenKind::Haproxy => gen_haproxy(&mut w, n, m),
        GenKind::Blacklist => gen_blacklist(&mut w, elements),
    }
    .map_err(e)?;
    w.flush().map_err(e)
}

fn gen_farms(w: &mut dyn Write, n: u32, m: u32, dsr: bool) -> io::Result<()> {
    write!(w, "{{\"farms\":[")?;
    for i in 0..n {
        let (a, p) = vip(i);
        if i > 0 {
            write!(w, ",")?;
        }
        let mode = if dsr {
            "dsr\",\"iface\":\"eth0"
        } else {
            "dnat"
        };
        write!(
            w,
            "{{\"name\":\"f{i}\",\"family\":\"ipv4\",\"virtual-addr\":\"{a}\",\"virtual-ports\":\"{p}\",\"protocol\":\"tcp\",\"mode\":\"{mode}\",\"scheduler\":\"weight\",\"state\":\"up\",\"backends\":["
        )?;
        for j in 0..m {
            if j > 0 {
                write!(w, ",")?;
            }
            if dsr {
                write!(
                    w,
                    "{{\"name\":\"b{j}\",\"ip-addr\":\"{}\",\"weight\":\"1\",\"state\":\"up\"}}",
                    backend(j)
                )?;
            } else {
                write!(
                    w,
                    "{{\"name\":\"b{j}\",\"ip-addr\":\"{}\",\"port\":\"{BACKEND_PORT}\",\"weight\":\"1\",\"state\":\"up\"}}",
                    backend(j)
                )?;
            }
        }
        write!(w, "]}}")?;
    }
    writeln!(w, "]}}")
}

fn kube_svc_rule(i: u32, up: &[u32]) -> String {
    let el: Vec<String> = up
        .iter()
        .enumerate()
        .map(|(k, j)| format!("{k} : goto ep-{i}-{j}"))
        .collect();
    format!(
        "add rule ip kp svc-{i} numgen random mod {} vmap {{ {} }}",
        up.len(),
        el.join(", ")
    )
}

fn kube_ep(i: u32, j: u32) -> String {
    let b = backend(j);
    format!(
        "add chain ip kp ep-{i}-{j}\nadd rule ip kp ep-{i}-{j} ip saddr {b} jump mark-for-masquerade\nadd rule ip kp ep-{i}-{j} meta l4proto tcp dnat to {b}:{BACKEND_PORT}\n"
    )
}

/// kube-proxy nftables mode, as in pkg/proxy/nftables: one service vmap keyed
/// daddr . l4proto . dport, a chain per service with an anonymous numgen vmap over
/// per-endpoint chains that mark hairpin traffic and DNAT.
fn gen_kube_nft(w: &mut dyn Write, n: u32, m: u32) -> io::Result<()> {
    writeln!(w, "add table ip kp")?;
    writeln!(
        w,
        "add chain ip kp nat-prerouting {{ type nat hook prerouting priority dstnat; }}"
    )?;
    writeln!(w, "add chain ip kp services")?;
    writeln!(
        w,
        "add map ip kp service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; }}"
    )?;
    writeln!(w, "add rule ip kp nat-prerouting jump services")?;
    writeln!(
        w,
        "add rule ip kp services ip daddr . meta l4proto . th dport vmap @service-ips"
    )?;
    writeln!(w, "add chain ip kp mark-for-masquerade")?;
    writeln!(
        w,
        "add rule ip kp mark-for-masquerade meta mark set meta mark or 0x4000"
    )?;
    let all: Vec<u32> = (0..m).collect();
    let mut els = Vec::new();
    for i in 0..n {
        for j in 0..m {
            w.write_all(kube_ep(i, j).as_bytes())?;
        }
        writeln!(w, "add chain ip kp svc-{i}")?;
        writeln!(w, "{}", kube_svc_rule(i, &all))?;
        let (a, p) = vip(i);
        els.push(format!("{a} . tcp . {p} : goto svc-{i}"));
        if els.len() == 1000 {
            writeln!(w, "add element ip kp service-ips {{ {} }}", els.join(", "))?;
            els.clear();
        }
    }
    if !els.is_empty() {
        writeln!(w, "add element ip kp service-ips {{ {} }}", els.join(", "))?;
    }
    Ok(())
}

/// Delta for one endpoint (the last) of service i going away (down) or coming back (up),
/// as kube-proxy's partial sync writes it: the service chain rewritten, the endpoint
/// chain added or flushed and deleted.
fn kube_nft_delta(i: u32, m: u32, down: bool) -> String {
    let last = m - 1;
    let mut s = String::new();
    if down {
        let up: Vec<u32> = (0..last).collect();
        s += &format!("flush chain ip kp svc-{i}\n{}\n", kube_svc_rule(i, &up));
        s += &format!("flush chain ip kp ep-{i}-{last}\ndelete chain ip kp ep-{i}-{last}\n");
    } else {
        let up: Vec<u32> = (0..m).collect();
        s += &kube_ep(i, last);
        s += &format!("flush chain ip kp svc-{i}\n{}\n", kube_svc_rule(i, &up));
    }
    s
}

fn ipt_services(w: &mut dyn Write, n: u32) -> io::Result<()> {
    for i in 0..n {
        let (a, p) = vip(i);
        writeln!(
            w,
            "-A KUBE-SERVICES -d {a}/32 -p tcp -m comment --comment \"ns/svc-{i}:p{p}\" -m tcp --dport {p} -j KUBE-SVC-{i}"
        )?;
    }
    Ok(())
}

fn ipt_svc(w: &mut dyn Write, i: u32, up: &[u32]) -> io::Result<()> {
    let k = up.len();
    for (x, j) in up.iter().enumerate() {
        if x + 1 < k {
            writeln!(
                w,
                "-A KUBE-SVC-{i} -m statistic --mode random --probability {:.11} -j KUBE-SEP-{i}-{j}",
                1.0 / (k - x) as f64
            )?;
        } else {
            writeln!(w, "-A KUBE-SVC-{i} -j KUBE-SEP-{i}-{j}")?;
        }
    }
    Ok(())
}

fn ipt_sep(w: &mut dyn Write, i: u32, j: u32) -> io::Result<()> {
    let b = backend(j);
    writeln!(w, "-A KUBE-SEP-{i}-{j} -s {b}/32 -j KUBE-MARK-MASQ")?;
    writeln!(
        w,
        "-A KUBE-SEP-{i}-{j} -p tcp -m tcp -j DNAT --to-destination {b}:{BACKEND_PORT}"
    )
}

/// kube-proxy iptables mode: KUBE-SERVICES with one rule per service (a linear list),
/// statistic cascades in KUBE-SVC-*, DNAT in KUBE-SEP-*.
fn gen_ipt(w: &mut dyn Write, n: u32, m: u32) -> io::Result<()> {
    writeln!(w, "*nat")?;
    writeln!(w, ":PREROUTING ACCEPT [0:0]")?;
    writeln!(w, ":KUBE-SERVICES - [0:0]")?;
    writeln!(w, ":KUBE-MARK-MASQ - [0:0]")?;
    for i in 0..n {
        writeln!(w, ":KUBE-SVC-{i} - [0:0]")?;
        for j in 0..m {
            writeln!(w, ":KUBE-SEP-{i}-{j} - [0:0]")?;
        }
    }
    writeln!(w, "-A PREROUTING -j KUBE-SERVICES")?;
    writeln!(w, "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000")?;
    ipt_services(w, n)?;
    let all: Vec<u32> = (0..m).collect();
    for i in 0..n {
        ipt_svc(w, i, &all)?;
        for j in 0..m {
            ipt_sep(w, i, j)?;
        }
    }
    writeln!(w, "COMMIT")
}

/// kube-proxy's partial sync (MinimizeIPTablesRestore): KUBE-SERVICES rewritten whole,
/// plus the changed service's chains; applied with --noflush.
fn ipt_delta(w: &mut dyn Write, n: u32, i: u32, m: u32, down: bool) -> io::Result<()> {
    let last = m - 1;
    writeln!(w, "*nat")?;
    writeln!(w, ":KUBE-SERVICES - [0:0]")?;
    writeln!(w, ":KUBE-SVC-{i} - [0:0]")?;
    writeln!(w, ":KUBE-SEP-{i}-{last} - [0:0]")?;
    ipt_services(w, n)?;
    if down {
        let up: Vec<u32> = (0..last).collect();
        ipt_svc(w, i, &up)?;
        writeln!(w, "-X KUBE-SEP-{i}-{last}")?;
    } else {
        let up: Vec<u32> = (0..m).collect();
        ipt_svc(w, i, &up)?;
        ipt_sep(w, i, last)?;
    }
    writeln!(w, "COMMIT")
}

fn gen_haproxy(w: &mut dyn Write, n: u32, m: u32) -> io::Result<()> {
    writeln!(
        w,
        "global\n    maxconn 8000\n    nbthread 1\n    cpu-map 1/1 1\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n"
    )?;
    for i in 0..n {
        let (a, p) = vip(i);
        writeln!(
            w,
            "frontend f{i}\n    bind {a}:{p}\n    default_backend f{i}\nbackend f{i}\n    balance roundrobin"
        )?;
        for j in 0..m {
            writeln!(w, "    server b{j} {}:{BACKEND_PORT}", backend(j))?;
        }
        writeln!(w)?;
    }
    Ok(())
}

/// A blacklist of `count` networks of three prefix lengths (never routed anywhere: the
/// elements are only data; the client's address matches none of them).
fn gen_blacklist(w: &mut dyn Write, count: u32) -> io::Result<()> {
    let n24 = (count / 30).min(32768);
    let n28 = (count / 4).min(262_144);
    let n32 = count - n24 - n28;
    write!(
        w,
        "{{\"policies\":[{{\"name\":\"bl\",\"type\":\"blacklist\",\"family\":\"ipv4\",\"elements\":["
    )?;
    let mut first = true;
    let mut el = |w: &mut dyn Write, s: String| -> io::Result<()> {
        if !first {
            write!(w, ",")?;
        }
        first = false;
        write!(w, "{{\"data\":\"{s}\"}}")
    };
    for k in 0..n32 {
        // 10.0.0.0/9
        el(
            w,
            format!("10.{}.{}.{}", (k >> 16) & 127, (k >> 8) & 255, k & 255),
        )?;
    }
    for k in 0..n28 {
        // 100.64.0.0/10
        let a = (100u32 << 24) | (64 << 16) | (k << 4);
        el(w, format!("{}/28", Ipv4Addr::from(a)))?;
    }
    for k in 0..n24 {
        // 10.128.0.0/9
        let a = (10u32 << 24) | (128 << 16) | (k << 8);
        el(w, format!("{}/24", Ipv4Addr::from(a)))?;
    }
    writeln!(w, "]}}]}}")
}

// ---------------------------------------------------------------- CLI comparators

fn cli_changes(
    kind: CliKind,
    n: u32,
    m: u32,
    count: u32,
    max_seconds: u64,
    seed: u64,
    dir: &Path,
) -> Res<Value> {
    if m < 2 {
        return Err("need at least 2 endpoints".into());
    }
    let mut rng = Rng::new(seed);
    let t0 = Instant::now();
    let mut all = Vec::new();
    let mut per: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut errors = 0;
    let mut first_error = None;
    let mut done = 0;
    let mut svc = 0;
    while done < count {
        let down = done % 2 == 0;
        if down {
            if t0.elapsed() > Duration::from_secs(max_seconds) {
                break;
            }
            svc = rng.below(n);
        }
        let path = dir.join(format!("delta-{}.txt", std::process::id()));
        {
            let mut f = BufWriter::new(File::create(&path).map_err(|e| e.to_string())?);
            match kind {
                CliKind::KubeNft => f.write_all(kube_nft_delta(svc, m, down).as_bytes()),
                _ => ipt_delta(&mut f, n, svc, m, down),
            }
            .map_err(|e| e.to_string())?;
            f.flush().map_err(|e| e.to_string())?;
        }
        let p = path.to_string_lossy().to_string();
        let (prog, args): (&str, Vec<&str>) = match kind {
            CliKind::KubeNft => ("nft", vec!["-f", &p]),
            CliKind::IptLegacy => ("iptables-legacy-restore", vec!["--noflush", &p]),
            CliKind::IptNft => ("iptables-nft-restore", vec!["--noflush", &p]),
        };
        let s = Instant::now();
        let out = Command::new(prog)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{prog}: {e}"))?;
        let ms = s.elapsed().as_secs_f64() * 1e3;
        let op = if down { "down" } else { "up" };
        if out.status.success() {
            all.push(ms);
            per.entry(op).or_default().push(ms);
        } else {
            errors += 1;
            first_error.get_or_insert(format!(
                "{op} svc-{svc}: {}",
                String::from_utf8_lossy(&out.stderr)
                    .chars()
                    .take(300)
                    .collect::<String>()
            ));
        }
        let _ = fs::remove_file(&path);
        done += 1;
    }
    let mut o = Map::new();
    o.insert("test".into(), json!("changes"));
    o.insert("requests".into(), json!(done));
    o.insert("errors".into(), json!(errors));
    o.insert("first_error".into(), json!(first_error));
    summary("", "ms", all, &mut o);
    for (op, v) in per {
        summary(&format!("{op}_"), "ms", v, &mut o);
    }
    o.insert("ok".into(), json!(errors == 0 && done > 0));
    Ok(Value::Object(o))
}

// ---------------------------------------------------------------- report

const SYSTEMS: &[(&str, &str)] = &[
    ("nftlb-rs", "nftlb-rs (ours)"),
    ("nftlb-rs-dsr", "nftlb-rs dsr (flat L2)"),
    ("nftlb-orig", "nftlb 1.0.7 (Debian)"),
    ("kube-nft", "kube-proxy-style nft"),
    ("ipt-legacy", "iptables-legacy DNAT"),
    ("ipt-nft", "iptables-nft DNAT"),
    ("haproxy", "HAProxy 2.6 tcp"),
    ("floor-route", "floor: routing only"),
    ("floor-ct", "floor: routing + conntrack"),
    ("floor-netdev", "floor: netdev fwd rule"),
];

fn label(sys: &str) -> String {
    SYSTEMS
        .iter()
        .find(|(k, _)| *k == sys)
        .map(|(_, l)| l.to_string())
        .unwrap_or_else(|| sys.to_string())
}

fn num(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(x) => x.to_string(),
    }
}

fn f(x: Option<f64>, prec: usize) -> String {
    match x {
        Some(x) if x.is_finite() => format!("{x:.prec$}"),
        _ => "–".into(),
    }
}

type Key = (usize, String, u64, u64); // (system order, variant, m, n)

fn report(dir: &Path) -> Res<()> {
    let path = dir.join("results.jsonl");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let recs: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let info = recs
        .iter()
        .find(|r| s(r, "test") == "info")
        .cloned()
        .unwrap_or(json!({}));
    let sys_order = |sys: &str| {
        SYSTEMS
            .iter()
            .position(|(k, _)| *k == sys)
            .unwrap_or(SYSTEMS.len())
    };
    // Group: (system, variant, m, n) -> test -> record (last one wins).
    let mut rows: BTreeMap<Key, BTreeMap<String, Value>> = BTreeMap::new();
    for r in &recs {
        let sys = s(r, "sys");
        if sys.is_empty() {
            continue;
        }
        let key = (
            sys_order(&sys),
            sys.clone(),
            num(r, "m").unwrap_or(0.0) as u64,
            num(r, "n").unwrap_or(0.0) as u64,
        );
        rows.entry(key)
            .or_default()
            .insert(s(r, "test") + &s(r, "variant"), r.clone());
    }

    // The blacklist test: probes before (variant prebl) and after (bl) attaching it.
    for t in rows.values_mut() {
        // The probe alternated between the farm with the blacklist and one without.
        if let Some(with) = t.get("connectbl") {
            let mut b = with.clone();
            for k in [
                "connect_p50_us",
                "connect_p99_us",
                "connect_p999_us",
                "fb_p50_us",
                "fb_p99_us",
            ] {
                b[format!("base_{k}")] =
                    with.get(format!("alt_{k}")).cloned().unwrap_or(Value::Null);
            }
            if let Some(l) = t.get("bl_load") {
                b["load_s"] = l.get("wall_s").cloned().unwrap_or(Value::Null);
                b["elements"] = l.get("elements").cloned().unwrap_or(Value::Null);
            }
            if let Some(a) = t.get("bl_attach") {
                b["attach_s"] = a.get("wall_s").cloned().unwrap_or(Value::Null);
            }
            // One element added, then deleted, several times: the median and the worst.
            for (test, key) in [("bl_add", "add"), ("bl_del", "del")] {
                let mut times: Vec<f64> = t
                    .iter()
                    .filter(|(k, _)| k.starts_with(test))
                    .filter_map(|(_, r)| num(r, "wall_s"))
                    .collect();
                times.sort_by(f64::total_cmp);
                if !times.is_empty() {
                    b[format!("{key}_median_s")] = Value::from(times[times.len() / 2]);
                    b[format!("{key}_max_s")] = Value::from(times[times.len() - 1]);
                }
            }
            t.insert("blacklist".into(), b);
        }
    }

    let mut md = String::new();
    md += "# nftlb-rs benchmark results\n\n";
    md += &format!(
        "tier **{}**, {} — {} cores, kernel {}, nft {}, git {}, load average at start {}\n\n",
        s(&info, "tier"),
        s(&info, "date"),
        s(&info, "cores"),
        s(&info, "kernel"),
        s(&info, "nft"),
        s(&info, "git"),
        s(&info, "loadavg"),
    );
    md += "Farms are dnat, scheduler weight, 8 backends unless the column says otherwise. \
Connection latencies go to the **last** farm added, from an open-loop prober (fixed rate, \
one connection per tick whatever the others are doing). *connect* is the client's connect() \
time (SYN to SYN/ACK through the LB); *first byte* adds the backend's accept and first byte \
(the only meaningful one for HAProxy, which answers the handshake itself). Changes are \
request-to-response (API: committed to the kernel and the state file) or process \
start-to-exit (`nft -f`, `iptables-restore --noflush`).\n\n";
    md += "| system | farms × backends | apply `-e`/file (s) | apply API (s) | peak RSS (MiB) | change p50 / p99 (ms) | connect p50 / p99 / p99.9 (µs) | same run, direct to a backend: connect p50 / p99 (µs) | first byte p50 / p99 (µs) | failed / probes | bulk (Gbit/s) |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|\n";
    for ((_, sys, m, n), t) in &rows {
        let g = |k: &str| t.get(k);
        let ex = g("apply_exit");
        let api = g("apply_api");
        let rss = g("rss")
            .and_then(|r| num(r, "vmhwm_kb"))
            .or_else(|| ex.and_then(|r| num(r, "maxrss_kb")));
        let ch = g("changes");
        let c = g("connect");
        let b = g("bulk");
        let apply = |r: Option<&Value>| match r {
            Some(r) if r.get("ok").and_then(Value::as_bool) == Some(false) => {
                format!("failed ({})", f(num(r, "wall_s"), 2))
            }
            Some(r) => f(num(r, "wall_s"), 3),
            None => "–".into(),
        };
        let farms = if *n == 0 {
            "–".to_string()
        } else {
            format!("{n} × {m}")
        };
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            label(sys),
            farms,
            apply(ex),
            apply(api),
            f(rss.map(|k| k / 1024.0), 1),
            ch.map(|r| format!(
                "{} / {}{}",
                f(num(r, "p50_ms"), 2),
                f(num(r, "p99_ms"), 2),
                if num(r, "errors").unwrap_or(0.0) > 0.0 {
                    format!(" ({} errors)", s(r, "errors"))
                } else {
                    String::new()
                }
            ))
            .unwrap_or("–".into()),
            c.map(|r| format!(
                "{} / {} / {}",
                f(num(r, "connect_p50_us"), 0),
                f(num(r, "connect_p99_us"), 0),
                f(num(r, "connect_p999_us"), 0)
            ))
            .unwrap_or("–".into()),
            c.filter(|r| r.get("alt_target").is_some())
                .map(|r| format!(
                    "{} / {}",
                    f(num(r, "alt_connect_p50_us"), 0),
                    f(num(r, "alt_connect_p99_us"), 0)
                ))
                .unwrap_or("–".into()),
            c.map(|r| format!(
                "{} / {}",
                f(num(r, "fb_p50_us"), 0),
                f(num(r, "fb_p99_us"), 0)
            ))
            .unwrap_or("–".into()),
            c.map(|r| format!("{} / {}", s(r, "failed"), s(r, "count")))
                .unwrap_or("–".into()),
            b.map(|r| f(num(r, "gbps"), 2)).unwrap_or("–".into()),
        );
    }

    // Change latency per operation (ours and the original).
    let mut ops = String::new();
    for ((_, sys, m, n), t) in &rows {
        if let Some(r) = t.get("changes") {
            let mut cells = Vec::new();
            for op in ["add", "down", "up", "remove"] {
                cells.push(
                    match (
                        num(r, &format!("{op}_p50_ms")),
                        num(r, &format!("{op}_p99_ms")),
                    ) {
                        (Some(a), Some(b)) => format!("{a:.2} / {b:.2}"),
                        _ => "–".into(),
                    },
                );
            }
            ops += &format!(
                "| {} | {n} × {m} | {} | {} | {} | {} | {} | {} |\n",
                label(sys),
                s(r, "requests"),
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                f(num(r, "max_ms"), 2)
            );
        }
    }
    if !ops.is_empty() {
        md += "\n### Single changes, per operation (p50 / p99 ms)\n\n";
        md += "| system | farms × backends | requests | add backend | down | up | remove backend | max |\n|---|---|---|---|---|---|---|---|\n";
        md += &ops;
    }

    // Restart, blacklist.
    let mut extra = String::new();
    for ((_, sys, m, n), t) in &rows {
        if let Some(r) = t.get("restart") {
            extra += &format!(
                "| {} | {n} × {m} | restart: stop {} s, start to API ready (reconciled) {} s; probes during it: {} failed of {}, connect p99 {} µs, max {} µs |\n",
                label(sys),
                f(num(r, "stop_s"), 2),
                f(num(r, "start_s"), 2),
                s(r, "failed"),
                s(r, "count"),
                f(num(r, "connect_p99_us"), 0),
                f(num(r, "connect_max_us"), 0)
            );
        }
        if let Some(r) = t.get("get_farms") {
            extra += &format!(
                "| {} | {n} × {m} | GET /farms: {} MB in {} s; the daemon's peak RSS after it {} MiB |\n",
                label(sys),
                f(num(r, "response_bytes").map(|b| b / 1e6), 1),
                f(num(r, "wall_s"), 2),
                f(t.get("rss_get").and_then(|x| num(x, "vmhwm_kb")).map(|k| k / 1024.0), 0),
            );
        }
        if let Some(r) = t.get("blacklist") {
            extra += &format!(
                "| {} | {n} × {m} | blacklist of {} networks attached to the last farm (load {} s, attach {} s); probes alternate between it and the farm before it (no blacklist): connect p50 / p99 {} / {} µs without, {} / {} µs with ({:+.1}% / {:+.1}%); first byte p50 {} → {} µs |\n",
                label(sys),
                s(r, "elements"),
                f(num(r, "load_s"), 2),
                f(num(r, "attach_s"), 2),
                f(num(r, "base_connect_p50_us"), 0),
                f(num(r, "base_connect_p99_us"), 0),
                f(num(r, "connect_p50_us"), 0),
                f(num(r, "connect_p99_us"), 0),
                pct(num(r, "connect_p50_us"), num(r, "base_connect_p50_us")),
                pct(num(r, "connect_p99_us"), num(r, "base_connect_p99_us")),
                f(num(r, "base_fb_p50_us"), 0),
                f(num(r, "fb_p50_us"), 0),
            );
            if num(r, "add_median_s").is_some() {
                extra += &format!(
                    "| {} | {n} × {m} | one element added to that blacklist / deleted from it (request to committed, median and worst of 5): {} / {} s, {} / {} s |\n",
                    label(sys),
                    f(num(r, "add_median_s"), 3),
                    f(num(r, "add_max_s"), 3),
                    f(num(r, "del_median_s"), 3),
                    f(num(r, "del_max_s"), 3),
                );
            }
        }
    }
    if !extra.is_empty() {
        md += "\n### Restart and blacklist\n\n| system | farms × backends | result |\n|---|---|---|\n";
        md += &extra;
    }

    md += &targets(&rows);

    // Checks (correctness): every record with ok=false.
    let bad: Vec<String> = recs
        .iter()
        .filter(|r| r.get("ok").and_then(Value::as_bool) == Some(false))
        .map(|r| {
            format!(
                "- {} {} n={} {}: {}",
                s(r, "sys"),
                s(r, "test"),
                s(r, "n"),
                s(r, "variant"),
                [
                    s(r, "error"),
                    s(r, "first_error"),
                    s(r, "failures"),
                    s(r, "response")
                ]
                .join(" ")
                .trim()
            )
        })
        .collect();
    md += "\n### Checks\n\n";
    if bad.is_empty() {
        md += "Every step succeeded (applies accepted, every probe answered by a backend, every change committed).\n";
    } else {
        md += "Steps that failed:\n\n";
        md += &bad.join("\n");
        md += "\n";
    }
    let notes: Vec<String> = recs
        .iter()
        .filter(|r| s(r, "test") == "note")
        .map(|r| format!("- {}", s(r, "text")))
        .collect();
    if !notes.is_empty() {
        md += "\n### Notes\n\n";
        md += &notes.join("\n");
        md += "\n";
    }

    let plots = plots(dir, &rows);
    if !plots.is_empty() {
        md += "\n### Plots\n\n";
        for p in plots {
            md += &format!("![{p}]({p})\n");
        }
    }
    fs::write(dir.join("results.md"), &md).map_err(|e| e.to_string())?;
    print!("{md}");
    Ok(())
}

fn pct(a: Option<f64>, base: Option<f64>) -> f64 {
    match (a, base) {
        (Some(a), Some(b)) if b > 0.0 => (a / b - 1.0) * 100.0,
        _ => f64::NAN,
    }
}

fn targets(rows: &BTreeMap<Key, BTreeMap<String, Value>>) -> String {
    let find = |sys: &str, m: u64, n: u64, test: &str| -> Option<&Value> {
        rows.iter()
            .find(|((_, s, mm, nn), _)| s == sys && *mm == m && *nn == n)
            .and_then(|(_, t)| t.get(test))
    };
    let floor = |sys: &str, test: &str| -> Option<&Value> {
        rows.iter()
            .find(|((_, s, _, _), _)| s == sys)
            .and_then(|(_, t)| t.get(test))
    };
    let mut out = Vec::new();
    let mut line = |what: String, measured: String, target: &str, met: Option<bool>| {
        let mark = match met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "not measured",
        };
        out.push(format!("| {what} | {measured} | {target} | {mark} |"));
    };
    let cmp = |x: Option<f64>, lim: f64| x.map(|x| x <= lim);
    for (n, lim) in [(10_000u64, 1.5), (100_000, 12.0)] {
        for (test, how) in [("apply_exit", "`-e -c FILE`"), ("apply_api", "one POST")] {
            let v = find("nftlb-rs", 8, n, test).and_then(|r| num(r, "wall_s"));
            line(
                format!("cold apply {n} × 8, {how}"),
                v.map(|x| format!("{x:.2} s")).unwrap_or("–".into()),
                &format!("≤ {lim} s"),
                cmp(v, lim),
            );
        }
    }
    let ours = find("nftlb-rs", 2, 1000, "apply_api").and_then(|r| num(r, "wall_s"));
    let orig = find("nftlb-orig", 2, 1000, "apply_api").and_then(|r| num(r, "wall_s"));
    let ratio = match (ours, orig) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    };
    line(
        "cold apply 1000 × 2 via API, original / ours".into(),
        match (ours, orig, ratio) {
            (Some(a), Some(b), Some(r)) => format!("{b:.2} s / {a:.3} s = {r:.0}×"),
            _ => "–".into(),
        },
        "≥ 20×",
        ratio.map(|r| r >= 20.0),
    );
    for n in [1000u64, 10_000, 100_000] {
        let r = find("nftlb-rs", 8, n, "changes");
        let p50 = r.and_then(|r| num(r, "p50_ms"));
        let p99 = r.and_then(|r| num(r, "p99_ms"));
        line(
            format!("one change via API (add, down, up, remove) at {n} farms, p50 / p99"),
            match (p50, p99) {
                (Some(a), Some(b)) => format!("{a:.2} / {b:.2} ms"),
                _ => "–".into(),
            },
            "≤ 1 / ≤ 5 ms",
            match (p50, p99) {
                (Some(a), Some(b)) => Some(a <= 1.0 && b <= 5.0),
                _ => None,
            },
        );
    }
    let r = find("nftlb-rs", 8, 100_000, "restart");
    let st = r.and_then(|r| num(r, "start_s"));
    let fl = r.and_then(|r| num(r, "failed"));
    line(
        "restart with 100,000 farms: start to reconciled and serving; failed connections".into(),
        match (st, fl) {
            (Some(a), Some(b)) => format!("{a:.2} s; {b} failed"),
            _ => "–".into(),
        },
        "≤ 12 s; 0",
        match (st, fl) {
            (Some(a), Some(b)) => Some(a <= 12.0 && b == 0.0),
            _ => None,
        },
    );
    let rss = find("nftlb-rs", 8, 100_000, "rss").and_then(|r| num(r, "vmhwm_kb"));
    line(
        "daemon peak RSS with 100,000 farms".into(),
        rss.map(|k| format!("{:.0} MiB", k / 1024.0))
            .unwrap_or("–".into()),
        "≤ 256 MiB",
        rss.map(|k| k <= 256.0 * 1024.0),
    );
    let fc = floor("floor-ct", "connect");
    let oc = find("nftlb-rs", 8, 100_000, "connect");
    for p in ["p50", "p99"] {
        let key = format!("connect_{p}_us");
        let a = oc.and_then(|r| num(r, &key));
        let b = fc.and_then(|r| num(r, &key));
        line(
            format!(
                "new-connection latency, 100,000 farms, last farm, {p}, vs routing+conntrack floor"
            ),
            match (a, b) {
                (Some(a), Some(b)) => {
                    format!("{a:.0} vs {b:.0} µs ({:+.1}%)", (a / b - 1.0) * 100.0)
                }
                _ => "–".into(),
            },
            "within 10%",
            match (a, b) {
                (Some(a), Some(b)) => Some(a <= b * 1.1),
                _ => None,
            },
        );
    }
    for p in ["p50", "p99"] {
        let a = oc.and_then(|r| num(r, &format!("connect_{p}_us")));
        let b = oc.and_then(|r| num(r, &format!("alt_connect_{p}_us")));
        line(
            format!("same, against a backend reached directly through the same LB (routing + conntrack, no NAT), probes interleaved, {p}"),
            match (a, b) {
                (Some(a), Some(b)) => format!("{a:.0} vs {b:.0} µs ({:+.1}%)", (a / b - 1.0) * 100.0),
                _ => "–".into(),
            },
            "within 10%",
            match (a, b) {
                (Some(a), Some(b)) => Some(a <= b * 1.1),
                _ => None,
            },
        );
    }
    // Bulk: largest N measured for ours.
    let ob = rows
        .iter()
        .rfind(|((_, s, m, _), t)| s == "nftlb-rs" && *m == 8 && t.contains_key("bulk"))
        .map(|((_, _, _, n), t)| (*n, num(&t["bulk"], "gbps")));
    let fb = floor("floor-ct", "bulk").and_then(|r| num(r, "gbps"));
    if let Some((n, Some(a))) = ob {
        line(
            format!("bulk throughput (NAT), {n} farms, vs routing+conntrack floor"),
            match fb {
                Some(b) => format!("{a:.2} vs {b:.2} Gbit/s ({:.0}%)", a / b * 100.0),
                None => format!("{a:.2} Gbit/s"),
            },
            "≥ 95%",
            fb.map(|b| a >= 0.95 * b),
        );
    } else {
        line(
            "bulk throughput (NAT) vs routing+conntrack floor".into(),
            "–".into(),
            "≥ 95%",
            None,
        );
    }
    let db = rows
        .iter()
        .rfind(|((_, s, _, _), t)| s == "nftlb-rs-dsr" && t.contains_key("bulk"))
        .and_then(|(_, t)| num(&t["bulk"], "gbps"));
    let fnd = floor("floor-netdev", "bulk").and_then(|r| num(r, "gbps"));
    line(
        "bulk throughput (DSR) vs single netdev forward rule".into(),
        match (db, fnd) {
            (Some(a), Some(b)) => format!("{a:.2} vs {b:.2} Gbit/s ({:.0}%)", a / b * 100.0),
            _ => "–".into(),
        },
        "≥ 95%",
        match (db, fnd) {
            (Some(a), Some(b)) => Some(a >= 0.95 * b),
            _ => None,
        },
    );
    let bl = rows
        .iter()
        .rfind(|((_, s, _, _), t)| s == "nftlb-rs" && t.contains_key("blacklist"))
        .map(|(_, t)| &t["blacklist"]);
    let blp = |p: &str| {
        bl.map(|r| {
            pct(
                num(r, &format!("connect_{p}_us")),
                num(r, &format!("base_connect_{p}_us")),
            )
        })
    };
    line(
        format!(
            "blacklist of {} networks: added new-connection latency p50 / p99",
            bl.map(|r| s(r, "elements")).unwrap_or("1,000,000".into())
        ),
        match (blp("p50"), blp("p99")) {
            (Some(a), Some(b)) => format!("{a:+.1}% / {b:+.1}%"),
            _ => "–".into(),
        },
        "≤ 5%",
        match (blp("p50"), blp("p99"), bl) {
            (Some(a), Some(b), Some(r)) if num(r, "elements").unwrap_or(0.0) >= 1e6 => {
                Some(a <= 5.0 && b <= 5.0)
            }
            _ => None,
        },
    );
    let mut s = String::from(
        "\n### Targets (full tier; measured here, judged by the reader)\n\n| target | measured | goal | |\n|---|---|---|---|\n",
    );
    s += &out.join("\n");
    s += "\n";
    s
}

/// Writes gnuplot data and scripts, runs gnuplot when present; returns the PNG names.
fn plots(dir: &Path, rows: &BTreeMap<Key, BTreeMap<String, Value>>) -> Vec<String> {
    // One colour per system (and backend count), solid p50 / API, dashed p99 / file.
    struct Series {
        name: String,
        color: usize,
        dashed: bool,
        pts: Vec<(u64, f64)>,
    }
    struct Plot {
        file: &'static str,
        title: &'static str,
        ylabel: &'static str,
        series: Vec<Series>,
        floors: Vec<(String, f64, bool)>,
    }
    let series = |test: &str, key: &str, suffix: &str, dashed: bool| -> Vec<Series> {
        let mut by: BTreeMap<(usize, String, u64), Vec<(u64, f64)>> = BTreeMap::new();
        for ((o, sys, m, n), t) in rows.iter() {
            if *n == 0 || sys.starts_with("floor") {
                continue;
            }
            if let Some(v) = t.get(test).and_then(|r| num(r, key)) {
                by.entry((*o, sys.clone(), *m)).or_default().push((*n, v));
            }
        }
        by.into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|((o, sys, m), pts)| Series {
                name: format!("{} x{m}{suffix}", label(&sys)),
                color: o * 2 + usize::from(m != 8),
                dashed,
                pts,
            })
            .collect()
    };
    let floors = |key: &str, dashed: bool, suffix: &str| -> Vec<(String, f64, bool)> {
        rows.iter()
            .filter(|((_, s, _, _), _)| s.starts_with("floor"))
            .filter_map(|((_, s, _, _), t)| {
                t.get("connect")
                    .and_then(|r| num(r, key))
                    .map(|v| (format!("{}{suffix}", label(s)), v, dashed))
            })
            .collect()
    };
    let mut apply = series("apply_api", "wall_s", " (API)", false);
    apply.extend(series("apply_exit", "wall_s", " (-e / file)", true));
    let mut change = series("changes", "p50_ms", " p50", false);
    change.extend(series("changes", "p99_ms", " p99", true));
    let mut conn = series("connect", "connect_p50_us", " p50", false);
    conn.extend(series("connect", "connect_p99_us", " p99", true));
    let mut fl = floors("connect_p50_us", false, " p50");
    fl.extend(floors("connect_p99_us", true, " p99"));
    let plots = vec![
        Plot {
            file: "apply_time.png",
            title: "Cold apply time against farm count",
            ylabel: "seconds",
            series: apply,
            floors: vec![],
        },
        Plot {
            file: "change_latency.png",
            title: "Single-change latency against farm count",
            ylabel: "milliseconds",
            series: change,
            floors: vec![],
        },
        Plot {
            file: "connect_latency.png",
            title: "New-connection latency (connect, last farm) against farm count",
            ylabel: "microseconds",
            series: conn,
            floors: fl,
        },
    ];
    const COLORS: &[&str] = &[
        "#d62728", "#ff9896", "#1f77b4", "#aec7e8", "#2ca02c", "#98df8a", "#9467bd", "#c5b0d5",
        "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d",
        "#17becf", "#9edae5", "#000000", "#555555",
    ];
    let have_gnuplot = Command::new("gnuplot")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let mut made = Vec::new();
    for p in plots {
        if p.series.is_empty() {
            continue;
        }
        let base = p.file.trim_end_matches(".png");
        let xmax = p
            .series
            .iter()
            .flat_map(|s| s.pts.iter().map(|(n, _)| *n))
            .max()
            .unwrap_or(1)
            .max(10);
        let mut gp = format!(
            "set terminal pngcairo size 1100,650 noenhanced\nset output '{}'\nset title '{}'\nset xlabel 'farms (services)'\nset ylabel '{}'\nset logscale xy\nset xrange [0.8:{}]\nset key outside right top\nset grid\nplot ",
            p.file,
            p.title,
            p.ylabel,
            xmax as f64 * 1.5
        );
        let mut parts = Vec::new();
        for (k, se) in p.series.iter().enumerate() {
            let dat = format!("{base}-{k}.dat");
            let mut d = String::new();
            for (n, v) in &se.pts {
                d += &format!("{n} {v}\n");
            }
            if fs::write(dir.join(&dat), d).is_err() {
                return made;
            }
            parts.push(format!(
                "'{dat}' using 1:2 with linespoints lw 2 lc rgb '{}' dt {} title '{}'",
                COLORS[se.color % COLORS.len()],
                if se.dashed { 2 } else { 1 },
                se.name.replace('\'', "")
            ));
        }
        for (k, (name, v, dashed)) in p.floors.iter().enumerate() {
            parts.push(format!(
                "{v} with lines lw 1 lc rgb '{}' dt {} title '{}'",
                ["#000000", "#777777", "#bbbbbb"][k % 3],
                if *dashed { 3 } else { 1 },
                name.replace('\'', "")
            ));
        }
        gp += &parts.join(", \\\n     ");
        gp += "\n";
        let script = format!("{base}.gp");
        if fs::write(dir.join(&script), gp).is_err() {
            return made;
        }
        if have_gnuplot {
            let ok = Command::new("gnuplot")
                .arg(&script)
                .current_dir(dir)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok && dir.join(p.file).exists() {
                made.push(p.file.to_string());
            }
        }
    }
    made
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn vips_are_distinct_and_in_range() {
        let mut seen = BTreeSet::new();
        for i in 0..100_000 {
            let (a, p) = vip(i);
            assert_eq!(a.octets()[0..2], [198, 18]);
            assert!(seen.insert((a, p)));
        }
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.999), 7.0);
    }
}
