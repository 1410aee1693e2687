//! Schedulers: rr, weight, hash (srcip), symhash.

mod common;

use common::*;
use serde_json::Value;

const VIP: &str = "198.18.0.100";

fn web(sched: &str, extra: &[(&str, &str)], backends: Vec<Value>) -> Value {
    let mut kv = vec![("scheduler", sched)];
    kv.extend_from_slice(extra);
    web_farm_doc(VIP, &kv, backends)
}

#[test]
fn rr_alternates_exactly() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    d.apply(&web("rr", &[], v4_backends(2)));
    let n = names(&lab.tcp_many(VIP, 80, 12));
    assert!(
        n.windows(2).all(|w| w[0] != w[1]),
        "rr with weights 1,1 must alternate exactly: {n:?}"
    );
}

#[test]
fn rr_is_weighted_round_robin() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    let b = vec![
        bck("be1", &be4(1)),
        with(bck("be2", &be4(2)), &[("weight", "2")]),
    ];
    d.apply(&web("rr", &[], b));
    let n = names(&lab.tcp_many(VIP, 80, 30));
    // Any 30 consecutive picks of a period-3 sequence contain exactly 10 and 20.
    assert_eq!(
        counts(&n),
        expect_counts(&[("be1", 10), ("be2", 20)]),
        "{n:?}"
    );
    let be1_at: Vec<usize> = (0..n.len()).filter(|&i| n[i] == "be1").collect();
    assert!(
        be1_at.windows(2).all(|w| w[1] - w[0] == 3),
        "be1 must come every 3rd connection: {n:?}"
    );
}

#[test]
fn weight_follows_ratios() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    let b = vec![
        bck("be1", &be4(1)),
        with(bck("be2", &be4(2)), &[("weight", "3")]),
    ];
    d.apply(&web("weight", &[], b));
    let n = names(&lab.tcp_many(VIP, 80, 200));
    let c = counts(&n);
    let be2 = *c.get("be2").unwrap_or(&0) as f64 / 200.0;
    // Expected 0.75 (sd ~0.03 over 200 draws); ignoring weights gives 0.5.
    assert!(
        (0.64..=0.86).contains(&be2),
        "be2 share {be2} not ~0.75 for weights 1:3 ({c:?})"
    );
    assert!(
        c.get("be1").copied().unwrap_or(0) >= 20,
        "be1 barely used: {c:?}"
    );
}

#[test]
fn hash_srcip_is_sticky_per_client() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let clients: Vec<String> = (10..26).map(|i| format!("198.18.0.{i}")).collect();
    for c in &clients {
        lab.add_client_addr(c);
    }
    let d = Daemon::start(&lab.lb);
    d.apply(&web("hash", &[("sched-param", "srcip")], v4_backends(2)));

    let mut used = std::collections::BTreeSet::new();
    for c in &clients {
        let r = lab.tcp_many_from(c, VIP, 80, 4);
        assert_eq!(seen(&r), vec![ip(c); 4], "dnat keeps each client address");
        let n = names(&r);
        assert!(n.iter().all(|x| *x == n[0]), "client {c} not sticky: {n:?}");
        used.insert(n[0].clone());
    }
    // 16 clients on one backend only has probability 2^-15 with a working hash.
    assert_eq!(used.len(), 2, "hash put all 16 clients on {used:?}");
}

#[test]
fn symhash_distributes_flows() {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    d.apply(&web("symhash", &[], v4_backends(2)));
    let r = lab.tcp_many(VIP, 80, 40);
    let c = counts(&names(&r));
    assert_eq!(seen(&r), vec![ip(CLI4); 40]);
    // symhash hashes the flow (ports included): 40 flows all on one backend is ~2^-39.
    assert_eq!(c.len(), 2, "symhash used only {c:?}");
}

#[test]
fn hash_moves_only_the_flows_of_a_removed_backend() {
    // Consistent hashing: taking one of 4 backends out moves only its clients; every
    // other client stays where it was (with `jhash mod N` most of them would move).
    let lab = Lab::new(4);
    lab.add_vip(VIP);
    lab.serve_tcp(80);
    let clients: Vec<String> = (10..42).map(|i| format!("198.18.0.{i}")).collect();
    for c in &clients {
        lab.add_client_addr(c);
    }
    let d = Daemon::start(&lab.lb);
    d.apply(&web("hash", &[("sched-param", "srcip")], v4_backends(4)));
    let owner = |c: &str| -> String {
        let n = names(&lab.tcp_many_from(c, VIP, 80, 1));
        n[0].clone()
    };
    let before: Vec<String> = clients.iter().map(|c| owner(c)).collect();
    let gone = before[0].clone();
    d.apply(&backend_patch("web", &gone, "state", "down"));
    let after: Vec<String> = clients.iter().map(|c| owner(c)).collect();
    let mut moved = 0;
    for (i, c) in clients.iter().enumerate() {
        if before[i] == gone {
            assert_ne!(after[i], gone, "client {c} still on the down backend");
            moved += 1;
        } else {
            assert_eq!(
                after[i], before[i],
                "client {c} moved although its backend stayed"
            );
        }
    }
    assert!(
        (1..clients.len()).contains(&moved),
        "moved {moved} of {}",
        clients.len()
    );
}
