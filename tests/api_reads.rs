//! Reads never wait for writes: GETs are answered from the last committed snapshot on
//! the API's threads, listings are streamed, and a change is not held up by a flood of
//! large listings.

mod common;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const FARMS: usize = 20_000;
const READERS: usize = 64;
const CHANGES: usize = 10;

/// `n` snat farms `f0..`, one VIP, one port each, two backends each, as one document.
fn many_farms(n: usize) -> Vec<u8> {
    let farms: Vec<Value> = (0..n)
        .map(|i| {
            farm(
                &format!("f{i}"),
                &[
                    ("family", "ipv4"),
                    ("virtual-addr", "198.18.0.100"),
                    ("virtual-ports", &(1000 + i).to_string()),
                    ("protocol", "tcp"),
                    ("mode", "snat"),
                    ("scheduler", "weight"),
                ],
                v4_backends(2),
            )
        })
        .collect();
    json!({ "farms": farms }).to_string().into_bytes()
}

/// One HTTP/1.1 exchange on a new connection (call it inside the namespace): the status
/// and the raw body bytes (chunked encoding undone), read until the server closes.
fn exchange(
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<(u16, Vec<u8>)> {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), API_PORT);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nKey: {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let mut rest = &raw[end + 4..];
    if !head.contains("transfer-encoding: chunked") {
        return Ok((status, rest.to_vec()));
    }
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("truncated chunk"))?;
        let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        out.extend_from_slice(rest.get(..size).ok_or_else(|| bad("truncated chunk"))?);
        rest = &rest[size + 2..];
    }
}

/// Resident memory of a process, in MB.
fn rss_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// One `GET /farms` of the flood (inside the namespace): reads the answer as it comes
/// and keeps none of it; gives up (`Ok(false)`) once `stop` is set. `Ok(true)`: a whole
/// 200 answer came in; its bytes are added to `bytes`.
fn flood_get(stop: &AtomicBool, bytes: &AtomicU64) -> io::Result<bool> {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), API_PORT);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let head = format!(
        "GET /farms HTTP/1.1\r\nHost: 127.0.0.1\r\nKey: {API_KEY}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes())?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut first = Vec::new();
    let mut tail = Vec::new();
    let mut idle = Duration::ZERO;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                idle = Duration::ZERO;
                bytes.fetch_add(n as u64, Ordering::Relaxed);
                if first.len() < 64 {
                    first.extend_from_slice(&buf[..n.min(64)]);
                }
                tail.extend_from_slice(&buf[..n]);
                let keep = tail.len().saturating_sub(32);
                tail.drain(..keep);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                idle += Duration::from_millis(500);
                if idle > Duration::from_secs(120) {
                    return Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    if !first.starts_with(b"HTTP/1.1 200") {
        return Err(bad(format!("{:?}", String::from_utf8_lossy(&first))));
    }
    if !tail.ends_with(b"\n        ]\n}\r\n0\r\n\r\n") {
        return Err(bad(format!(
            "truncated: ends with {:?}",
            String::from_utf8_lossy(&tail)
        )));
    }
    Ok(true)
}

/// Adds backend `backend` to `farm` (inside the namespace) and checks that the next
/// GET of the farm shows it (read-your-writes). The time the POST took.
fn change(ns: &NetNs, farm: &str, backend: &str) -> Result<Duration, String> {
    let n = 1 + backend.bytes().map(usize::from).sum::<usize>() % 250;
    let add =
        json!({"farms": [{"name": farm, "backends": [bck(backend, &format!("198.18.2.{n}"))]}]});
    let body = add.to_string().into_bytes();
    let t = Instant::now();
    let r = ns.run(move || exchange("POST", "/farms", &body, Duration::from_secs(10)));
    let took = t.elapsed();
    match r {
        Ok((200, _)) => {}
        Ok((st, b)) => return Err(format!("POST {add}: {st} {}", String::from_utf8_lossy(&b))),
        Err(e) => return Err(format!("POST {add} did not complete within 10 s: {e}")),
    }
    let path = format!("/farms/{farm}");
    let (st, b) = ns
        .run(move || exchange("GET", &path, b"", Duration::from_secs(60)))
        .map_err(|e| format!("GET after POST: {e}"))?;
    let v: Value = serde_json::from_slice(&b).map_err(|e| format!("GET after POST: {st} {e}"))?;
    let names: Vec<&str> = v["farms"][0]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["name"].as_str())
        .collect();
    if st != 200 || !names.contains(&backend) {
        return Err(format!(
            "GET right after the POST's 200 misses backend {backend}: {st} {names:?}"
        ));
    }
    Ok(took)
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}

#[test]
fn a_change_is_not_held_up_by_a_flood_of_listings() {
    let ns = NetNs::new("reads");
    let d = Daemon::start(&ns);
    let pid = d.pid().expect("daemon pid");

    let doc = many_farms(FARMS);
    let t = Instant::now();
    let (st, body) = ns
        .run(move || exchange("POST", "/farms", &doc, Duration::from_secs(600)))
        .expect("bulk load");
    assert_eq!(st, 200, "bulk load: {}", String::from_utf8_lossy(&body));
    eprintln!("loaded {FARMS} farms in {:?}", t.elapsed());
    let (st, one) = ns
        .run(|| exchange("GET", "/farms", b"", Duration::from_secs(600)))
        .expect("listing");
    assert_eq!(st, 200);
    let listing: Value = serde_json::from_slice(&one).expect("the listing is JSON");
    assert_eq!(listing["farms"].as_array().map(Vec::len), Some(FARMS));
    let listing_bytes = one.len();
    drop((one, listing));
    let rss_before = rss_mb(pid);
    // The same kind of change without readers: what the writer itself takes.
    let mut alone: Vec<Duration> = (0..5)
        .map(|i| change(&ns, &format!("f{}", i * 991 + 1), &format!("alone{i}")).expect("change"))
        .collect();
    alone.sort();
    let alone_max = *alone.last().expect("changes");

    // The flood: every reader asks for the whole listing, again and again.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (stop, done, bytes) = (stop.clone(), done.clone(), bytes.clone());
            ns.spawn(move || -> Result<(), String> {
                while !stop.load(Ordering::Relaxed) {
                    match flood_get(&stop, &bytes) {
                        Ok(true) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(e) => return Err(e.to_string()),
                    }
                }
                Ok(())
            })
        })
        .collect();
    let rss_max = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, rss_max) = (stop.clone(), rss_max.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                rss_max.fetch_max(rss_mb(pid), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Let every reader get its request in.
    let t_flood = Instant::now();
    thread::sleep(Duration::from_secs(3));

    let mut took = Vec::new();
    let mut failure = None;
    for i in 0..CHANGES {
        match change(&ns, &format!("f{}", i * 997), &format!("new{i}")) {
            Ok(t) => took.push(t),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(f) = failure {
        // (The readers are left to the end of the test process.)
        panic!("{f} (changes before: {took:?})");
    }
    let flood = t_flood.elapsed();
    let (listings_during, mb_during) = (
        done.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed) >> 20,
    );
    for r in readers {
        if let Err(e) = r.join().expect("reader") {
            panic!("GET /farms during the flood: {e}");
        }
    }
    sampler.join().expect("sampler");
    let rss_max = rss_max.load(Ordering::Relaxed);
    took.sort();
    let (median, max) = (percentile(&took, 50), *took.last().expect("changes"));
    eprintln!(
        "{READERS} readers of a {FARMS}-farm listing ({listing_bytes} bytes): {CHANGES} changes, \
         median {median:?}, max {max:?} (without readers: median {:?}, max {alone_max:?}); \
         {listings_during} whole listings and {mb_during} MB served in {flood:?} meanwhile; \
         daemon RSS {rss_before} MB before the flood, at most {rss_max} MB during it",
        percentile(&alone, 50)
    );
    // What the readers may add to a change: 100 ms (the writer's own time, which a debug
    // build makes tens of milliseconds at this size, is not theirs).
    assert!(
        max < alone_max + Duration::from_millis(100),
        "a change waited for the readers: median {median:?}, max {max:?} ({took:?}); \
         without readers at most {alone_max:?}"
    );
    assert!(
        rss_max < rss_before + 100,
        "daemon RSS grew from {rss_before} MB to {rss_max} MB during the flood"
    );
}

#[test]
fn a_get_after_a_change_reflects_it() {
    let ns = NetNs::new("ryw");
    let d = Daemon::start(&ns);
    d.apply(&json!({"farms": [farm("ryw", &[
        ("family", "ipv4"), ("virtual-addr", "198.18.0.100"), ("virtual-ports", "80"),
        ("protocol", "tcp"), ("mode", "snat"), ("scheduler", "weight")], v4_backends(1))]}));
    for i in 0..30 {
        let name = format!("b{i}");
        d.apply(&json!({"farms": [{"name": "ryw", "backends": [bck(&name, &be4(i + 2))]}]}));
        let f = d.farm("ryw");
        let names: Vec<&str> = f["backends"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| b["name"].as_str())
            .collect();
        assert!(
            names.contains(&name.as_str()),
            "after adding {name}: {names:?}"
        );
        d.apply(&backend_patch("ryw", &name, "state", "down"));
        let f = d.farm("ryw");
        let b = f["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name.as_str())
            .cloned()
            .unwrap();
        assert_eq!(b["state"], "down", "after taking {name} down: {b}");
    }
    d.delete_ok("/farms/ryw");
    let (st, _) = d.get("/farms/ryw");
    assert_eq!(st, 404, "GET of a farm just deleted");
    let (st, all) = d.get("/farms");
    assert_eq!(st, 200);
    assert_eq!(all, json!({"farms": []}));
}

#[test]
fn listings_keep_their_text_and_large_ones_are_streamed() {
    let ns = NetNs::new("stream");
    let d = Daemon::start(&ns);
    // Empty listings: the same text as ever.
    for key in ["farms", "policies", "addresses"] {
        let (st, raw) = d.get_raw(&format!("/{key}"));
        assert_eq!(st, 200);
        assert_eq!(
            String::from_utf8(raw).unwrap(),
            format!("{{\n        \"{key}\": []\n}}")
        );
    }
    let doc = many_farms(500);
    let (st, _) = ns
        .run(move || exchange("POST", "/farms", &doc, Duration::from_secs(120)))
        .expect("load");
    assert_eq!(st, 200);
    let r = d.request("GET", "/farms", &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("transfer-encoding"),
        Some("chunked"),
        "a large listing is streamed"
    );
    let v: Value = serde_json::from_slice(&r.body).expect("JSON");
    let farms = v["farms"].as_array().unwrap();
    assert_eq!(farms.len(), 500);
    let names: Vec<String> = (0..500).map(|i| format!("f{i}")).collect();
    let got: Vec<&str> = farms.iter().filter_map(|f| f["name"].as_str()).collect();
    assert_eq!(got, names, "creation order");
    // The same text as the document serialised whole (8-space pretty print).
    let mut pretty = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"        ");
    let mut ser = serde_json::Serializer::with_formatter(&mut pretty, fmt);
    serde::Serialize::serialize(&v, &mut ser).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        String::from_utf8_lossy(&pretty)
    );
    // One farm: a whole body.
    let r = d.request("GET", "/farms/f7", &[], None);
    assert_eq!(r.status, 200);
    assert!(r.header("content-length").is_some());
    assert_eq!(r.json()["farms"][0]["name"], "f7");
}
