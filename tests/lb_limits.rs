//! Farm and backend limits with real traffic: new-connection rate per client,
//! concurrent connections per client and per backend, RST rate, tcp-strict, the
//! `verdict` of security rules, and the features this kernel lacks (`queue` needs
//! nfqueue, `flow-offload` needs flowtables) being refused cleanly.

mod common;

use common::sec::*;
use common::*;
use serde_json::{json, Value};
use std::thread;
use std::time::Duration;

const VIP: &str = "198.18.0.100";
const A: &str = CLI4; // 198.18.0.2
const B: &str = "198.18.0.3";

fn web(extra: &[(&str, &str)], backends: Vec<Value>) -> Value {
    web_farm_doc(VIP, extra, backends)
}

/// A farm-level attribute change: `{"farms":[{"name":"web", k: v, ...}]}`.
fn set(kv: &[(&str, &str)]) -> Value {
    farms_doc(with(json!({"name": "web"}), kv))
}

fn lab(keep_open: bool) -> Lab {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.add_client_addr(B);
    if keep_open {
        lab.serve_tcp_keep_open(80);
    } else {
        lab.serve_tcp(80);
    }
    lab
}

fn ok_count(r: &[std::io::Result<(String, std::net::IpAddr)>]) -> usize {
    r.iter().filter(|x| x.is_ok()).count()
}

#[test]
fn new_rtlimit_cuts_off_a_fast_client_but_not_a_slow_one() {
    let lab = lab(false);
    let d = Daemon::start(&lab.lb);
    d.apply(&web(
        &[("new-rtlimit", "3/second"), ("new-rtlimit-burst", "2")],
        v4_backends(2),
    ));
    let f = d.farm("web");
    assert_eq!(f["new-rtlimit"], "3/second", "GET: {f}");

    // 20 connections at once from A: most are over the rate.
    let r = burst(&lab.cli, Some(A), VIP, 80, 20, Duration::from_millis(900));
    let ok = ok_count(&r);
    assert!(
        (1..=12).contains(&ok),
        "20 simultaneous new connections with new-rtlimit 3/second burst 2: {ok} served \
         (expected some, but at most 12): {r:?}"
    );

    // B stays below the rate (2 per second): every connection is served.
    for i in 0..4 {
        if i > 0 {
            thread::sleep(Duration::from_millis(500));
        }
        served(&lab, B, VIP, 80, &format!("slow client, connection {i}"));
    }

    // A rate, not a ban: A is served again once it slows down.
    thread::sleep(Duration::from_millis(1200));
    served(&lab, A, VIP, 80, "fast client after a pause");

    // Without the limit the same burst is served in full.
    d.apply(&set(&[("new-rtlimit", "0")]));
    let r = burst(&lab.cli, Some(A), VIP, 80, 20, Duration::from_secs(3));
    assert_eq!(ok_count(&r), 20, "burst without new-rtlimit: {r:?}");
}

#[test]
fn est_connlimit_caps_concurrent_connections_per_client() {
    let lab = lab(true);
    let d = Daemon::start(&lab.lb);
    d.apply(&web(&[("est-connlimit", "3")], v4_backends(2)));
    let t = Duration::from_millis(1500);

    let mut held: Vec<Held> = (0..3)
        .map(|i| {
            hold(&lab.cli, Some(A), VIP, 80, t)
                .unwrap_or_else(|e| panic!("connection {i} of 3 from {A}: {e}"))
        })
        .collect();
    let fourth = hold(&lab.cli, Some(A), VIP, 80, t);
    assert!(
        fourth.is_err(),
        "a 4th concurrent connection from {A} with est-connlimit 3 must fail, it reached {:?}",
        fourth.as_ref().map(|h| h.backend.clone()).ok()
    );
    // Another client is not affected.
    let other = hold(&lab.cli, Some(B), VIP, 80, t).expect("connection from another client");
    // The held connections keep working.
    for h in held.iter_mut() {
        let be = h.backend.clone();
        assert_eq!(h.ping().ok(), Some(be), "held connection at the limit");
    }

    // Closing one makes room again.
    held.pop().unwrap().close();
    let again = wait_until(Duration::from_secs(5), || {
        hold(&lab.cli, Some(A), VIP, 80, Duration::from_millis(500))
            .map(|h| held.push(h))
            .is_ok()
    });
    assert!(
        again,
        "after closing one of 3, {A} must be able to connect again"
    );
    drop(other);
}

#[test]
fn backend_est_connlimit_is_never_exceeded() {
    let lab = lab(true);
    let d = Daemon::start(&lab.lb);
    d.apply(&web(
        &[],
        vec![
            with(bck("be1", &be4(1)), &[("est-connlimit", "2")]),
            bck("be2", &be4(2)),
        ],
    ));
    let f = d.farm("web");
    assert_eq!(f["backends"][0]["est-connlimit"], "2", "GET: {f}");

    let mut held = Vec::new();
    let mut failed = 0;
    for _ in 0..8 {
        match hold(&lab.cli, None, VIP, 80, Duration::from_millis(1500)) {
            Ok(h) => held.push(h),
            Err(_) => failed += 1,
        }
    }
    let got: Vec<String> = held.iter().map(|h| h.backend.clone()).collect();
    let c = counts(&got);
    assert_eq!(
        c.get("be1").copied().unwrap_or(0),
        2,
        "be1 (est-connlimit 2) must hold exactly its limit of the 8 connections \
         (held: {got:?}, failed: {failed})"
    );
    assert!(
        c.get("be2").copied().unwrap_or(0) >= 4,
        "be2 (no limit) takes its share: {got:?}"
    );
    // The backend itself never sees more than its limit.
    assert!(
        established_on_port(&lab.be(1).ns, 80) <= 2,
        "be1 has more than 2 established connections"
    );
}

#[test]
fn rst_rtlimit_drops_excess_resets() {
    let lab = lab(true);
    let d = Daemon::start(&lab.lb);
    d.apply(&web(&[], v4_backends(2)));
    let t = Duration::from_millis(1500);
    let established =
        |lab: &Lab| established_on_port(&lab.be(1).ns, 80) + established_on_port(&lab.be(2).ns, 80);

    // Control: without the limit every RST reaches the backends.
    let hs: Vec<Held> = (0..4)
        .map(|_| hold(&lab.cli, None, VIP, 80, t).expect("connection"))
        .collect();
    assert_eq!(established(&lab), 4);
    for h in hs {
        h.abort();
    }
    assert!(
        wait_until(Duration::from_secs(3), || established(&lab) == 0),
        "without rst-rtlimit the RSTs must close every backend socket ({} left)",
        established(&lab)
    );

    d.apply(&set(&[
        ("rst-rtlimit", "1/second"),
        ("rst-rtlimit-burst", "1"),
    ]));
    let hs: Vec<Held> = (0..12)
        .map(|_| hold(&lab.cli, None, VIP, 80, t).expect("connection"))
        .collect();
    assert_eq!(established(&lab), 12);
    for h in hs {
        h.abort();
    }
    thread::sleep(Duration::from_millis(700));
    let left = established(&lab);
    assert!(
        left >= 8,
        "12 RSTs at once with rst-rtlimit 1/second: most must be dropped, \
         so most backend sockets stay open (only {left} of 12 left)"
    );
}

#[test]
fn tcp_strict_drops_invalid_segments() {
    let lab = lab(false);
    let d = Daemon::start(&lab.lb);
    d.apply(&web(&[], v4_backends(2)));
    // Observation table (ours, not the daemon's): counts the crafted segments that
    // get past prerouting, whether they are delivered locally or forwarded.
    nft_load(
        &lab.lb,
        "table ip nlbtobs {\n\
           counter probe {}\n\
           chain obsin { type filter hook input priority 100; tcp sport 40400-40499 counter name \"probe\"; }\n\
           chain obsfwd { type filter hook forward priority 100; tcp sport 40400-40499 counter name \"probe\"; }\n\
         }\n",
    );
    let probe = |lab: &Lab| nft_counter(&lab.lb, "ip", "nlbtobs", "probe");

    // SYN+FIN is an invalid flag combination for conntrack (ct state invalid).
    send_raw_tcp(&lab.cli, A, VIP, 40401, 80, TCP_SYN | TCP_FIN);
    assert!(
        wait_until(Duration::from_secs(2), || probe(&lab) >= 1),
        "control: without tcp-strict the invalid segment must get through"
    );
    let before = probe(&lab);

    d.apply(&set(&[("tcp-strict", "on")]));
    assert_eq!(d.farm("web")["tcp-strict"].as_str(), Some("on"));
    for port in 40402..40405 {
        send_raw_tcp(&lab.cli, A, VIP, port, 80, TCP_SYN | TCP_FIN);
    }
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        probe(&lab),
        before,
        "with tcp-strict on, invalid segments must be dropped"
    );
    // Normal traffic still works.
    assert_eq!(names(&lab.tcp_many(VIP, 80, 4)).len(), 4);

    d.apply(&set(&[("tcp-strict", "off")]));
    send_raw_tcp(&lab.cli, A, VIP, 40406, 80, TCP_SYN | TCP_FIN);
    assert!(
        wait_until(Duration::from_secs(2), || probe(&lab) > before),
        "tcp-strict off again: the invalid segment gets through"
    );
}

/// A request setting `key` to `value` is refused with a 4xx that names the key, and
/// neither the daemon's state nor the kernel's ruleset changes.
fn refused_cleanly(key: &str, value: &str) {
    let lab = lab(false);
    let d = Daemon::start(&lab.lb);
    d.apply(&web(&[], v4_backends(2)));
    let farm_before = d.farm("web");
    let rules_before = lab.lb.nft_ruleset();

    // Changing an existing farm.
    let (st, body) = d.post("/farms", &set(&[(key, value)]));
    assert!(
        (400..500).contains(&st),
        "{key}={value} on this kernel must be refused with a 4xx, got {st} {body}"
    );
    assert!(
        body.to_string().contains(key),
        "the error must name '{key}': {body}"
    );
    assert_eq!(
        d.farm("web"),
        farm_before,
        "farm changed by a refused request"
    );
    assert_eq!(
        lab.lb.nft_ruleset(),
        rules_before,
        "ruleset changed by a refused request"
    );

    // Creating a new farm with it.
    let mut doc = web(&[(key, value)], v4_backends(2));
    doc["farms"][0]["name"] = "web2".into();
    doc["farms"][0]["virtual-ports"] = "81".into();
    let (st, body) = d.post("/farms", &doc);
    assert!((400..500).contains(&st), "new farm with {key}: {st} {body}");
    assert!(body.to_string().contains(key), "{body}");
    let (st, _) = d.get("/farms/web2");
    assert_eq!(st, 404, "the refused farm must not exist");

    assert_eq!(
        names(&lab.tcp_many(VIP, 80, 2)).len(),
        2,
        "traffic still served"
    );
}

#[test]
fn queue_is_refused_without_nfqueue() {
    refused_cleanly("queue", "1");
}

#[test]
fn flow_offload_is_refused_without_flowtables() {
    refused_cleanly("flow-offload", "on");
}

#[test]
fn verdict_log_only_does_not_drop_blacklisted_clients() {
    let lab = lab(false);
    let d = Daemon::start(&lab.lb);
    call_ok(
        &d,
        "POST",
        "/policies",
        Some(&policy_doc("bl", "blacklist", "ipv4", &[B])),
    );
    let mut doc = web(&[("verdict", "log")], v4_backends(2));
    doc["farms"][0]["policies"] = policy_refs(&["bl"]);
    d.apply(&doc);
    assert_eq!(
        d.farm("web")["verdict"].as_str().map(str::trim),
        Some("log")
    );

    served(
        &lab,
        B,
        VIP,
        80,
        "blacklisted, but the verdict is only 'log'",
    );
    served(&lab, A, VIP, 80, "unlisted");
    // The policy rule did see the client.
    let (pk, _) = element_counters(&get_policy(&d, "bl"), B);
    assert!(
        pk >= 1,
        "the blacklist element must count the logged client"
    );

    // With drop in the verdict the same client is refused.
    d.apply(&set(&[("verdict", "log drop")]));
    refused(&lab, B, VIP, 80, "verdict 'log drop'");
    served(&lab, A, VIP, 80, "unlisted, verdict 'log drop'");
}
