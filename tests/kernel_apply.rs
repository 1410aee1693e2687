//! The engine against a real kernel (in throwaway network namespaces, as root):
//! every incremental transaction is accepted, and after each step the kernel holds
//! exactly what a from-scratch start with the same state produces.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use nftlb::engine::{Engine, EngineConfig, Request};
use nftlb::kernel::netlink::{ElementBatch, NetlinkWriter};
use nftlb::kernel::{Kernel, KernelError};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace removed on drop.
struct Ns(String);

impl Ns {
    fn new() -> Ns {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "kernel tests need root (CI runs as root)"
        );
        let name = format!(
            "nlbk-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        Ns(name)
    }
    fn nft(&self, stdin: &str, args: &[&str]) -> Result<String, String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
    /// Our tables as nft lists them, with each table's maps and chains sorted by name
    /// (the kernel lists chains in creation order, which differs between histories).
    fn listing(&self) -> String {
        let mut s = String::new();
        for fam in ["ip", "ip6"] {
            let text = self
                .nft("", &["list", "table", fam, "nftlb"])
                .unwrap_or_default();
            let mut blocks: Vec<String> = Vec::new();
            for line in text.lines() {
                if line.starts_with("\t") && !line.starts_with("\t\t") && line.ends_with('{') {
                    blocks.push(String::new());
                }
                if let Some(b) = blocks.last_mut() {
                    if !line.trim().is_empty() && line != "}" {
                        b.push_str(line);
                        b.push('\n');
                    }
                }
            }
            // Element order in a listing depends on insertion history too: sort it.
            let blocks: Vec<String> = blocks
                .into_iter()
                .map(|b| {
                    if !b.starts_with("\tmap") && !b.starts_with("\tset") {
                        return b;
                    }
                    let mut head = Vec::new();
                    let mut elems = Vec::new();
                    let mut in_elems = false;
                    for l in b.lines() {
                        let t = l.trim();
                        if let Some(rest) = t.strip_prefix("elements = {") {
                            in_elems = true;
                            elems.push(rest.trim().to_string());
                        } else if in_elems {
                            elems.push(t.to_string());
                        } else {
                            head.push(l.to_string());
                        }
                    }
                    let mut elems: Vec<String> = elems
                        .iter()
                        .map(|e| {
                            e.trim_end_matches('}')
                                .trim()
                                .trim_end_matches(',')
                                .to_string()
                        })
                        .collect();
                    elems.sort();
                    format!("{}\n{}\n", head.join("\n"), elems.join("\n"))
                })
                .collect();
            let mut blocks = blocks;
            blocks.sort();
            s += &format!("table {fam} nftlb\n{}", blocks.concat());
        }
        s
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// `nft -f -` inside a namespace, and a netlink writer opened inside it.
struct NsKernel(String, Option<NetlinkWriter>);

impl NsKernel {
    fn new(ns: &str) -> NsKernel {
        // A netlink socket belongs to the namespace of the thread that opens it.
        let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        let w = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            NetlinkWriter::new().expect("netlink socket")
        })
        .join()
        .unwrap();
        NsKernel(ns.to_string(), Some(w))
    }
}

impl Kernel for NsKernel {
    fn apply(&mut self, commands: &str) -> Result<(), KernelError> {
        Ns(self.0.clone())
            .nft_keep(commands, &["-f", "-"])
            .map(|_| ())
            .map_err(KernelError::Rejected)
    }
    fn list(&mut self, command: &str) -> Result<String, KernelError> {
        Ns(self.0.clone())
            .nft_keep(command, &["-t", "-f", "-"])
            .map_err(KernelError::Rejected)
    }
    fn check(&mut self, commands: &str) -> Result<(), KernelError> {
        Ns(self.0.clone())
            .nft_keep(commands, &["-c", "-f", "-"])
            .map(|_| ())
            .map_err(KernelError::Rejected)
    }
    fn list_json(&mut self, command: &str) -> Result<serde_json::Value, KernelError> {
        let mut args = vec!["-j"];
        args.extend(command.split_whitespace());
        let out = Ns(self.0.clone())
            .nft_keep("", &args)
            .map_err(KernelError::Rejected)?;
        serde_json::from_str(&out).map_err(|e| KernelError::Unavailable(e.to_string()))
    }
    fn name(&self) -> &'static str {
        "netns-cli"
    }
    fn apply_elements(&mut self, batch: &ElementBatch) -> Option<Result<(), KernelError>> {
        Some(self.1.as_mut()?.apply(batch))
    }
    fn has_netlink(&self) -> bool {
        self.1.is_some()
    }
}

impl Ns {
    /// Runs nft without deleting the namespace afterwards (for temporary handles).
    fn nft_keep(self, stdin: &str, args: &[&str]) -> Result<String, String> {
        let r = self.nft(stdin, args);
        std::mem::forget(self);
        r
    }
}

fn engine(ns: &Ns) -> Engine {
    let mut e = Engine::new(
        Box::new(NsKernel::new(&ns.0)),
        None,
        EngineConfig {
            masquerade_mark: 0x8000_0000,
        },
    );
    e.start(None, false).expect("start");
    e
}

fn send(e: &mut Engine, method: &str, path: &str, body: &str) -> u16 {
    let r = e.handle(&Request {
        method: method.into(),
        path: path.into(),
        body: body.as_bytes().to_vec(),
    });
    assert!(r.status < 500, "{method} {path}: {}", r.body);
    r.status
}

/// The ruleset a daemon started afresh from `e`'s saved state puts in a new namespace
/// (started the way the daemon restarts: from the state file).
fn fresh_start_listing(e: &Engine) -> String {
    let b = Ns::new();
    let file = std::env::temp_dir().join(format!("{}.json", b.0));
    std::fs::write(&file, e.saved().to_string()).unwrap();
    let mut fresh = Engine::new(
        Box::new(NsKernel::new(&b.0)),
        Some(nftlb::store::Store::new(&file)),
        EngineConfig {
            masquerade_mark: 0x8000_0000,
        },
    );
    fresh.start(None, true).expect("fresh start");
    let _ = std::fs::remove_file(&file);
    b.listing()
}

#[test]
fn incremental_changes_equal_a_fresh_start() {
    let a = Ns::new();
    let mut e = engine(&a);
    let steps: Vec<(&str, &str, String)> = vec![
        ("POST", "/farms", r#"{"farms":[{"name":"web","virtual-addr":"198.18.0.100","virtual-ports":"80,443,8000-8100",
            "protocol":"all","scheduler":"weight","backends":[{"name":"a","ip-addr":"198.18.1.11","weight":"2"},
            {"name":"b","ip-addr":"198.18.1.12","weight":"3"}]}]}"#.into()),
        ("POST", "/farms", r#"{"farms":[{"name":"dns","family":"inet","virtual-ports":"53","protocol":"udp","mode":"dnat",
            "scheduler":"hash","sched-param":"srcip srcport","backends":[{"name":"v4","ip-addr":"198.18.1.21","port":"5353"},
            {"name":"v6","ip-addr":"2001:2:0:1::21","port":"5353"}]}]}"#.into()),
        ("POST", "/farms", r#"{"farms":[{"name":"web","source-addr":"198.18.1.2","backends":[{"name":"b","state":"off"},
            {"name":"c","ip-addr":"198.18.1.13","priority":"2","source-addr":"198.18.1.3"}]}]}"#.into()),
        ("POST", "/farms", r#"{"farms":[{"name":"v6","family":"ipv6","virtual-addr":"2001:2::100","virtual-ports":"443",
            "scheduler":"symhash","backends":[{"name":"a","ip-addr":"2001:2:0:1::11"}]}]}"#.into()),
        ("POST", "/farms", r#"{"farms":[{"name":"web","scheduler":"rr","backends":[{"name":"a","state":"down"}]}]}"#.into()),
        ("DELETE", "/farms/web/backends/a", String::new()),
        ("POST", "/farms", r#"{"farms":[{"name":"dns","state":"off"}]}"#.into()),
        ("POST", "/farms", r#"{"farms":[{"name":"v6","newname":"v6b"}]}"#.into()),
        ("DELETE", "/farms/web", String::new()),
        ("POST", "/farms", r#"{"farms":[{"name":"dns","state":"up","virtual-ports":"53,5300-5399"}]}"#.into()),
        // The only farm of a kind changes scheduler: its kind number is given back and
        // taken again for the new signature in one transaction (`kinds` element replaced,
        // one chain created and one deleted).
        ("POST", "/farms", r#"{"farms":[{"name":"dns","sched-param":"srcip"}]}"#.into()),
        // Backend changes of weight and hash farms: elements only.
        ("POST", "/farms", r#"{"farms":[{"name":"el","virtual-addr":"198.18.0.160","virtual-ports":"80",
            "scheduler":"weight","backends":[{"name":"a","ip-addr":"198.18.1.41"},{"name":"b","ip-addr":"198.18.1.42"},
            {"name":"c","ip-addr":"198.18.1.43"}]}]}"#.into()),
        ("POST", "/farms", r#"{"farms":[{"name":"el","backends":[{"name":"b","state":"down"}]}]}"#.into()),
        ("POST", "/farms", r#"{"farms":[{"name":"el","backends":[{"name":"b","state":"up"}]}]}"#.into()),
        ("POST", "/farms", r#"{"farms":[{"name":"el","backends":[{"name":"c","weight":"5"}]}]}"#.into()),
        ("POST", "/farms", r#"{"farms":[{"name":"el","scheduler":"hash","backends":[{"name":"a","state":"off"}]}]}"#.into()),
        ("POST", "/farms", r#"{"farms":[{"name":"el","backends":[{"name":"a","state":"up"}]}]}"#.into()),
        ("DELETE", "/farms/el", String::new()),
        // A top-level address used by a farm: changing the address re-renders the farm.
        ("POST", "/addresses", r#"{"addresses":[{"name":"shared","family":"ipv4","ip-addr":"198.18.0.150",
            "ports":"8080","protocol":"tcp"}]}"#.into()),
        ("POST", "/farms", r#"{"farms":[{"name":"s1","addresses":[{"name":"shared"}],
            "backends":[{"name":"a","ip-addr":"198.18.1.31"}]}]}"#.into()),
        ("POST", "/addresses", r#"{"addresses":[{"name":"shared","ports":"8081-8082","protocol":"udp"}]}"#.into()),
        ("DELETE", "/farms/s1", String::new()),
        ("POST", "/farms", r#"{"policies":[{"name":"bl","elements":[{"data":"198.18.9.0/24"},{"data":"198.18.8.8"}]},
            {"name":"wl","type":"whitelist","elements":[{"data":"198.18.0.0/16"}]},
            {"name":"bl6","family":"ipv6","elements":[{"data":"2001:2:9::/48"}]}],
            "addresses":[{"name":"fw","ip-addr":"198.18.0.200","ports":"22","policies":[{"name":"bl"}]}],
            "farms":[{"name":"sec","family":"inet","virtual-ports":"21","mode":"snat",
            "policies":[{"name":"wl"},{"name":"bl"},{"name":"bl6"}],"tcp-strict":"on","new-rtlimit":"10/second",
            "new-rtlimit-burst":"5","rst-rtlimit":"2/minute","est-connlimit":"20","helper":"ftp",
            "log":"input forward","log-prefix":"[FNAME,TYPE] ","log-rtlimit":"1/second","verdict":"log drop",
            "intra-connect":"on","mark":"0x100",
            "persistence":"srcip","sessions":[{"client":"198.18.0.2","backend":"a"}],
            "backends":[{"name":"a","ip-addr":"198.18.1.11","est-connlimit":"100","mark":"0x7"},
            {"name":"b","ip-addr":"2001:2:0:1::12"}]}]}"#.into()),
        // Every helper, and several farms with the same helper (per-farm helper objects).
        ("POST", "/farms", r#"{"farms":[
            {"name":"h-ftp2","virtual-addr":"198.18.0.40","virtual-ports":"2121","helper":"ftp"},
            {"name":"h-sip","virtual-addr":"198.18.0.41","virtual-ports":"5060","protocol":"udp","helper":"sip"},
            {"name":"h-sipt","virtual-addr":"198.18.0.41","virtual-ports":"5060","protocol":"tcp","helper":"sip"},
            {"name":"h-tftp","virtual-addr":"198.18.0.42","virtual-ports":"69","protocol":"udp","helper":"tftp"},
            {"name":"h-snmp","virtual-addr":"198.18.0.43","virtual-ports":"161","protocol":"udp","helper":"snmp"},
            {"name":"h-pptp","virtual-addr":"198.18.0.44","virtual-ports":"1723","helper":"pptp"}]}"#.into()),
        ("POST", "/farms", r#"{"farms":[{"name":"sec","limits-ttl":"60","verdict":"log","log-rtlimit":"0",
            "persist-ttl":"30","backends":[{"name":"a","state":"down"}]}]}"#.into()),
        // Elements of prefix lengths in use: the sets' elements only (no rendering).
        ("POST", "/policies", r#"{"policies":[{"name":"bl","elements":[{"data":"198.18.6.0/24"},{"data":"198.18.5.5"}]},
            {"name":"bl6","elements":[{"data":"2001:2:8::/48","time":"x"}]}]}"#.into()),
        ("DELETE", "/policies/bl/elements/198.18.8.8", String::new()),
        ("PATCH", "/policies/bl/elements", r#"{"policies":[{"name":"bl","elements":[{"data":"198.18.5.5"},{"data":"198.18.7.0/24"}]}]}"#.into()),
        // A new prefix length: a new set, and new rules in the farms it is attached to.
        ("PATCH", "/policies/bl/elements", r#"{"policies":[{"name":"bl","elements":[{"data":"198.19.0.0/16"}]}]}"#.into()),
        // A farm takes the standalone address that carries policies, then leaves it.
        ("POST", "/farms", r#"{"farms":[{"name":"fwf","addresses":[{"name":"fw"}],
            "backends":[{"name":"a","ip-addr":"198.18.1.51"}]}]}"#.into()),
        ("DELETE", "/farms/fwf", String::new()),
        ("DELETE", "/farms/sec/policies/wl", String::new()),
        ("DELETE", "/policies/bl", String::new()),
        ("DELETE", "/farms/sec", String::new()),
    ];
    for (i, (m, p, body)) in steps.iter().enumerate() {
        let fast = e.policy_element_commits();
        assert_eq!(send(&mut e, m, p, body), 200, "step {i}");
        assert_eq!(e.fallbacks(), 0, "step {i} needed a full resync");
        if p.starts_with("/policies") && body.contains("198.18.5.5") || p.ends_with("8.8") {
            assert_eq!(
                e.policy_element_commits(),
                fast + 1,
                "step {i}: elements only"
            );
        }
        // A fresh namespace started from the same state must hold the same ruleset.
        assert_eq!(
            a.listing(),
            fresh_start_listing(&e),
            "after step {i}: {m} {p}"
        );
    }
    // Element-only steps (backend states, ports) went over the netlink element path, and
    // the listings above show they left the kernel as a fresh start would.
    assert!(
        e.netlink_transactions() >= 3,
        "{}",
        e.netlink_transactions()
    );
    // Deleting everything leaves empty base tables only.
    assert_eq!(send(&mut e, "DELETE", "/farms", ""), 200);
    let l = a.listing();
    assert!(!l.contains("farm"), "{l}");
    // No service points anywhere (the skeleton's shared chains stay, referenced only by
    // the skeleton's kinds), and no plain farm's block is left.
    let gotos: Vec<&str> = l.matches(": goto lb-k").collect();
    assert_eq!(l.matches(": goto").count(), gotos.len(), "{l}");
    assert!(!l.contains(": 0x"), "{l}");
}

/// A change cut into created objects, elements and removals whose element batch the
/// kernel refuses: the created objects are taken back, and the engine brings the kernel
/// to the new state from scratch, exactly as a fresh start would have it.
#[test]
fn refused_element_batch_takes_back_created_objects() {
    let a = Ns::new();
    let mut e = engine(&a);
    let farm = r#"{"farms":[{"name":"x","virtual-addr":"198.18.0.1","virtual-ports":"80",
        "scheduler":"weight","backends":[{"name":"a","ip-addr":"198.18.1.1"},{"name":"b","ip-addr":"198.18.1.2"}]}]}"#;
    assert_eq!(send(&mut e, "POST", "/farms", farm), 200);
    // The same shape of change, accepted: objects created by libnftables, elements over
    // netlink.
    let txs = e.netlink_transactions();
    let ok = r#"{"farms":[{"name":"q","virtual-addr":"198.18.0.3","virtual-ports":"80",
        "persistence":"srcip","backends":[{"name":"a","ip-addr":"198.18.1.4"}]},
        {"name":"x","backends":[{"name":"b","weight":"2"}]}]}"#;
    assert_eq!(send(&mut e, "POST", "/farms", ok), 200);
    assert_eq!(e.netlink_transactions(), txs + 1);
    assert!(a.listing().contains("chain farm-q"), "{}", a.listing());
    // Behind the daemon's back: its backend map loses an element, so the next change's
    // delete of that element is refused (ENOENT).
    a.nft("flush map ip nftlb bki\n", &["-f", "-"]).unwrap();
    // One request: a new farm with persistence (its own chain and maps: created first)
    // and a backend change of x (element deletes: refused).
    let body = r#"{"farms":[{"name":"p","virtual-addr":"198.18.0.2","virtual-ports":"80",
        "persistence":"srcip","backends":[{"name":"a","ip-addr":"198.18.1.3"}]},
        {"name":"x","backends":[{"name":"a","state":"down"}]}]}"#;
    let txs = e.netlink_transactions();
    assert_eq!(send(&mut e, "POST", "/farms", body), 200);
    assert_eq!(
        e.netlink_transactions(),
        txs,
        "the element batch was refused"
    );
    assert_eq!(e.fallbacks(), 1, "the engine resynchronised");
    assert_eq!(a.listing(), fresh_start_listing(&e));
    assert!(a.listing().contains("chain farm-p"), "{}", a.listing());
}

/// Refuses one element batch (by number) and records what the namespace holds when the
/// next libnftables transaction comes (the one after the refusal).
struct RefuseBatch {
    inner: NsKernel,
    batches: std::sync::Arc<AtomicUsize>,
    refuse: std::sync::Arc<AtomicUsize>,
    after_refusal: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl Kernel for RefuseBatch {
    fn apply(&mut self, commands: &str) -> Result<(), KernelError> {
        let refused = self.batches.load(Ordering::SeqCst) >= self.refuse.load(Ordering::SeqCst);
        let mut seen = self.after_refusal.lock().unwrap();
        if refused && seen.is_none() {
            *seen = Some(
                Ns(self.inner.0.clone())
                    .nft_keep("", &["list", "table", "ip", "nftlb"])
                    .unwrap(),
            );
        }
        self.inner.apply(commands)
    }
    fn check(&mut self, commands: &str) -> Result<(), KernelError> {
        self.inner.check(commands)
    }
    fn list(&mut self, command: &str) -> Result<String, KernelError> {
        self.inner.list(command)
    }
    fn list_json(&mut self, command: &str) -> Result<serde_json::Value, KernelError> {
        self.inner.list_json(command)
    }
    fn name(&self) -> &'static str {
        "refuse-batch"
    }
    fn apply_elements(&mut self, batch: &ElementBatch) -> Option<Result<(), KernelError>> {
        let n = self.batches.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.refuse.load(Ordering::SeqCst) {
            return Some(Err(KernelError::Rejected("refused by the test".into())));
        }
        self.inner.apply_elements(batch)
    }
    fn has_netlink(&self) -> bool {
        true
    }
}

#[test]
fn a_load_cut_into_batches_is_taken_back_when_one_is_refused() {
    let a = Ns::new();
    let batches = std::sync::Arc::new(AtomicUsize::new(0));
    let after_refusal = std::sync::Arc::new(std::sync::Mutex::new(None));
    let refuse = std::sync::Arc::new(AtomicUsize::new(usize::MAX));
    let mut e = Engine::new(
        Box::new(RefuseBatch {
            inner: NsKernel::new(&a.0),
            batches: batches.clone(),
            refuse: refuse.clone(),
            after_refusal: after_refusal.clone(),
        }),
        None,
        EngineConfig {
            masquerade_mark: 0x8000_0000,
        },
    );
    e.start(None, false).expect("start");
    // Two element commands per kernel transaction: 20 farms' backends, buckets, services
    // and the stamp make four commands, so two batches.
    e.set_element_batch_commands(2);
    let b0 = batches.load(Ordering::SeqCst);
    // (The first element transaction of a change cut in several sets the in-progress
    // marker, the last one clears it.)
    refuse.store(b0 + 3, Ordering::SeqCst);
    let farms = |from: usize| {
        let f: Vec<String> = (from..from + 20)
            .map(|i| {
                let b: Vec<String> = (1..=8)
                    .map(|j| format!(r#"{{"name":"b{j}","ip-addr":"198.18.1.{j}"}}"#))
                    .collect();
                format!(
                    r#"{{"name":"f{i}","virtual-addr":"198.18.0.{}","virtual-ports":"80","backends":[{}]}}"#,
                    i + 1,
                    b.join(",")
                )
            })
            .collect();
        format!(r#"{{"farms":[{}]}}"#, f.join(","))
    };
    // The second batch (services, stamp) is refused: the first (backends, buckets) is
    // taken back before libnftables applies the whole transaction.
    let txs = e.netlink_transactions();
    assert_eq!(send(&mut e, "POST", "/farms", &farms(0)), 200);
    assert_eq!(
        batches.load(Ordering::SeqCst),
        b0 + 5,
        "the marker, two batches, the undo and the marker cleared"
    );
    assert_eq!(e.netlink_transactions(), txs);
    let seen = after_refusal
        .lock()
        .unwrap()
        .clone()
        .expect("libnftables was used");
    assert!(
        !seen.contains("198.18.1.1 . ") && !seen.contains("198.18.1.1\n"),
        "{seen}"
    );
    assert!(!seen.contains("0x00000010 . 0 :"), "{seen}");
    assert_eq!(a.listing(), fresh_start_listing(&e));
    assert!(a.listing().contains("198.18.0.20"), "{}", a.listing());
    // Accepted: the next load goes in two batches, services last (plus setting and
    // clearing the in-progress marker around them).
    assert_eq!(send(&mut e, "POST", "/farms", &farms(20)), 200);
    assert_eq!(batches.load(Ordering::SeqCst), b0 + 9);
    assert_eq!(e.netlink_transactions(), txs + 1);
    assert_eq!(a.listing(), fresh_start_listing(&e));
    assert!(a.listing().contains("198.18.0.40"), "{}", a.listing());
}

#[test]
fn restart_resyncs_in_place_and_removes_leftovers() {
    let a = Ns::new();
    let mut e = engine(&a);
    send(
        &mut e,
        "POST",
        "/farms",
        r#"{"farms":[{"name":"x","virtual-addr":"198.18.0.1","virtual-ports":"80",
        "backends":[{"name":"a","ip-addr":"198.18.1.1"}]},{"name":"y","virtual-addr":"198.18.0.2",
        "virtual-ports":"80","backends":[{"name":"a","ip-addr":"198.18.1.1"}]}]}"#,
    );
    let before = a.listing();
    // A foreign table must survive everything we do.
    a.nft(
        "table ip other {\n chain c {\n counter\n }\n}\n",
        &["-f", "-"],
    )
    .unwrap();
    // Restart with only farm x: y's chain and elements go, in one transaction, and the
    // kernel equals a fresh start with x alone.
    let mut st = e.state().clone();
    st.farms.shift_remove("y");
    let doc = nftlb::document::state_document(&st).to_string();
    let mut e2 = Engine::new(
        Box::new(NsKernel::new(&a.0)),
        None,
        EngineConfig {
            masquerade_mark: 0x8000_0000,
        },
    );
    e2.start(Some(doc.as_bytes()), false).unwrap();
    let after = a.listing();
    assert_ne!(before, after);
    assert!(!after.contains("farm-y"), "{after}");
    assert!(after.contains("farm-x"), "{after}");
    let b = Ns::new();
    let mut fresh = Engine::new(
        Box::new(NsKernel::new(&b.0)),
        None,
        EngineConfig {
            masquerade_mark: 0x8000_0000,
        },
    );
    fresh.start(Some(doc.as_bytes()), false).unwrap();
    assert_eq!(after, b.listing());
    assert!(a
        .nft("", &["list", "table", "ip", "other"])
        .unwrap()
        .contains("counter"));
}

#[test]
fn more_backends_than_the_originals_4095_mark_limit() {
    // 10 farms x 500 backends = 5,000 backends; the original runs out of 12-bit marks at
    // 4,095. Here backends are map elements, so the count is bounded only by memory.
    let a = Ns::new();
    let mut e = engine(&a);
    let mut farms = Vec::new();
    for f in 0..10 {
        let backends: Vec<String> = (0..500)
            .map(|b| {
                format!(
                    r#"{{"name":"b{b}","ip-addr":"198.18.{}.{}","port":"8080"}}"#,
                    100 + f,
                    b % 250 + 1
                )
            })
            .collect();
        farms.push(format!(
            r#"{{"name":"f{f}","virtual-addr":"198.18.0.{}","virtual-ports":"80","scheduler":"weight","backends":[{}]}}"#,
            f + 1,
            backends.join(",")
        ));
    }
    let body = format!(r#"{{"farms":[{}]}}"#, farms.join(","));
    assert_eq!(send(&mut e, "POST", "/farms", &body), 200);
    // Take one backend out of every farm: 10 farms' buckets are rewritten in place.
    let down: Vec<String> = (0..10)
        .map(|f| format!(r#"{{"name":"f{f}","backends":[{{"name":"b7","state":"down"}}]}}"#))
        .collect();
    let body = format!(r#"{{"farms":[{}]}}"#, down.join(","));
    assert_eq!(send(&mut e, "POST", "/farms", &body), 200);
    assert_eq!(
        send(&mut e, "POST", "/farms", &body.replace("down", "up")),
        200
    );
    assert_eq!(e.fallbacks(), 0);
    let out = a.nft("", &["list", "map", "ip", "nftlb", "bk"]).unwrap();
    assert_eq!(
        out.matches(" . 8080").count(),
        5000,
        "backend elements in the kernel"
    );
    // A fixed bucket count (room for 2 per backend, a power of two), in the chain every
    // plain weight farm of that size shares: no farm has a chain of its own.
    let chain = a
        .nft("", &["list", "chain", "ip", "nftlb", "lb-k3-rnd-1024"])
        .unwrap();
    assert!(chain.contains("numgen random mod 1024"), "{chain}");
    let listing = a.nft("", &["list", "table", "ip", "nftlb"]).unwrap();
    assert!(!listing.contains("chain farm-"), "{listing}");
}

/// Counts the transactions it applies (and forwards them to a namespace).
struct Counting(NsKernel, std::sync::Arc<AtomicUsize>);

impl Kernel for Counting {
    fn apply(&mut self, commands: &str) -> Result<(), KernelError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.apply(commands)
    }
    fn check(&mut self, commands: &str) -> Result<(), KernelError> {
        self.0.check(commands)
    }
    fn list(&mut self, command: &str) -> Result<String, KernelError> {
        self.0.list(command)
    }
    fn list_json(&mut self, command: &str) -> Result<serde_json::Value, KernelError> {
        self.0.list_json(command)
    }
    fn name(&self) -> &'static str {
        "counting"
    }
}

#[test]
fn restart_on_unchanged_rules_rewrites_nothing() {
    let a = Ns::new();
    let file = std::env::temp_dir().join(format!("{}-gen.json", a.0));
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(file.with_extension("json.journal"));
    let start = |count: &std::sync::Arc<AtomicUsize>| {
        let mut e = Engine::new(
            Box::new(Counting(NsKernel::new(&a.0), count.clone())),
            Some(nftlb::store::Store::new(&file)),
            EngineConfig {
                masquerade_mark: 0x8000_0000,
            },
        );
        e.start(None, true).expect("start");
        e
    };
    let n = std::sync::Arc::new(AtomicUsize::new(0));
    let mut e = start(&n);
    send(
        &mut e,
        "POST",
        "/farms",
        r#"{"farms":[{"name":"x","virtual-addr":"198.18.0.1","virtual-ports":"80",
        "backends":[{"name":"a","ip-addr":"198.18.1.1"}]}]}"#,
    );
    send(
        &mut e,
        "POST",
        "/farms",
        r#"{"farms":[{"name":"x","backends":[{"name":"b","ip-addr":"198.18.1.2"}]}]}"#,
    );
    let state = e.state().clone();
    let listing = a.listing();
    drop(e);
    // Same saved state, same rules in the kernel: a restart applies nothing.
    let n = std::sync::Arc::new(AtomicUsize::new(0));
    let e = start(&n);
    assert_eq!(
        n.load(Ordering::SeqCst),
        0,
        "transactions at an idle restart"
    );
    assert_eq!(e.state(), &state);
    assert_eq!(a.listing(), listing);
    drop(e);
    // Rules laid out by another version (same generation, no layout version): a restart
    // rewrites them.
    a.nft("flush set ip nftlb layout\n", &["-f", "-"]).unwrap();
    let n = std::sync::Arc::new(AtomicUsize::new(0));
    let e = start(&n);
    assert!(n.load(Ordering::SeqCst) >= 1, "the layout was rewritten");
    assert_eq!(a.listing(), listing);
    drop(e);
    // Rules changed behind our back (the generation is gone): a restart repairs them.
    a.nft("delete table ip nftlb\n", &["-f", "-"]).unwrap();
    let n = std::sync::Arc::new(AtomicUsize::new(0));
    let _e = start(&n);
    assert_eq!(
        n.load(Ordering::SeqCst),
        2,
        "claiming the table (the owner marker went with it), then the rules"
    );
    assert_eq!(a.listing(), listing);
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(file.with_extension("json.journal"));
}
