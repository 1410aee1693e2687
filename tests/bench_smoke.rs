//! The benchmark suite's correctness tier (`bench/run.sh --check-only`): every system
//! under test (ours in dnat and dsr mode, the floors, and the comparators whose tools are
//! installed: the original nftlb, kube-proxy-style nft, iptables legacy and nft, HAProxy)
//! applies its rules, forwards new connections from the open-loop prober to its
//! backends (at least two distinct backends where it balances), takes single changes,
//! survives a daemon restart without a failed connection, and the suite removes every
//! namespace it made. No timing is asserted.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn bench_check_tier_passes_and_cleans_up() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::env::temp_dir().join(format!("nlbb-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let child = Command::new("bash")
        .arg(Path::new(root).join("bench/run.sh"))
        .args(["--check-only", "--no-install", "--no-build", "--out"])
        .arg(&out)
        .env("NFTLB_BIN", env!("CARGO_BIN_EXE_nftlb"))
        .env("BENCH_BIN", env!("CARGO_BIN_EXE_nftlb-bench"))
        .current_dir(root)
        .spawn()
        .expect("bash bench/run.sh");
    let pid = child.id();
    let res = child.wait_with_output().expect("wait for bench/run.sh");
    let jsonl = std::fs::read_to_string(out.join("results.jsonl")).unwrap_or_default();
    assert!(
        res.status.success(),
        "bench/run.sh --check-only failed ({}); records:\n{jsonl}",
        res.status
    );
    let recs: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
        .collect();
    let failed: Vec<&Value> = recs.iter().filter(|r| r["ok"] == false).collect();
    assert!(failed.is_empty(), "failed steps: {failed:?}");

    let ok = |sys: &str, test: &str| {
        recs.iter()
            .any(|r| r["sys"] == sys && r["test"] == test && r["ok"] == true)
    };
    let mut systems = vec![
        "floor-route",
        "floor-ct",
        "floor-netdev",
        "nftlb-rs",
        "nftlb-rs-dsr",
    ];
    for (sys, tool) in [
        ("nftlb-orig", "/usr/sbin/nftlb"),
        ("kube-nft", "nft"),
        ("ipt-legacy", "iptables-legacy-restore"),
        ("ipt-nft", "iptables-nft-restore"),
        ("haproxy", "haproxy"),
    ] {
        if have(tool) {
            systems.push(sys);
        }
    }
    for sys in &systems {
        assert!(ok(sys, "path"), "{sys}: the last farm never answered");
        assert!(ok(sys, "connect"), "{sys}: no successful probe run");
    }
    // Balancing systems spread the probes over their backends; every probe answered.
    for r in recs.iter().filter(|r| r["test"] == "connect") {
        assert_eq!(r["failed"], 0, "{r}");
        assert_eq!(r["ok_first_byte"], r["count"], "{r}");
        let sys = r["sys"].as_str().unwrap_or_default();
        if !sys.starts_with("floor") && sys != "nftlb-rs-dsr" {
            assert!(r["backends_seen"].as_u64().unwrap_or(0) >= 2, "{r}");
        }
    }
    // Changes were committed (ours and the original through the API, the others as
    // minimal deltas), with the requests the tier asks for.
    for sys in systems
        .iter()
        .filter(|s| !s.starts_with("floor") && **s != "haproxy" && **s != "nftlb-rs-dsr")
    {
        assert!(
            recs.iter().any(|r| r["sys"] == *sys
                && r["test"] == "changes"
                && r["errors"] == 0
                && r["requests"].as_u64().unwrap_or(0) > 0),
            "{sys}: no committed changes"
        );
    }
    // The daemon restart kept every connection.
    let restart = recs
        .iter()
        .find(|r| r["test"] == "restart")
        .expect("a restart record");
    assert_eq!(restart["failed"], 0, "{restart}");
    assert!(
        restart["ok_first_byte"].as_u64().unwrap_or(0) > 0,
        "{restart}"
    );
    // The blacklist probe ran against both farms.
    let bl = recs
        .iter()
        .find(|r| r["test"] == "connect" && r["variant"] == "bl")
        .expect("a blacklist probe");
    assert_eq!(bl["alt_failed"], 0, "{bl}");

    // Nothing left behind: no namespace of that run.
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let ns = String::from_utf8_lossy(&ns.stdout);
    let prefix = format!("nlbb-{pid}-");
    assert!(
        !ns.lines().any(|l| l.starts_with(&prefix)),
        "namespaces left behind:\n{ns}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
