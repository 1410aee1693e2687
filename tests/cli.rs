//! The command line and the HTTP surface of the real binary: flags, `-e -c`, keys,
//! keep-alive, chunked bodies, content type. Runs as root; every test that touches
//! nftables or the network does so in its own namespace.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_nftlb");
static COUNTER: AtomicUsize = AtomicUsize::new(0);

struct Ns(String);

impl Ns {
    fn new() -> Ns {
        assert!(unsafe { libc::geteuid() } == 0, "these tests need root");
        let name = format!(
            "nlbc-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        assert!(Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success());
        let ns = Ns(name);
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }
    fn run(&self, args: &[&str]) -> std::process::Output {
        self.cmd(args).output().unwrap()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// The daemon in a namespace, stopped by its PID on drop.
struct Daemon {
    child: Child,
    first_line: String,
}

impl Daemon {
    fn start(ns: &Ns, args: &[&str], env_key: Option<&str>) -> Daemon {
        let dir = std::env::temp_dir().join(format!("{}-state", ns.0));
        let state = dir.join("state.json");
        let mut c = ns.cmd(&[BIN]);
        c.args(args)
            .args(["-L", "2", "--state-file", state.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        match env_key {
            Some(k) => c.env("NFTLB_SERVER_KEY", k),
            None => c.env_remove("NFTLB_SERVER_KEY"),
        };
        let mut child = c.spawn().unwrap();
        let mut first_line = String::new();
        if args.iter().all(|a| *a != "-k") && env_key.is_none() {
            let out = child.stdout.take().unwrap();
            BufReader::new(out).read_line(&mut first_line).unwrap();
        }
        let d = Daemon { child, first_line };
        // Bounded wait until the port answers (any HTTP status).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let o = ns.run(&[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:5555/farms",
            ]);
            if String::from_utf8_lossy(&o.stdout) != "000" {
                break;
            }
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // `ip netns exec` execs the daemon, so this PID is the daemon's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn curl(ns: &Ns, extra: &[&str]) -> (String, String) {
    let mut args = vec!["curl", "-s", "-w", "\n%{http_code}"];
    args.extend_from_slice(extra);
    let o = ns.run(&args);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    (code.to_string(), body.to_string())
}

fn write_tmp(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("nlbc-{}-{name}", std::process::id()));
    std::fs::File::create(&p)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    p
}

#[test]
fn help_lists_the_original_flags() {
    let o = Command::new(BIN).arg("-h").output().unwrap();
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "-l",
        "-L",
        "-c",
        "-k",
        "-e",
        "-d",
        "-6",
        "-H",
        "-P",
        "-S",
        "-m",
        "--state-file",
    ] {
        assert!(text.contains(flag), "{flag} missing from help:\n{text}");
    }
}

#[test]
fn exit_mode_reports_bad_files_and_applies_good_ones() {
    let ns = Ns::new();
    let o = ns.run(&[BIN, "-e"]);
    assert!(!o.status.success(), "-e without -c must fail");

    let bad_json = write_tmp("bad.json", "{\"farms\": [");
    let o = ns.run(&[BIN, "-e", "-L", "2", "-c", bad_json.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("structure is invalid"));

    let bad_value = write_tmp(
        "badval.json",
        r#"{"farms":[{"name":"lb","backends":[{"name":"b","weight":"-3"}]}]}"#,
    );
    let o = ns.run(&[BIN, "-e", "-L", "2", "-c", bad_value.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("'weight'") && err.contains("'-3'"), "{err}");
    // Nothing was applied.
    let l = ns.run(&["nft", "list", "ruleset"]);
    assert!(!String::from_utf8_lossy(&l.stdout).contains("nftlb"));

    let good = write_tmp(
        "good.json",
        r#"{"farms":[{"name":"lb","virtual-addr":"198.18.0.1","virtual-ports":"80",
            "backends":[{"name":"b","ip-addr":"198.18.1.1"}]}]}"#,
    );
    let o = ns.run(&[BIN, "-e", "-L", "2", "-c", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l = ns.run(&["nft", "list", "chain", "ip", "nftlb", "farm-lb"]);
    assert!(
        String::from_utf8_lossy(&l.stdout).contains("numgen inc mod 1"),
        "{}",
        String::from_utf8_lossy(&l.stdout)
    );
    for p in [bad_json, bad_value, good] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn generated_key_is_printed_and_required() {
    let ns = Ns::new();
    let d = Daemon::start(&ns, &[], None);
    let key = d
        .first_line
        .trim()
        .strip_prefix("Key: ")
        .expect("first line is the key")
        .to_string();
    assert!(key.len() >= 16, "{key}");
    let (code, body) = curl(&ns, &["http://127.0.0.1:5555/farms"]);
    assert_eq!((code.as_str(), body.as_str()), ("401", ""));
    let (code, _) = curl(&ns, &["-H", "Key: wrong", "http://127.0.0.1:5555/farms"]);
    assert_eq!(code, "401");
    let hk = format!("Key: {key}");
    let (code, body) = curl(&ns, &["-H", &hk, "http://127.0.0.1:5555/farms"]);
    assert_eq!(code, "200");
    assert_eq!(body, "{\n        \"farms\": []\n}");
}

#[test]
fn env_key_overrides_dash_k() {
    let ns = Ns::new();
    let _d = Daemon::start(&ns, &["-k", "from-flag"], Some("from-env"));
    let (code, _) = curl(
        &ns,
        &["-H", "Key: from-flag", "http://127.0.0.1:5555/farms"],
    );
    assert_eq!(code, "401");
    let (code, _) = curl(&ns, &["-H", "Key: from-env", "http://127.0.0.1:5555/farms"]);
    assert_eq!(code, "200");
}

#[test]
fn http_keep_alive_chunked_bodies_and_json_content_type() {
    let ns = Ns::new();
    let _d = Daemon::start(&ns, &["-k", "k"], None);
    let body = r#"{"farms":[{"name":"lb","virtual-addr":"198.18.0.1","virtual-ports":"80"}]}"#;
    // A chunked POST followed by a GET on the same connection.
    let o = ns.run(&[
        "curl",
        "-sv",
        "-H",
        "Key: k",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        body,
        "http://127.0.0.1:5555/farms",
        "--next",
        "-sv",
        "-H",
        "Key: k",
        "http://127.0.0.1:5555/farms/lb",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        out.starts_with(r#"{"response": "success"}"#),
        "{out}\n{err}"
    );
    assert!(out.contains("\"virtual-addr\": \"198.18.0.1\""), "{out}");
    assert!(
        err.contains("Re-using existing connection") || err.contains("Reusing existing"),
        "{err}"
    );
    assert!(
        err.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{err}"
    );
    // The change is in the kernel.
    let l = ns.run(&["nft", "list", "map", "ip", "nftlb", "svcx"]);
    assert!(String::from_utf8_lossy(&l.stdout).contains("goto farm-lb"));
}

#[test]
fn oversized_body_is_refused_with_4xx() {
    let ns = Ns::new();
    let _d = Daemon::start(&ns, &["-k", "k"], None);
    let big = write_tmp("big.json", &" ".repeat(257 * 1024 * 1024));
    let at = format!("@{}", big.display());
    let (code, _) = curl(
        &ns,
        &[
            "-H",
            "Key: k",
            "--data-binary",
            &at,
            "http://127.0.0.1:5555/farms",
        ],
    );
    let _ = std::fs::remove_file(&big);
    assert_eq!(code, "413");
    let (code, body) = curl(&ns, &["-H", "Key: k", "http://127.0.0.1:5555/farms"]);
    assert_eq!(code, "200");
    assert_eq!(body, "{\n        \"farms\": []\n}");
}

#[test]
fn daemon_mode_forks_and_serves() {
    let ns = Ns::new();
    let state = std::env::temp_dir().join(format!("{}-d.json", ns.0));
    let o = ns.run(&[
        BIN,
        "-d",
        "-k",
        "k",
        "-L",
        "0",
        "--state-file",
        state.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "the parent exits 0");
    // The child serves; it is the only process in this namespace.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = curl(&ns, &["-H", "Key: k", "http://127.0.0.1:5555/farms"]);
        if code == "200" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the forked daemon does not answer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids = Command::new("ip")
        .args(["netns", "pids", &ns.0])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&pids.stdout).into_owned();
    let pids: Vec<i32> = pids
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(pids.len(), 1, "{pids:?}");
    unsafe { libc::kill(pids[0], libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while unsafe { libc::kill(pids[0], 0) } == 0 {
        assert!(
            Instant::now() < deadline,
            "the daemon did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(state);
}
