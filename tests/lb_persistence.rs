//! Persistence and sessions with real traffic: `srcip` stickiness and its TTL,
//! dynamic sessions in GET /farms/F/sessions and their deletion, static sessions,
//! backend `off` vs `down` for pinned clients, `srcip srcport`, and
//! DELETE /farms/F/backends/B/sessions.
//!
//! The farms use the rr scheduler over two backends. In nftlb the scheduler only runs
//! for flows that no session pinned (reference 4.7), so every *unpinned* new flow
//! takes the next rr bucket; the tests use that to predict where a client goes
//! once its session is gone.

mod common;

use common::sec::*;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const VIP: &str = "198.18.0.100";
const A: &str = CLI4; // 198.18.0.2
const B: &str = "198.18.0.3";
const C: &str = "198.18.0.4";

fn web(persistence: &str, ttl: &str) -> Value {
    web_farm_doc(
        VIP,
        &[("persistence", persistence), ("persist-ttl", ttl)],
        v4_backends(2),
    )
}

fn lab() -> Lab {
    let lab = Lab::new(2);
    lab.add_vip(VIP);
    lab.add_client_addr(B);
    lab.add_client_addr(C);
    lab.serve_tcp(80);
    lab
}

/// `n` sequential connections from `src`; all must be served.
fn from(lab: &Lab, src: &str, n: usize) -> Vec<String> {
    names(&lab.tcp_many_from(src, VIP, 80, n))
}

/// All connections from `src` land on one backend; returns it.
fn sticky(lab: &Lab, src: &str, n: usize, what: &str) -> String {
    let got = from(lab, src, n);
    assert!(
        got.iter().all(|b| *b == got[0]),
        "{what}: all {n} connections from {src} must land on one backend: {got:?}"
    );
    got[0].clone()
}

fn other(b: &str) -> &'static str {
    if b == "be1" {
        "be2"
    } else {
        "be1"
    }
}

#[test]
fn srcip_persistence_pins_each_client_until_the_ttl_expires() {
    let lab = lab();
    let d = Daemon::start(&lab.lb);
    d.apply(&web("srcip", "3"));
    let f = d.farm("web");
    assert_eq!(
        f["persistence"].as_str().map(str::trim),
        Some("srcip"),
        "{f}"
    );
    assert_eq!(f["persist-ttl"], "3", "{f}");

    let a = sticky(&lab, A, 8, "client A");
    // The next unpinned flow takes the other rr bucket.
    let b = sticky(&lab, B, 8, "client B");
    assert_ne!(
        a, b,
        "with rr, the second client's first flow goes to the other backend"
    );
    // Interleaved, both stay where they are.
    for _ in 0..3 {
        assert_eq!(from(&lab, A, 1)[0], a);
        assert_eq!(from(&lab, B, 1)[0], b);
    }

    // GET lists the dynamic sessions with the client, the backend name and an expiration.
    let s = sessions(&d, "web");
    let sa = session_of(&s, A).unwrap_or_else(|| panic!("no session for {A}: {s:?}"));
    assert_eq!(sa["backend"], a.as_str(), "{sa}");
    let exp = sa["expiration"].as_str().unwrap_or("");
    assert!(
        exp.starts_with(|c: char| c.is_ascii_digit()),
        "dynamic session expiration must be a duration, got {sa}"
    );
    assert_eq!(
        session_of(&s, B).map(|x| x["backend"].clone()),
        Some(Value::from(b.as_str())),
        "{s:?}"
    );

    // After the TTL (3 s without traffic) the sessions are gone...
    let idle = Instant::now();
    assert!(
        wait_until(Duration::from_secs(8), || session_of(
            &sessions(&d, "web"),
            A
        )
        .is_none()),
        "the dynamic session of {A} must expire after persist-ttl 3 s"
    );
    assert!(
        idle.elapsed() >= Duration::from_millis(2500),
        "the session expired too early ({:?} after the last packet)",
        idle.elapsed()
    );
    // ...and the clients are scheduled afresh: one new client takes the next bucket
    // (the one A had), so A gets the other backend.
    let c = from(&lab, C, 1)[0].clone();
    assert_eq!(
        c, a,
        "rr: the first new flow after A and B goes where A went"
    );
    let a2 = sticky(&lab, A, 4, "client A after expiry");
    assert_eq!(
        a2,
        other(&a),
        "after the TTL, client A must be able to move"
    );
}

/// Proving that a session is gone without relying on the rr position: once the
/// backend is `off`, pinned clients keep it but unpinned ones are sent elsewhere.
#[test]
fn deleting_a_dynamic_session_unpins_only_that_client() {
    let lab = lab();
    let d = Daemon::start(&lab.lb);
    d.apply(&web("srcip", "60"));
    // rr: A -> bucket 0, B -> bucket 1, C -> bucket 2 (A's backend again).
    let a = sticky(&lab, A, 3, "client A");
    let b = sticky(&lab, B, 3, "client B");
    let c = sticky(&lab, C, 3, "client C");
    assert_ne!(a, b);
    assert_eq!(a, c, "rr: the third new client goes where the first went");
    assert!(session_of(&sessions(&d, "web"), A).is_some());

    d.delete_ok(&format!("/farms/web/sessions/{A}"));
    let s = sessions(&d, "web");
    assert!(
        session_of(&s, A).is_none(),
        "DELETE /farms/web/sessions/{A} must remove the dynamic session: {s:?}"
    );
    assert!(session_of(&s, C).is_some(), "other sessions stay: {s:?}");

    d.apply(&backend_patch("web", &a, "state", "off"));
    assert_eq!(
        sticky(&lab, C, 3, "client C, still pinned"),
        a,
        "C is still pinned to the `off` backend"
    );
    assert_eq!(
        sticky(&lab, A, 3, "client A, session deleted"),
        other(&a),
        "A's session was deleted, so A is a new client and avoids the `off` backend"
    );
    assert_eq!(
        session_of(&sessions(&d, "web"), A).map(|s| s["backend"].clone()),
        Some(Value::from(other(&a)))
    );
    // Deleting a session that does not exist (dynamic or static) is not an error
    // in nftlb; either way nothing else changes.
    let _ = d.delete("/farms/web/sessions/198.18.0.99");
    assert_eq!(sticky(&lab, C, 2, "client C"), a);
}

#[test]
fn static_sessions_pin_clients_to_their_backends() {
    let lab = lab();
    let d = Daemon::start(&lab.lb);
    let mut doc = web("srcip", "60");
    // A would get bucket 0 (be1) from rr: pin it to be2, and B to be1.
    doc["farms"][0]["sessions"] = json!([
        {"client": A, "backend": "be2"},
        {"client": B, "backend": "be1"}
    ]);
    d.apply(&doc);

    for _ in 0..3 {
        assert_eq!(
            from(&lab, A, 2),
            vec!["be2", "be2"],
            "static session {A} -> be2"
        );
        assert_eq!(
            from(&lab, B, 2),
            vec!["be1", "be1"],
            "static session {B} -> be1"
        );
    }
    let s = sessions(&d, "web");
    assert_eq!(
        session_of(&s, A).map(|x| x["backend"].clone()),
        Some(Value::from("be2")),
        "{s:?}"
    );
    assert!(
        session_of(&s, A).is_some_and(|x| x.get("expiration").is_none()),
        "a static session has no expiration: {s:?}"
    );
    let f = d.farm("web");
    assert!(
        f["sessions"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["client"] == A && x["backend"] == "be2")),
        "GET farm shows the static sessions: {f}"
    );

    // Re-pointing a static session moves the client.
    let mut change = farms_doc(json!({"name":"web"}));
    change["farms"][0]["sessions"] = json!([{"client": A, "backend": "be1"}]);
    d.apply(&change);
    assert_eq!(
        from(&lab, A, 2),
        vec!["be1", "be1"],
        "static session {A} -> be1"
    );

    // Deleting it leaves A to the scheduler (and dynamic persistence).
    d.delete_ok(&format!("/farms/web/sessions/{A}"));
    assert!(
        !d.farm("web")["sessions"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["client"] == A)),
        "static session of {A} deleted"
    );
    sticky(&lab, A, 3, "client A without its static session");
}

#[test]
fn off_keeps_pinned_clients_and_down_moves_them() {
    let lab = lab();
    let d = Daemon::start(&lab.lb);
    d.apply(&web("srcip", "60"));

    let pinned = sticky(&lab, A, 4, "client A");
    let rest = other(&pinned);

    d.apply(&backend_patch("web", &pinned, "state", "off"));
    assert_eq!(
        sticky(&lab, A, 4, "pinned client, backend off"),
        pinned,
        "a client pinned to an `off` backend keeps it"
    );
    for c in [B, C] {
        assert_eq!(
            sticky(&lab, c, 3, "new client, backend off"),
            rest,
            "a new client must not be sent to the `off` backend {pinned}"
        );
    }

    d.apply(&backend_patch("web", &pinned, "state", "down"));
    assert_eq!(
        sticky(&lab, A, 4, "pinned client, backend down"),
        rest,
        "a `down` backend loses its pinned clients"
    );
    assert!(
        sessions(&d, "web")
            .iter()
            .all(|s| s["backend"] != pinned.as_str()),
        "no session may point at the down backend"
    );
}

#[test]
fn srcip_srcport_persistence_makes_each_connection_independent() {
    let lab = lab();
    let d = Daemon::start(&lab.lb);
    d.apply(&web("srcip srcport", "60"));
    let got = from(&lab, A, 6);
    assert_eq!(
        counts(&got),
        expect_counts(&[("be1", 3), ("be2", 3)]),
        "each connection has its own source port, so rr alternates: {got:?}"
    );
    let s = sessions(&d, "web");
    let mine: Vec<&Value> = s
        .iter()
        .filter(|x| {
            x["client"]
                .as_str()
                .is_some_and(|c| c.starts_with(&format!("{A} . ")))
        })
        .collect();
    assert_eq!(
        mine.len(),
        6,
        "one dynamic session per connection, keyed '{A} . PORT': {s:?}"
    );

    // A session key with a port is deleted with '_' for spaces.
    let key = mine[0]["client"].as_str().unwrap().to_string();
    d.delete_ok(&format!("/farms/web/sessions/{}", key.replace(' ', "_")));
    assert!(
        session_of(&sessions(&d, "web"), &key).is_none(),
        "session {key:?} deleted"
    );
}

#[test]
fn deleting_a_backends_sessions_unpins_its_clients() {
    let lab = lab();
    let d = Daemon::start(&lab.lb);
    let mut doc = web("srcip", "60");
    doc["farms"][0]["sessions"] = json!([{"client": C, "backend": "be1"}]);
    d.apply(&doc);
    // rr: A -> bucket 0 (be1), B -> bucket 1 (be2); C is statically on be1.
    assert_eq!(sticky(&lab, A, 3, "client A"), "be1");
    assert_eq!(sticky(&lab, B, 3, "client B"), "be2");
    assert_eq!(sticky(&lab, C, 3, "client C (static)"), "be1");

    d.delete_ok("/farms/web/backends/be1/sessions");
    let s = sessions(&d, "web");
    assert!(
        s.iter().all(|x| x["backend"] != "be1"),
        "no session of be1 may be left: {s:?}"
    );
    assert_eq!(
        session_of(&s, B).map(|x| x["backend"].clone()),
        Some(Value::from("be2")),
        "sessions of other backends stay: {s:?}"
    );
    assert!(
        !d.farm("web")["sessions"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["client"] == C)),
        "the static session on be1 is deleted too"
    );

    // With be1 `off`, only clients still pinned to it would go there: none are.
    d.apply(&backend_patch("web", "be1", "state", "off"));
    assert_eq!(sticky(&lab, A, 3, "client A, unpinned"), "be2");
    assert_eq!(sticky(&lab, C, 3, "client C, static session gone"), "be2");
    assert_eq!(sticky(&lab, B, 2, "client B"), "be2");

    // A farm without persistence has no sessions to delete by backend.
    let mut f2 = web("none", "60");
    f2["farms"][0]["name"] = "plain".into();
    f2["farms"][0]["virtual-ports"] = "81".into();
    d.apply(&f2);
    let (st, body) = d.delete("/farms/plain/backends/be1/sessions");
    assert!((400..500).contains(&st), "{st} {body}");
}
