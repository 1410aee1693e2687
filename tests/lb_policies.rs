//! Policies (blacklists and whitelists) with real traffic: attachment to farms and
//! to standalone addresses, per-element counters, attachment order, element changes
//! (PATCH replace, DELETE with a body, DELETE by path), IPv6, and a large policy.
//!
//! Client addresses (all on the client namespace, chosen with a source bind):
//! 198.18.0.2 (default), 198.18.0.3 (listed alone), 198.18.0.66 (inside the listed
//! network 198.18.0.64/26) and 198.18.0.130 (never listed).

mod common;

use common::sec::*;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const VIP: &str = "198.18.0.100";
const VIP6: &str = "2001:2::100";
const A: &str = CLI4; // 198.18.0.2
const B: &str = "198.18.0.3";
const N: &str = "198.18.0.66";
const NET: &str = "198.18.0.64/26";
const OTHER: &str = "198.18.0.130";

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn lab() -> Lab {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    for a in [B, N, OTHER] {
        lab.add_client_addr(a);
    }
    lab.serve_tcp(80);
    lab
}

fn web(policies: &[&str]) -> Value {
    let mut doc = web_farm_doc(VIP, &[], v4_backends(2));
    if !policies.is_empty() {
        doc["farms"][0]["policies"] = policy_refs(policies);
    }
    doc
}

#[test]
fn blacklist_drops_listed_address_and_network_and_counts_them() {
    let lab = lab();
    let d = Daemon::start(&lab.lb);
    d.apply(&web(&[]));
    // Everyone is served before the policy is attached.
    for c in [A, B, N, OTHER] {
        served(&lab, c, VIP, 80, "no policy attached");
    }

    call_ok(
        &d,
        "POST",
        "/policies",
        Some(&policy_doc("bl", "blacklist", "ipv4", &[B, NET])),
    );
    d.apply(&web(&["bl"]));

    served(&lab, A, VIP, 80, "unlisted client with blacklist");
    served(&lab, OTHER, VIP, 80, "unlisted client with blacklist");
    refused(&lab, B, VIP, 80, "blacklisted address");
    refused(&lab, N, VIP, 80, "address inside a blacklisted network");
    served(&lab, A, VIP, 80, "unlisted client after blocked ones");

    // GET shows the policy with per-element kernel counters.
    let p = get_policy(&d, "bl");
    assert_eq!(p["type"], "blacklist", "{p}");
    assert_eq!(p["family"], "ipv4", "{p}");
    assert_eq!(
        element_data(&p),
        vec![B.to_string(), NET.to_string()],
        "{p}"
    );
    let (pk, by) = element_counters(&p, B);
    assert!(
        pk >= 1 && by >= 40,
        "element {B} must have counted the dropped SYN: {p}"
    );
    let (pk, by) = element_counters(&p, NET);
    assert!(
        pk >= 1 && by >= 40,
        "element {NET} must have counted the dropped SYN: {p}"
    );
    assert_eq!(as_u64(&p["used"]), Some(1), "used by one farm: {p}");

    // The farm lists the attached policy.
    let f = d.farm("web");
    assert_eq!(f["policies"][0]["name"], "bl", "GET farm: {f}");
    // ...with the farm's own counter of the policy's matches (B and N were dropped).
    let farm_pk = as_u64(&f["policies"][0]["counter-packets"]);
    assert!(
        farm_pk.is_some_and(|n| n >= 2),
        "the farm's counter of policy bl must count the dropped SYNs of {B} and {N}: {f}"
    );

    // Detaching the policy lets the blocked client in again.
    d.delete_ok("/farms/web/policies/bl");
    served(&lab, B, VIP, 80, "after detaching the blacklist");
    served(&lab, N, VIP, 80, "after detaching the blacklist");
}

#[test]
fn whitelist_admits_only_its_members() {
    let lab = lab();
    let d = Daemon::start(&lab.lb);
    call_ok(
        &d,
        "POST",
        "/policies",
        Some(&policy_doc("wl", "whitelist", "ipv4", &[B, NET])),
    );
    d.apply(&web(&["wl"]));

    served(&lab, B, VIP, 80, "whitelisted address");
    served(&lab, N, VIP, 80, "address inside a whitelisted network");
    refused(&lab, A, VIP, 80, "client not in the whitelist");
    refused(&lab, OTHER, VIP, 80, "client not in the whitelist");

    let p = get_policy(&d, "wl");
    assert_eq!(p["type"], "whitelist", "{p}");
    let (pk, _) = element_counters(&p, B);
    assert!(
        pk >= 1,
        "whitelisted element {B} must count its packets: {p}"
    );

    // Adding a member admits it.
    call_ok(
        &d,
        "POST",
        "/policies",
        Some(&json!({"policies":[{"name":"wl","elements":[{"data": A}]}]})),
    );
    served(&lab, A, VIP, 80, "client added to the whitelist");
    refused(&lab, OTHER, VIP, 80, "client still not in the whitelist");
}

/// The names of the policies a farm document lists, in order.
fn attached_policies(farm: &Value) -> Vec<&str> {
    farm["policies"]
        .as_array()
        .expect("farm document has a policies array")
        .iter()
        .map(|p| p["name"].as_str().unwrap_or(""))
        .collect()
}

/// Policies are evaluated in attachment order and the first match decides: a
/// whitelist match accepts (later blacklists are not consulted), a blacklist match
/// drops; a client that matches no whitelist is not admitted.
#[test]
fn policies_apply_in_attachment_order() {
    let lab = lab();
    let d = Daemon::start(&lab.lb);
    call_ok(
        &d,
        "POST",
        "/policies",
        Some(&json!({"policies":[
            {"name":"wl","type":"whitelist","family":"ipv4","elements":[{"data":"198.18.0.0/25"}]},
            {"name":"bl","type":"blacklist","family":"ipv4","elements":[{"data": B}]}
        ]})),
    );

    d.apply(&web(&["wl", "bl"]));
    let f = d.farm("web");
    let order = attached_policies(&f);
    assert_eq!(order, vec!["wl", "bl"], "GET farm policies: {f}");
    served(&lab, A, VIP, 80, "[wl, bl]: whitelisted");
    served(
        &lab,
        B,
        VIP,
        80,
        "[wl, bl]: whitelisted first, so the blacklist is not reached",
    );
    refused(&lab, OTHER, VIP, 80, "[wl, bl]: not whitelisted");

    // Replace the attached list with the opposite order.
    call_ok(
        &d,
        "PATCH",
        "/farms/web/policies",
        Some(&json!({"farms":[{"name":"web","policies":[{"name":"bl"},{"name":"wl"}]}]})),
    );
    let f = d.farm("web");
    let order = attached_policies(&f);
    assert_eq!(
        order,
        vec!["bl", "wl"],
        "GET farm policies after PATCH: {f}"
    );
    served(&lab, A, VIP, 80, "[bl, wl]: whitelisted, not blacklisted");
    refused(&lab, B, VIP, 80, "[bl, wl]: blacklisted first");
    refused(&lab, OTHER, VIP, 80, "[bl, wl]: not whitelisted");
}

#[test]
fn patch_replaces_the_elements() {
    let lab = lab();
    let d = Daemon::start(&lab.lb);
    call_ok(
        &d,
        "POST",
        "/policies",
        Some(&policy_doc("bl", "blacklist", "ipv4", &[B, OTHER])),
    );
    d.apply(&web(&["bl"]));
    refused(&lab, B, VIP, 80, "before PATCH");
    refused(&lab, OTHER, VIP, 80, "before PATCH");
    served(&lab, A, VIP, 80, "before PATCH");

    // Exactly the elements in the body afterwards: B leaves, A joins, OTHER stays.
    call_ok(
        &d,
        "PATCH",
        "/policies/bl/elements",
        Some(&json!({"policies":[{"name":"bl","elements":[{"data": A},{"data": OTHER}]}]})),
    );
    served(&lab, B, VIP, 80, "old member after PATCH");
    refused(&lab, A, VIP, 80, "new member after PATCH");
    refused(&lab, OTHER, VIP, 80, "member kept by PATCH");
    let p = get_policy(&d, "bl");
    assert_eq!(
        element_data(&p),
        sorted(&[A, OTHER]),
        "GET after PATCH: {p}"
    );

    // PATCH of an unknown policy is 404 and changes nothing.
    let (st, body) = call(
        &d,
        "PATCH",
        "/policies/nope/elements",
        Some(&json!({"policies":[{"name":"nope","elements":[{"data": B}]}]})),
    );
    assert_eq!(st, 404, "PATCH unknown policy: {body}");
    served(&lab, B, VIP, 80, "after a rejected PATCH");
    refused(&lab, A, VIP, 80, "after a rejected PATCH");
}

#[test]
fn delete_with_a_body_and_element_paths_remove_elements() {
    let lab = lab();
    let d = Daemon::start(&lab.lb);
    call_ok(
        &d,
        "POST",
        "/policies",
        Some(&policy_doc("bl", "blacklist", "ipv4", &[A, B, NET])),
    );
    // The second client we keep blocked is OTHER, listed through a later POST.
    call_ok(
        &d,
        "POST",
        "/policies",
        Some(&json!({"policies":[{"name":"bl","elements":[{"data": OTHER}]}]})),
    );
    d.apply(&web(&["bl"]));
    for c in [A, B, N, OTHER] {
        refused(&lab, c, VIP, 80, "all listed");
    }

    // DELETE with a body removes the listed elements only.
    call_ok(
        &d,
        "DELETE",
        "/policies",
        Some(&json!({"policies":[{"name":"bl","elements":[{"data": A}]}]})),
    );
    served(&lab, A, VIP, 80, "removed by DELETE with a body");
    refused(&lab, B, VIP, 80, "kept");

    // DELETE /policies/NAME/elements/ADDR
    d.delete_ok(&format!("/policies/bl/elements/{B}"));
    served(&lab, B, VIP, 80, "removed by DELETE .../elements/ADDR");
    refused(&lab, N, VIP, 80, "network kept");

    // DELETE /policies/NAME/elements/NET/PREFIX
    d.delete_ok(&format!("/policies/bl/elements/{NET}"));
    served(
        &lab,
        N,
        VIP,
        80,
        "removed by DELETE .../elements/NET/PREFIX",
    );
    refused(&lab, OTHER, VIP, 80, "still listed");
    let p = get_policy(&d, "bl");
    assert_eq!(element_data(&p), vec![OTHER.to_string()], "GET: {p}");

    // An unknown element is an error and changes nothing.
    let (st, body) = d.delete(&format!("/policies/bl/elements/{A}"));
    assert!(
        (400..500).contains(&st),
        "deleting an absent element: {st} {body}"
    );
    refused(&lab, OTHER, VIP, 80, "after a rejected DELETE");

    // DELETE /policies/NAME/elements flushes the set.
    d.delete_ok("/policies/bl/elements");
    served(&lab, OTHER, VIP, 80, "after flushing the elements");
    assert_eq!(element_data(&get_policy(&d, "bl")), Vec::<String>::new());
}

#[test]
fn policy_on_a_standalone_address_filters_without_a_farm() {
    let lab = lab();
    // A local service on the VIP in the load balancer namespace (no farm at all).
    lab.keep(tcp_server(&lab.lb, "lbsrv", 80, TcpMode::Close));
    let d = Daemon::start(&lab.lb);
    assert_eq!(served(&lab, B, VIP, 80, "no policy"), "lbsrv");

    call_ok(
        &d,
        "POST",
        "/policies",
        Some(&policy_doc("bl", "blacklist", "ipv4", &[B])),
    );
    call_ok(
        &d,
        "POST",
        "/addresses",
        Some(&json!({"addresses":[{
            "name":"a1","family":"ipv4","ip-addr": VIP,"ports":"80","protocol":"tcp",
            "policies":[{"name":"bl"}]
        }]})),
    );
    assert_eq!(served(&lab, A, VIP, 80, "unlisted"), "lbsrv");
    refused(&lab, B, VIP, 80, "blacklisted on a standalone address");
    let (st, body) = d.get("/addresses/a1");
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["addresses"][0]["policies"][0]["name"], "bl", "{body}");

    // Deleting the address lifts the filter.
    d.delete_ok("/addresses/a1");
    assert_eq!(served(&lab, B, VIP, 80, "address deleted"), "lbsrv");
}

#[test]
fn ipv6_blacklist_on_an_ipv6_farm() {
    let lab = Lab::new(2);
    lab.add_vip(VIP6);
    lab.add_client_addr("2001:2::3");
    lab.add_client_addr("2001:2::42");
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    call_ok(
        &d,
        "POST",
        "/policies",
        Some(&policy_doc(
            "bl6",
            "blacklist",
            "ipv6",
            &["2001:2::3", "2001:2::40/124"],
        )),
    );
    let mut f = farm(
        "web6",
        &[
            ("family", "ipv6"),
            ("virtual-addr", VIP6),
            ("virtual-ports", "80"),
            ("protocol", "tcp"),
            ("mode", "dnat"),
            ("scheduler", "rr"),
        ],
        v6_backends(2),
    );
    f["policies"] = policy_refs(&["bl6"]);
    d.apply(&farms_doc(f));

    served(&lab, CLI6, VIP6, 80, "unlisted IPv6 client");
    refused(&lab, "2001:2::3", VIP6, 80, "blacklisted IPv6 address");
    refused(
        &lab,
        "2001:2::42",
        VIP6,
        80,
        "address inside a blacklisted IPv6 network",
    );
    let p = get_policy(&d, "bl6");
    assert_eq!(p["family"], "ipv6", "{p}");
    let (pk, _) = element_counters(&p, "2001:2::3");
    assert!(pk >= 1, "IPv6 element counter: {p}");
}

/// 100,000 elements in one POST load within a generous bound and still filter.
/// (IPv6, so that 100,000 non-adjacent elements fit in the test range 2001:2::/48;
/// adjacent IPv4 addresses would be merged into ranges by the interval set.)
#[test]
fn large_policy_loads_in_one_post_and_still_blocks() {
    const COUNT: usize = 100_000;
    let lab = Lab::new(2);
    lab.add_vip(VIP6);
    lab.add_client_addr("2001:2::3");
    lab.serve_tcp(80);
    let d = Daemon::start(&lab.lb);
    call_ok(
        &d,
        "POST",
        "/policies",
        Some(&policy_doc("big", "blacklist", "ipv6", &[])),
    );
    let mut f = farm(
        "web6",
        &[
            ("family", "ipv6"),
            ("virtual-addr", VIP6),
            ("virtual-ports", "80"),
            ("protocol", "tcp"),
            ("mode", "dnat"),
            ("scheduler", "rr"),
        ],
        v6_backends(2),
    );
    f["policies"] = policy_refs(&["big"]);
    d.apply(&farms_doc(f));
    served(&lab, "2001:2::3", VIP6, 80, "empty policy");

    // COUNT - 1 spread elements (every other address of 2001:2:0:8::/64) plus the client.
    let mut els: Vec<Value> = (0..COUNT - 1)
        .map(|i| {
            let v = 2 * i as u32;
            json!({ "data": format!("2001:2:0:8::{:x}:{:x}", v >> 16, v & 0xffff) })
        })
        .collect();
    els.push(json!({"data": "2001:2::3"}));
    let body = json!({"policies":[{"name":"big","elements": els}]}).to_string();

    let t = Instant::now();
    let r = call_slow(
        &lab.lb,
        &d,
        "POST",
        "/policies",
        body.as_bytes(),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("POST of {COUNT} elements: {e}"));
    let took = t.elapsed();
    assert_eq!(
        r.status,
        200,
        "POST of {COUNT} elements: {}; log tail:\n{}",
        r.text(),
        tail(&d.log(), 3000)
    );
    eprintln!("POST of {COUNT} policy elements took {took:?}");
    assert!(
        took < Duration::from_secs(30),
        "loading {COUNT} elements took {took:?} (bound 30 s)"
    );

    refused(&lab, "2001:2::3", VIP6, 80, "member of the large policy");
    served(&lab, CLI6, VIP6, 80, "not a member of the large policy");

    let t = Instant::now();
    let r = call_slow(
        &lab.lb,
        &d,
        "GET",
        "/policies/big",
        b"",
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("GET /policies/big: {e}"));
    assert_eq!(r.status, 200, "GET /policies/big: {}", tail(&r.text(), 500));
    let p = r.json();
    let n = p["policies"][0]["elements"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0);
    eprintln!("GET of {n} elements took {:?}", t.elapsed());
    assert_eq!(n, COUNT, "GET /policies/big element count");
}
