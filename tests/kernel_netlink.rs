//! Element batches sent over netlink (`nftlb::kernel::netlink`) against a real kernel, in
//! throwaway network namespaces (root): the kernel ends up holding exactly what the
//! same commands give through `nft -f -`, a rejected batch changes nothing, and one
//! element change stays fast with a large map present.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::NetNs;
use nftlb::kernel::netlink::{encode, ElementBatch, NetlinkWriter};
use nftlb::kernel::KernelError;
use nftlb::ruleset::TableFamily;

/// Our test sets: (family, kind, name, declaration body).
const SETS: &[(TableFamily, &str, &str, &str)] = &[
    (TableFamily::Ip, "map", "bk", "type mark : ipv4_addr . inet_service;"),
    (TableFamily::Ip, "map", "svc", "type inet_proto . ipv4_addr . inet_service : verdict;"),
    (TableFamily::Ip, "map", "svp", "type inet_proto . inet_service : verdict;"),
    (TableFamily::Ip, "set", "gen", "type mark;"),
    (TableFamily::Ip, "map", "mv", "type mark : verdict;"),
    (TableFamily::Ip, "map", "mm", "type mark : mark;"),
    (TableFamily::Ip, "map", "fb", "typeof ct mark . numgen random mod 16 : ct mark;"),
    (TableFamily::Ip, "map", "cl", "type ipv4_addr : ether_addr; size 262144; flags dynamic,timeout; timeout 60s;"),
    (TableFamily::Ip, "map", "ps", "type ipv4_addr . inet_service : ether_addr; size 1048576; flags dynamic,timeout; timeout 30s;"),
    (TableFamily::Ip, "map", "pm", "type ipv4_addr : mark; flags dynamic,timeout; timeout 30s; size 1048576;"),
    (TableFamily::Ip, "set", "cnt", "type ipv4_addr; counter;"),
    (TableFamily::Ip, "set", "port", "type inet_service;"),
    (TableFamily::Ip, "set", "pr", "type inet_proto;"),
    (TableFamily::Ip, "map", "ea", "type ether_addr . inet_proto : ipv4_addr . inet_service;"),
    (TableFamily::Ip, "map", "ifm", "type ifname : mark;"),
    (TableFamily::Ip6, "map", "svcx", "type inet_proto . ipv6_addr . inet_service : verdict;"),
    (TableFamily::Ip6, "map", "bk6", "type mark : ipv6_addr . inet_service;"),
    (TableFamily::Ip6, "set", "a6", "type ipv6_addr;"),
    (TableFamily::Ip6, "map", "e6", "type ipv6_addr . inet_service : ether_addr;"),
    (TableFamily::Ip6, "map", "m6", "type mark : ipv6_addr;"),
    (TableFamily::Netdev, "map", "cl4", "type ipv4_addr : ether_addr; size 262144; flags dynamic,timeout; timeout 60s;"),
    (TableFamily::Netdev, "set", "n6", "type ipv6_addr . inet_service;"),
];

/// Chains that verdict maps point at (regular chains, in ip and ip6).
const CHAINS: &[&str] = &["farm-d", "farm-e"];

fn spec_of(fam: TableFamily, name: &str) -> Option<String> {
    SETS.iter()
        .find(|(f, _, n, _)| *f == fam && *n == name)
        .map(|(_, _, _, s)| s.to_string())
}

/// Our tables with the test sets, empty.
fn declarations() -> String {
    let mut s = String::new();
    for fam in [TableFamily::Ip, TableFamily::Ip6, TableFamily::Netdev] {
        let f = fam.as_str();
        s += &format!("add table {f} nftlb\n");
        if fam != TableFamily::Netdev {
            for c in CHAINS {
                s += &format!("add chain {f} nftlb {c}\n");
            }
        }
        for (sf, kind, name, spec) in SETS {
            if *sf == fam {
                s += &format!("add {kind} {f} nftlb {name} {{ {spec} }}\n");
            }
        }
    }
    s
}

/// `nft -f -` inside the namespace.
fn nft_apply(ns: &NetNs, text: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to nft");
    let out = child.wait_with_output().expect("wait for nft");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Our three tables as nft lists them, with each set's elements sorted (listing order
/// follows the kernel's per-set hash seeds) and `expires` countdowns removed.
fn listing(ns: &NetNs) -> String {
    let mut out = String::new();
    for fam in ["ip", "ip6", "netdev"] {
        let text = ns.nft(&["list", "table", fam, "nftlb"]);
        out += &normalize(&text);
    }
    out
}

fn normalize(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("elements = {") {
        out += &rest[..i];
        let after = &rest[i + "elements = {".len()..];
        let end = after.find('}').expect("closing brace");
        let mut elems: Vec<String> = after[..end]
            .split(',')
            .map(|e| {
                let words: Vec<&str> = e.split_whitespace().collect();
                let mut kept = Vec::new();
                let mut skip = false;
                for w in words {
                    if skip {
                        skip = false;
                        continue;
                    }
                    if w == "expires" {
                        skip = true;
                        continue;
                    }
                    kept.push(w);
                }
                kept.join(" ")
            })
            .filter(|e| !e.is_empty())
            .collect();
        elems.sort();
        out += &format!("elements = {{ {} }}", elems.join(", "));
        rest = &after[end + 1..];
    }
    out += rest;
    out
}

fn cmds(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn batch(commands: &[String]) -> ElementBatch {
    encode(commands, spec_of).unwrap_or_else(|| panic!("should be encodable: {commands:#?}"))
}

/// Two namespaces with the same empty sets; a writer in the first.
fn pair() -> (NetNs, NetNs, NetlinkWriter) {
    let a = NetNs::new("nla");
    let b = NetNs::new("nlb");
    let decl = declarations();
    nft_apply(&a, &decl).expect("declare in a");
    nft_apply(&b, &decl).expect("declare in b");
    let w = a.run(|| NetlinkWriter::new().expect("netlink socket"));
    (a, b, w)
}

/// The steps of `netlink_matches_nft`: every supported type, adds then changes.
fn steps() -> Vec<Vec<String>> {
    let protos = [
        "icmp", "igmp", "tcp", "udp", "dccp", "gre", "esp", "ah", "sctp", "udplite", "0", "255",
        "58",
    ];
    let pr = format!("add element ip nftlb pr {{ {} }}", protos.join(", "));
    let svc: Vec<String> = protos
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let v = match i % 6 {
                0 => "accept".to_string(),
                1 => "drop".to_string(),
                2 => "continue".to_string(),
                3 => "return".to_string(),
                4 => "jump farm-d".to_string(),
                _ => "goto farm-e".to_string(),
            };
            format!("{p} . 198.18.0.{} . {} : {v}", 100 + i, 80 + i)
        })
        .collect();
    let svc = format!("add element ip nftlb svc {{ {} }}", svc.join(", "));
    vec![
        vec![
            "add element ip nftlb bk { 0x00000010 : 198.18.1.11 . 80, 0x00000011 : 198.18.1.12 . 80, 0xffffffff : 198.18.1.255 . 65535, 0 : 198.18.0.0 . 0 }".into(),
            svc,
            "add element ip nftlb svp { tcp . 80 : goto farm-d, udp . 53 : jump farm-e, sctp . 9 : drop }".into(),
            "add element ip nftlb gen { 0x00000007, 0x00000008, 4294967295 }".into(),
            "add element ip nftlb mv { 0x00000001 : goto farm-d, 0x00000002 : accept, 3 : drop }".into(),
            "add element ip nftlb mm { 0x1 : 0x80000000, 0x2 : 0x00000002 }".into(),
            "add element ip nftlb fb { 0x00000010 . 0 : 0x00000012, 0x00000010 . 15 : 0x80000013, 0x7fff0000 . 65535 : 0x1 }".into(),
            "add element ip nftlb cl { 198.18.0.5 : 02:00:00:aa:bb:cc, 198.18.0.6 : 02:00:00:AA:BB:CD }".into(),
            "add element ip nftlb ps { 198.18.0.5 . 443 : 02:00:00:aa:bb:cc }".into(),
            "add element ip nftlb pm { 198.18.0.5 : 0x00000010 }".into(),
            "add element ip nftlb cnt { 198.18.0.5, 198.18.0.6 }".into(),
            "add element ip nftlb port { 0, 80, 443, 65535 }".into(),
            pr,
            "add element ip nftlb ea { 02:00:00:aa:bb:cc . tcp : 198.18.1.11 . 80, 02:00:00:aa:bb:cd . 17 : 198.18.1.12 . 53 }".into(),
            "add element ip nftlb ifm { \"eth0\" : 0x1, \"lo\" : 0x2, \"veth-a.100\" : 0x3 }".into(),
            "add element ip6 nftlb svcx { tcp . 2001:2::100 . 443 : goto farm-d, udp . 2001:2::100 . 443 : goto farm-d, tcp . 2001:2::ffff:1 . 80 : accept }".into(),
            "add element ip6 nftlb bk6 { 0x00000010 : 2001:2::11 . 80, 0x00000011 : 2001:2:0:1::12 . 8080 }".into(),
            "add element ip6 nftlb a6 { 2001:2::1, 2001:2::, ::ffff:198.18.0.1 }".into(),
            "add element ip6 nftlb e6 { 2001:2::1 . 80 : 02:00:00:aa:bb:cc }".into(),
            "add element ip6 nftlb m6 { 0x1 : 2001:2::1 }".into(),
            "add element netdev nftlb cl4 { 198.18.0.7 : 02:00:00:aa:bb:ce }".into(),
            "add element netdev nftlb n6 { 2001:2::7 . 22 }".into(),
        ],
        // A backend change: delete then re-add with a new value, in one transaction.
        vec![
            "delete element ip nftlb bk { 0x00000010 }".into(),
            "add element ip nftlb bk { 0x00000010 : 198.18.1.21 . 8080, 0x00000012 : 198.18.1.13 . 80 }".into(),
            "delete element ip6 nftlb svcx { tcp . 2001:2::100 . 443 }".into(),
            "add element ip6 nftlb svcx { tcp . 2001:2::100 . 443 : goto farm-e, sctp . 2001:2::100 . 443 : goto farm-d }".into(),
            "delete element ip nftlb gen { 0x00000007 }".into(),
            "add element ip nftlb gen { 0x00000009 }".into(),
            "delete element ip nftlb fb { 0x00000010 . 15 }".into(),
            "add element ip nftlb fb { 0x00000010 . 15 : 0x00000014 }".into(),
            "delete element ip nftlb mv { 0x00000001 }".into(),
            "add element ip nftlb mv { 0x00000001 : goto farm-e }".into(),
            "delete element ip nftlb cl { 198.18.0.5 }".into(),
            "delete element ip nftlb cnt { 198.18.0.5 }".into(),
            "delete element ip nftlb port { 0 }".into(),
            "delete element ip nftlb ea { 02:00:00:aa:bb:cc . tcp }".into(),
            "delete element ip nftlb ifm { \"lo\" }".into(),
            "delete element ip6 nftlb a6 { 2001:2:: }".into(),
            "delete element netdev nftlb n6 { 2001:2::7 . 22 }".into(),
        ],
        // Adding what is there (same value) is accepted, as with nft.
        vec!["add element ip nftlb gen { 0x00000008 }".into()],
        // Everything removed.
        vec![
            "delete element ip nftlb bk { 0x00000010, 0x00000011, 0x00000012, 0xffffffff, 0 }".into(),
            "delete element ip nftlb svp { tcp . 80, udp . 53, sctp . 9 }".into(),
            "delete element ip nftlb mv { 1, 2, 3 }".into(),
        ],
    ]
}

#[test]
fn netlink_matches_nft() {
    let (a, b, mut w) = pair();
    assert_eq!(listing(&a), listing(&b));
    for (i, step) in steps().iter().enumerate() {
        let bt = batch(step);
        w.apply(&bt)
            .unwrap_or_else(|e| panic!("step {i}: netlink apply failed: {e}"));
        nft_apply(&b, &(step.join("\n") + "\n"))
            .unwrap_or_else(|e| panic!("step {i}: nft failed: {e}"));
        let (la, lb) = (listing(&a), listing(&b));
        assert_eq!(la, lb, "step {i}: listings differ");
        assert!(la.contains("elements"), "step {i}: nothing listed:\n{la}");
    }
    // The verdict map points at the chain; the chain cannot go while it does.
    let text = a.nft(&["list", "map", "ip", "nftlb", "svc"]);
    assert!(text.contains("goto farm-e"), "{text}");
    assert!(nft_apply(&a, "delete chain ip nftlb farm-e\n").is_err());
}

/// One failing command: the kernel applies nothing of the batch, and the error names
/// the command and the errno.
#[test]
fn rejected_batch_changes_nothing() {
    let (a, _b, mut w) = pair();
    w.apply(&batch(&cmds(&[
        "add element ip nftlb gen { 0x00000001, 0x00000002 }",
        "add element ip nftlb bk { 0x00000001 : 198.18.1.11 . 80 }",
    ])))
    .expect("first batch");
    let before = listing(&a);

    let cases: &[(&[&str], &str, &str)] = &[
        (
            &[
                "add element ip nftlb gen { 0x00000003 }",
                "delete element ip nftlb bk { 0x00000001 }",
                "delete element ip nftlb gen { 0x00000099 }",
            ],
            "delete element ip nftlb gen { 0x00000099 }",
            "No such file or directory",
        ),
        (
            &[
                "delete element ip nftlb gen { 0x00000001 }",
                "add element ip nftlb mv { 0x00000005 : goto no-such-chain }",
            ],
            "goto no-such-chain",
            "No such file or directory",
        ),
        (
            // Same key, another value: the kernel refuses to overwrite.
            &[
                "add element ip nftlb gen { 0x00000004 }",
                "add element ip nftlb bk { 0x00000001 : 198.18.1.99 . 80 }",
            ],
            "add element ip nftlb bk",
            "File exists",
        ),
    ];
    for (commands, culprit, errno) in cases {
        let err = w
            .apply(&batch(&cmds(commands)))
            .expect_err("must be rejected");
        let KernelError::Rejected(text) = &err else {
            panic!("expected Rejected, got {err:?}");
        };
        assert!(text.contains(culprit), "{text}");
        assert!(text.contains(errno), "{text}");
        assert_eq!(listing(&a), before, "a rejected batch changed the kernel");
        // nft agrees that this transaction is refused.
        assert!(nft_apply(&a, &(commands.join("\n") + "\n")).is_err());
        assert_eq!(listing(&a), before);
    }
    // A set the kernel does not have (the caller's view is stale).
    let stale = encode(&cmds(&["add element ip nftlb gone { 0x1 }"]), |_, _| {
        Some("type mark;".to_string())
    })
    .unwrap();
    assert!(matches!(w.apply(&stale), Err(KernelError::Rejected(_))));
    // The writer is still usable afterwards.
    w.apply(&batch(&cmds(&["add element ip nftlb gen { 0x00000005 }"])))
        .expect("after rejections");
    assert!(a
        .nft(&["list", "set", "ip", "nftlb", "gen"])
        .contains("0x00000005"));
}

/// A large transaction (several thousand elements, split across messages like
/// libnftnl does) gives the same kernel state as nft.
#[test]
fn large_transaction_matches_nft() {
    let (a, b, mut w) = pair();
    let elems: Vec<String> = (0..3000u32)
        .map(|i| {
            format!(
                "tcp . 2001:2::{:x}:{:x} . {} : goto farm-d",
                i / 256 + 1,
                i % 256 + 1,
                1 + i % 60000
            )
        })
        .collect();
    let step: Vec<String> = elems
        .chunks(1500)
        .map(|c| format!("add element ip6 nftlb svcx {{ {} }}", c.join(", ")))
        .collect();
    let bt = batch(&step);
    assert!(
        bt.messages() > step.len(),
        "expected a split: {}",
        bt.messages()
    );
    w.apply(&bt).expect("netlink");
    nft_apply(&b, &(step.join("\n") + "\n")).expect("nft");
    assert_eq!(listing(&a), listing(&b));
}

/// Not asserted: one-element changes with a 100,000-element map present.
#[test]
fn one_element_time_with_large_map() {
    let ns = NetNs::new("nlt");
    let mut text = String::from(
        "add table ip nftlb\nadd map ip nftlb bk { type mark : ipv4_addr . inet_service; }\n",
    );
    for chunk in (0..100_000u32).collect::<Vec<_>>().chunks(10_000) {
        let e: Vec<String> = chunk
            .iter()
            .map(|i| format!("{i} : 198.18.{}.{} . 80", (i >> 8) & 0xff, i & 0xff))
            .collect();
        text += &format!("add element ip nftlb bk {{ {} }}\n", e.join(", "));
    }
    nft_apply(&ns, &text).expect("fill the map");
    let spec = |_: TableFamily, n: &str| {
        (n == "bk").then(|| "type mark : ipv4_addr . inet_service;".to_string())
    };
    let mut w = ns.run(|| NetlinkWriter::new().expect("netlink socket"));
    let rounds = 500;
    let mut times = Vec::with_capacity(rounds);
    let mut enc = Duration::ZERO;
    for r in 0..rounds {
        let key = 200_000 + (r as u32 % 2);
        let c = if r % 4 < 2 {
            format!("add element ip nftlb bk {{ {key} : 198.18.1.11 . 80 }}")
        } else {
            format!("delete element ip nftlb bk {{ {key} }}")
        };
        let t0 = Instant::now();
        let bt = encode(&[c], spec).expect("encodable");
        let t1 = Instant::now();
        w.apply(&bt).expect("apply");
        times.push(t1.elapsed());
        enc += t1 - t0;
    }
    times.sort();
    let t_nft = Instant::now();
    nft_apply(
        &ns,
        "add element ip nftlb bk { 300000 : 198.18.1.11 . 80 }\n",
    )
    .expect("nft");
    let t_nft = t_nft.elapsed();
    eprintln!(
        "one-element netlink apply with a 100000-element map ({rounds} rounds): \
         min {:?}, median {:?}, p99 {:?}, max {:?}; encode mean {:?}; \
         for comparison one `nft -f -` process: {:?}",
        times[0],
        times[rounds / 2],
        times[rounds * 99 / 100],
        times[rounds - 1],
        enc / rounds as u32,
        t_nft
    );
}
