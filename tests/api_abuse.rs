//! The REST API against strangers and careless clients: an empty key, unauthenticated
//! bodies, slow and stuck clients, more connections than file descriptors, signals, and a
//! flood of wrong keys. Each test runs the real daemon in its own namespace.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

fn api_addr() -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), API_PORT)
}

/// A farm on a benchmarking address (its port is its own); no backends.
fn farm_doc(name: &str, port: u16) -> Value {
    json!({"farms": [{"name": name, "virtual-addr": "198.18.0.100",
        "virtual-ports": port.to_string(), "protocol": "tcp", "mode": "snat"}]})
}

fn has_farm(d: &Daemon, name: &str) -> bool {
    d.get(&format!("/farms/{name}")).0 == 200
}

/// Lines of the daemon log containing `needle`.
fn log_lines(d: &Daemon, needle: &str) -> Vec<String> {
    d.log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Reads until EOF, an error or `timeout`: the bytes and how long it took (None: timed
/// out with the connection still open).
fn read_until_closed(s: &mut TcpStream, timeout: Duration) -> (Vec<u8>, Option<Duration>) {
    let t = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while t.elapsed() < timeout {
        match s.read(&mut buf) {
            Ok(0) => return (out, Some(t.elapsed())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return (out, Some(t.elapsed())),
        }
    }
    (out, None)
}

/// The daemon binary run directly with `args` (and NFTLB_SERVER_KEY as given) in `ns`:
/// its exit status and stderr, or None when it is still running after 10 s (killed).
fn run_once(ns: &NetNs, args: &[&str], env_key: Option<&str>) -> Option<(i32, String)> {
    let state = std::env::temp_dir().join(format!("{}-state.json", ns.name()));
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns.name(), env!("CARGO_BIN_EXE_nftlb")])
        .args(args)
        .args(["-H", "127.0.0.1", "-L", "2", "--state-file"])
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match env_key {
        Some(k) => c.env("NFTLB_SERVER_KEY", k),
        None => c.env_remove("NFTLB_SERVER_KEY"),
    };
    let mut child = c.spawn().expect("spawn nftlb");
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            let _ = std::fs::remove_file(&state);
            return Some((st.code().unwrap_or(-1), err));
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&state);
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_empty_key_refuses_to_start() {
    let ns = NetNs::new("emptykey");
    for (args, env) in [
        (&["-k", ""][..], None),
        (&["-k", ""][..], Some("")),
        (&["--key", ""][..], None),
    ] {
        let r = run_once(&ns, args, env);
        let Some((code, err)) = r else {
            panic!("{args:?} (NFTLB_SERVER_KEY {env:?}): the daemon started and served");
        };
        assert_ne!(code, 0, "{args:?}: exit status 0; stderr: {err}");
        assert!(
            err.contains("-k") && err.contains("empty"),
            "{args:?}: the error should name -k and say the key is empty: {err}"
        );
    }
    // A key with spaces around it can never be sent: refused too.
    let (code, err) = run_once(&ns, &["-k", " k "], None).expect("it must not start");
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("-k"), "{err}");

    // An empty NFTLB_SERVER_KEY beside a valid -k: -k is the key.
    let d = Daemon::start_with(&ns, &[], &[], &[("NFTLB_SERVER_KEY", "")]);
    let r = d.request("GET", "/farms", &[("Key", "")], None);
    assert_eq!(r.status, 401, "no key");
    assert_eq!(d.get("/farms").0, 200, "the -k key");
}

/// Eight clients each announce 250 MB without a key and send as fast as the daemon takes
/// it: the daemon reads none of it (401, connection closed), its memory does not grow,
/// and it still serves.
#[test]
fn unauthenticated_bodies_are_never_read() {
    const CLIENTS: usize = 8;
    const SIZE: u64 = 250 * 1000 * 1000;
    let ns = NetNs::new("unauthbody");
    let d = Daemon::start(&ns);
    d.apply(&farm_doc("warm", 80));
    let pid = d.pid().unwrap();
    let before = d.status_kib("VmRSS");

    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(proc_status_kib(pid, "VmRSS"), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let t = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            ns.spawn(move || -> (u64, u16) {
                let mut s = TcpStream::connect(api_addr()).expect("connect");
                s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
                let head = format!(
                    "POST /farms HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {SIZE}\r\n\r\n"
                );
                s.write_all(head.as_bytes()).unwrap();
                let chunk = vec![b' '; 256 * 1024];
                let mut sent = 0u64;
                while sent < SIZE {
                    let n = (SIZE - sent).min(chunk.len() as u64) as usize;
                    match s.write(&chunk[..n]) {
                        Ok(n) => sent += n as u64,
                        Err(_) => break,
                    }
                }
                let (raw, _) = read_until_closed(&mut s, Duration::from_secs(30));
                let status = String::from_utf8_lossy(&raw)
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                (sent, status)
            })
        })
        .collect();
    let results: Vec<(u64, u16)> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    let took = t.elapsed();
    thread::sleep(Duration::from_millis(100));
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let growth = peak.saturating_sub(before);
    eprintln!(
        "VmRSS before {before} kB, peak {peak} kB (+{growth} kB), VmHWM {} kB; {took:?}; per client (bytes the daemon's socket took, status): {results:?}",
        d.status_kib("VmHWM")
    );
    for (sent, status) in &results {
        assert!(
            *sent < SIZE,
            "a client could send its whole 250 MB body: the daemon read it ({results:?})"
        );
        assert!(
            *status == 401 || *status == 0,
            "expected 401 (or a reset): {results:?}"
        );
    }
    assert!(
        growth < 16 * 1024,
        "the daemon's RSS grew by {growth} kB (limit 16 MB)"
    );
    d.apply(&farm_doc("after", 81));
    assert!(has_farm(&d, "after"));
}

/// With 1,024 file descriptors, 1,100 connections that sent half a request header and
/// stay open do not lock out a legitimate client: the oldest are closed to make room.
#[test]
fn connection_limit_evicts_half_headers_not_clients() {
    require_tool("prlimit");
    let nofile = raise_nofile();
    assert!(
        nofile > 1300,
        "this test needs 1,300 file descriptors ({nofile})"
    );
    let ns = NetNs::new("connlimit");
    let d = Daemon::start_with(&ns, &["prlimit", "--nofile=1024:1024"], &[], &[]);
    let held: Vec<TcpStream> = ns.run(|| {
        (0..1100)
            .map(|i| {
                let mut s = TcpStream::connect_timeout(&api_addr(), Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                s.write_all(b"POST /farms HTTP/1.1\r\nHo").unwrap();
                s
            })
            .collect()
    });
    let t = Instant::now();
    let r = d.request(
        "POST",
        "/farms",
        &[],
        Some(farm_doc("legit", 80).to_string().as_bytes()),
    );
    let post_latency = t.elapsed();
    let t = Instant::now();
    let (st, _) = d.get("/farms/legit");
    let get_latency = t.elapsed();
    let fds = d.open_fds();
    // The daemon closed the oldest of the held connections.
    let closed: Vec<usize> = held
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            s.set_nonblocking(true).unwrap();
            let mut r: &TcpStream = s;
            !matches!(r.read(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock)
        })
        .map(|(i, _)| i)
        .collect();
    eprintln!(
        "POST with 1,100 half-header connections held: {} in {post_latency:?}; GET {st} in {get_latency:?}; daemon fds {fds}; held connections closed by the daemon: {} (the oldest: {:?}..{:?})",
        r.status,
        closed.len(),
        closed.first(),
        closed.last()
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        post_latency < Duration::from_secs(1),
        "POST took {post_latency:?}"
    );
    assert_eq!(st, 200);
    assert!(fds <= 1024, "{fds}");
    assert!(
        closed.len() >= 1100 - 1024,
        "only {} held connections were closed",
        closed.len()
    );
    assert!(
        closed.iter().all(|i| *i < 1000),
        "the youngest connections were closed: {closed:?}"
    );
    let lines = log_lines(&d, "connection limit reached");
    assert!(
        !lines.is_empty() && lines.len() <= 3,
        "one rate-limited line: {lines:?}"
    );
    drop(held);
}

/// Stuck and slow clients are cut: half a header (also when it trickles in), a body that
/// stalls, an idle kept-alive connection.
#[test]
fn slow_clients_are_timed_out() {
    let ns = NetNs::new("slow");
    let d = Daemon::start(&ns);
    let key = d.key.clone();
    let half_header = ns.spawn(|| {
        let mut s = TcpStream::connect(api_addr()).unwrap();
        s.write_all(b"POST /farms HTTP/1.1\r\nHo").unwrap();
        read_until_closed(&mut s, Duration::from_secs(40)).1
    });
    let trickle = ns.spawn(|| {
        let mut s = TcpStream::connect(api_addr()).unwrap();
        let head = b"GET /farms HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let t = Instant::now();
        for b in head {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(500));
        }
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) | Err(_) if t.elapsed() < Duration::from_secs(20) => Some(t.elapsed()),
            _ => None,
        }
    });
    let k = key.clone();
    let stalled_body = ns.spawn(move || {
        let mut s = TcpStream::connect(api_addr()).unwrap();
        let head = format!(
            "POST /farms HTTP/1.1\r\nHost: 127.0.0.1\r\nKey: {k}\r\nContent-Length: 1000\r\n\r\n{{\"farms\": "
        );
        s.write_all(head.as_bytes()).unwrap();
        let (raw, closed) = read_until_closed(&mut s, Duration::from_secs(40));
        (String::from_utf8_lossy(&raw).into_owned(), closed)
    });
    let k = key.clone();
    let idle = ns.spawn(move || {
        let mut s = TcpStream::connect(api_addr()).unwrap();
        let req = format!("GET /farms HTTP/1.1\r\nHost: 127.0.0.1\r\nKey: {k}\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        read_until_closed(&mut s, Duration::from_secs(60)).1
    });
    let half_header = half_header.join().unwrap();
    let trickle = trickle.join().unwrap();
    let (body_reply, body_closed) = stalled_body.join().unwrap();
    let idle = idle.join().unwrap();
    eprintln!(
        "closed after: half header {half_header:?}, trickled header {trickle:?}, stalled body {body_closed:?} ({:?}), idle keep-alive {idle:?}",
        body_reply.lines().next()
    );
    let within = |d: Option<Duration>, lo: u64, hi: u64| {
        d.is_some_and(|d| d >= Duration::from_secs(lo) && d <= Duration::from_secs(hi))
    };
    assert!(within(half_header, 9, 13), "half header: {half_header:?}");
    assert!(within(trickle, 9, 13), "trickled header: {trickle:?}");
    assert!(
        within(body_closed, 9, 13),
        "stalled body: {body_closed:?} {body_reply}"
    );
    assert!(
        body_reply.starts_with("HTTP/1.1 408") && body_reply.contains("did not arrive in time"),
        "{body_reply}"
    );
    assert!(within(idle, 29, 34), "idle keep-alive: {idle:?}");
    assert_eq!(d.get("/farms").0, 200);
}

/// SIGTERM stops the daemon within 5 s whatever its connections are doing; SIGQUIT too.
#[test]
fn sigterm_and_sigquit_stop_within_the_deadline() {
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGQUIT, "SIGQUIT")] {
        let ns = NetNs::new("sigstop");
        let mut d = Daemon::start(&ns);
        let key = d.key.clone();
        let conns: Vec<TcpStream> = ns.run(move || {
            let mut v = Vec::new();
            // Half a request header.
            let mut s = TcpStream::connect(api_addr()).unwrap();
            s.write_all(b"POST /farms HTTP/1.1\r\nHo").unwrap();
            v.push(s);
            // An authorised body that stalls.
            let mut s = TcpStream::connect(api_addr()).unwrap();
            let head = format!(
                "POST /farms HTTP/1.1\r\nHost: 127.0.0.1\r\nKey: {key}\r\nContent-Length: 1000\r\n\r\n{{"
            );
            s.write_all(head.as_bytes()).unwrap();
            v.push(s);
            // An idle kept-alive connection.
            let mut s = TcpStream::connect(api_addr()).unwrap();
            let req = format!("GET /farms HTTP/1.1\r\nHost: 127.0.0.1\r\nKey: {key}\r\n\r\n");
            s.write_all(req.as_bytes()).unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).unwrap();
            v.push(s);
            // Connected, nothing sent.
            v.push(TcpStream::connect(api_addr()).unwrap());
            v
        });
        thread::sleep(Duration::from_millis(200));
        let (st, took) = d.stop_with(sig, Duration::from_secs(8));
        eprintln!("{name} with 4 connections open: exit {st:?} after {took:?}");
        assert!(st.is_some(), "{name}: still running after 8 s");
        assert!(took < Duration::from_millis(5500), "{name}: {took:?}");
        assert!(st.unwrap().success(), "{name}: {st:?}");
        assert!(
            !log_lines(&d, &format!("{name} received")).is_empty(),
            "{name} is logged"
        );
        drop(conns);
    }
}

/// SIGHUP, SIGUSR1 and SIGUSR2 are logged and do not stop the daemon; SIGHUP applies an
/// edited `-c` file again (and reports a broken one), or says there is nothing to reload.
#[test]
fn hup_usr1_usr2_are_logged_and_hup_reapplies_the_config() {
    let ns = NetNs::new("sighup");
    let cfg = std::env::temp_dir().join(format!("{}-cfg.json", ns.name()));
    std::fs::write(&cfg, farm_doc("a", 80).to_string()).unwrap();
    let mut d = Daemon::start_with(&ns, &[], &["-c", cfg.to_str().unwrap()], &[]);
    assert!(has_farm(&d, "a"));
    assert!(!has_farm(&d, "b"));

    let mut doc = farm_doc("a", 80);
    doc["farms"]
        .as_array_mut()
        .unwrap()
        .push(farm_doc("b", 81)["farms"][0].clone());
    std::fs::write(&cfg, doc.to_string()).unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || has_farm(&d, "b")),
        "farm b from the edited file did not appear; log:\n{}",
        tail(&d.log(), 3000)
    );
    assert!(d.running());
    assert!(wait_until(Duration::from_secs(2), || !log_lines(
        &d,
        "SIGHUP received"
    )
    .is_empty()));
    assert!(wait_until(Duration::from_secs(2), || !log_lines(
        &d, "applied"
    )
    .is_empty()));

    // A broken file: reported, nothing changes, the daemon carries on.
    std::fs::write(&cfg, "{\"farms\": [").unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || !log_lines(&d, "was not applied")
            .is_empty()),
        "log:\n{}",
        tail(&d.log(), 3000)
    );
    assert!(d.running());
    assert!(has_farm(&d, "a") && has_farm(&d, "b"));

    for (sig, name) in [(libc::SIGUSR1, "SIGUSR1"), (libc::SIGUSR2, "SIGUSR2")] {
        d.signal(sig);
        assert!(
            wait_until(Duration::from_secs(2), || !log_lines(
                &d,
                &format!("{name} received")
            )
            .is_empty()),
            "{name} is logged"
        );
        thread::sleep(Duration::from_millis(100));
        assert!(d.running(), "{name} stopped the daemon");
        assert_eq!(d.get("/farms").0, 200);
    }
    let _ = std::fs::remove_file(&cfg);

    // Without -c: nothing to reload.
    let ns2 = NetNs::new("sighup2");
    let mut d2 = Daemon::start(&ns2);
    d2.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(2), || !log_lines(
            &d2,
            "nothing to reload"
        )
        .is_empty()),
        "log:\n{}",
        tail(&d2.log(), 3000)
    );
    thread::sleep(Duration::from_millis(100));
    assert!(d2.running());
    assert_eq!(d2.get("/farms").0, 200);
}

/// 2,000 requests with a wrong key: a few log lines, each naming the client address and
/// counting the refused requests; together they count all 2,000.
#[test]
fn a_wrong_key_flood_is_logged_a_few_times() {
    const THREADS: usize = 4;
    const EACH: usize = 500;
    let ns = NetNs::new("keyflood");
    let d = Daemon::start(&ns);
    let t = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            ns.spawn(|| -> io::Result<usize> {
                let mut refused = 0;
                for _ in 0..EACH {
                    let r = http_exchange(
                        api_addr(),
                        b"GET /farms HTTP/1.1\r\nHost: 127.0.0.1\r\nKey: wrong\r\n\r\n",
                        Duration::from_secs(5),
                    )?;
                    refused += usize::from(r.status == 401);
                }
                Ok(refused)
            })
        })
        .collect();
    let refused: usize = workers
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .sum();
    let took = t.elapsed();
    assert_eq!(refused, THREADS * EACH);
    // The last count is written within a second or two.
    let counted = || -> u64 {
        log_lines(&d, "wrong or missing key")
            .iter()
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("refused="))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(3), || counted() == refused as u64),
        "counted {} of {refused}; log:\n{}",
        counted(),
        tail(&d.log(), 3000)
    );
    let lines = log_lines(&d, "wrong or missing key");
    eprintln!(
        "{refused} wrong-key requests in {took:?}: {} log lines:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(
        lines.len() as u64 <= took.as_secs() + 3,
        "{} lines for a {took:?} flood",
        lines.len()
    );
    assert!(lines.iter().all(|l| l.contains("127.0.0.1")), "{lines:?}");
    assert_eq!(d.get("/farms").0, 200);
}
