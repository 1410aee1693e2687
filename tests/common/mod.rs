//! Integration-test harness for nftlb: network namespaces, a client / load
//! balancer / backends topology, toy backend servers, client probes and a guard
//! around the daemon process with a small HTTP client for its REST API.
//!
//! Everything runs inside network namespaces created here (names `nlbt-<pid>-<n>-<tag>`);
//! no interface is ever created in the root namespace. Test networks use only
//! 198.18.0.0/15 and 2001:2::/48 (RFC 2544 / RFC 5180 benchmarking ranges).
//!
//! Topology built by [`Lab::new`]:
//!
//! ```text
//!  cli  eth0 198.18.0.2/24 2001:2::2/64 (default via LB front)
//!        |  (veth)
//!  lb   ethf 198.18.0.1/24 2001:2::1/64  + VIPs (add_vip)
//!       ethb 198.18.1.1/24 2001:2:0:1::1/64  (forwarding on)
//!        |  (veth)
//!  sw   br0 (bridge, no addresses)
//!        |  (veths)
//!  beN  eth0 198.18.1.(10+N)/24 2001:2:0:1::(10+N)/64 (default via LB back, optional)
//! ```
//!
//! Tests fail loudly (they are never skipped) when not run as root.

#![allow(dead_code)]

use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
pub mod flat;
pub mod sec;

/// Default timeout of one client request (connect + read).
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// Poll period of server loops (how quickly a server notices it must stop).
const POLL: Duration = Duration::from_millis(50);

pub const CLI4: &str = "198.18.0.2";
pub const CLI6: &str = "2001:2::2";
pub const LB_FRONT4: &str = "198.18.0.1";
pub const LB_FRONT6: &str = "2001:2::1";
pub const LB_BACK4: &str = "198.18.1.1";
pub const LB_BACK6: &str = "2001:2:0:1::1";

/// IPv4 address of backend `i` (1-based): 198.18.1.(10+i).
pub fn be4(i: usize) -> String {
    format!("198.18.1.{}", 10 + i)
}
/// IPv6 address of backend `i` (1-based): 2001:2:0:1::(10+i) (digits read as hex).
pub fn be6(i: usize) -> String {
    format!("2001:2:0:1::{}", 10 + i)
}

pub fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad IP address {s:?}: {e}"))
}

// ---------------------------------------------------------------------------
// processes

/// Panics (never skips) unless running as root.
pub fn require_root() {
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "nftlb integration tests must run as root (they create network namespaces and \
         nftables rules); euid is {euid}. They are deliberately not skipped."
    );
}

/// Panics unless `tool` is an executable in PATH (or /usr/sbin, /sbin).
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(["/usr/sbin", "/sbin", "/usr/bin"]) {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("required tool `{tool}` not found (install it, e.g. `apt-get install -y {tool}`)");
}

fn fmt_cmd(prog: &str, args: &[&str]) -> String {
    let mut s = prog.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Runs a command and returns its output (does not check the status).
pub fn run_cmd(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", fmt_cmd(prog, args)))
}

/// Runs a command, panics with its stderr on failure, returns stdout.
pub fn check_cmd(prog: &str, args: &[&str]) -> String {
    let out = run_cmd(prog, args);
    if !out.status.success() {
        panic!(
            "`{}` failed ({}):\nstdout: {}\nstderr: {}",
            fmt_cmd(prog, args),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes `sw` a switch: bridge `br0` with the given ports attached, and the
/// bridge's netfilter hooks off so that only the load balancer's rules see packets.
fn make_switch(sw: &NetNs, ports: &[&str]) {
    if Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        for k in ["iptables", "ip6tables", "arptables"] {
            let _ = sw.run(|| fs::write(format!("/proc/sys/net/bridge/bridge-nf-call-{k}"), "0"));
        }
    }
    let mut s = vec![
        "link add br0 type bridge mcast_snooping 0".to_string(),
        "link set br0 up".to_string(),
    ];
    s.extend(ports.iter().map(|p| format!("link set {p} master br0 up")));
    ip_batch(Some(&sw.name), &s);
}

/// Runs `ip [-n ns] -batch -` with the given lines; panics on the first failure.
fn ip_batch(ns: Option<&str>, lines: &[String]) {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run ip");
    let script = lines.join("\n") + "\n";
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .expect("write to ip -batch");
    let out = child.wait_with_output().expect("wait ip -batch");
    if !out.status.success() {
        panic!(
            "ip -batch in {:?} failed: {}\nscript:\n{script}",
            ns,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Polls `cond` every 20 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// network namespaces

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static STALE: Once = Once::new();

fn unique(prefix: &str, tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}-{}-{n}-{tag}", std::process::id())
}

/// Deletes `nlbt-<pid>-*` namespaces left behind by test processes that no longer exist
/// (e.g. killed with SIGKILL, so no Drop ran).
fn cleanup_stale_namespaces() {
    STALE.call_once(|| {
        let Ok(dir) = fs::read_dir("/run/netns") else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("nlbt-") else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = run_cmd("ip", &["netns", "del", &name]);
            }
        }
    });
}

/// A network namespace that is deleted when dropped (also on panic).
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `nlbt-<pid>-<n>-<tag>` with `lo` up and IPv6 DAD off.
    pub fn new(tag: &str) -> NetNs {
        require_root();
        cleanup_stale_namespaces();
        let name = unique("nlbt", tag);
        check_cmd("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.sysctl("net/ipv6/conf/all/accept_dad", "0");
        ns.sysctl("net/ipv6/conf/default/accept_dad", "0");
        ns.sysctl("net/ipv4/conf/all/rp_filter", "0");
        ns.sysctl("net/ipv4/conf/default/rp_filter", "0");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn open(&self) -> File {
        File::open(format!("/run/netns/{}", self.name))
            .unwrap_or_else(|e| panic!("open /run/netns/{}: {e}", self.name))
    }

    /// Runs `f` on a fresh thread that has entered this namespace (setns CLONE_NEWNET),
    /// so sockets created in `f` live in the namespace. Panics propagate.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let file = self.open();
        let name = &self.name;
        thread::scope(|s| {
            let h = s.spawn(move || {
                enter(&file, name);
                f()
            });
            match h.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    /// Like [`run`](Self::run) but detached: returns the thread's handle.
    pub fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> JoinHandle<R> {
        let file = self.open();
        let name = self.name.clone();
        thread::spawn(move || {
            enter(&file, &name);
            drop(file);
            f()
        })
    }

    /// `ip -n NAME args...`; panics with stderr on failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend_from_slice(args);
        check_cmd("ip", &v)
    }

    /// Output of `ip netns exec NAME args...` (status not checked).
    pub fn try_exec(&self, args: &[&str]) -> Output {
        let mut v = vec!["netns", "exec", self.name.as_str()];
        v.extend_from_slice(args);
        run_cmd("ip", &v)
    }

    /// `ip netns exec NAME args...`; panics with stderr on failure; returns stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut v = vec!["netns", "exec", self.name.as_str()];
        v.extend_from_slice(args);
        check_cmd("ip", &v)
    }

    /// Writes `/proc/sys/<key>` from inside the namespace (key like `net/ipv4/ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{key}");
        self.run(|| {
            fs::write(&path, value).unwrap_or_else(|e| panic!("sysctl {path}={value}: {e}"))
        });
    }

    /// `nft list ruleset` inside the namespace.
    pub fn nft_ruleset(&self) -> String {
        self.exec(&["nft", "list", "ruleset"])
    }

    /// `nft args...` inside the namespace (panics on failure).
    pub fn nft(&self, args: &[&str]) -> String {
        let mut v = vec!["nft"];
        v.extend_from_slice(args);
        self.exec(&v)
    }

    /// `conntrack -L` inside the namespace (requires the `conntrack` tool).
    pub fn conntrack_list(&self) -> String {
        require_tool("conntrack");
        let out = self.try_exec(&["conntrack", "-L"]);
        // conntrack prints its summary line on stderr; the table goes to stdout.
        if !out.status.success() {
            panic!(
                "conntrack -L failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn enter(file: &File, name: &str) {
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        panic!("setns into {name}: {}", io::Error::last_os_error());
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let out = run_cmd("ip", &["netns", "del", &self.name]);
        if !out.status.success() {
            eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// topology

#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Number of backends (be1..beN).
    pub backends: usize,
    /// Give backends a default route via the LB back address (needed for DNAT).
    /// Without it replies can only reach the client when the LB does SNAT.
    pub backend_default_route: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            backends: 2,
            backend_default_route: true,
        }
    }
}

pub struct Backend {
    /// `be1`, `be2`, ... (also what its servers answer with)
    pub name: String,
    pub ns: NetNs,
    pub ip4: String,
    pub ip6: String,
}

/// Client, load balancer, switch and backends namespaces. Dropping it stops the
/// servers first and then deletes every namespace.
pub struct Lab {
    servers: Mutex<Vec<Server>>,
    pub backends: Vec<Backend>,
    pub cli: NetNs,
    pub lb: NetNs,
    pub sw: NetNs,
}

impl Lab {
    pub fn new(n_backends: usize) -> Lab {
        Lab::with_options(LabOptions {
            backends: n_backends,
            ..Default::default()
        })
    }

    pub fn with_options(opts: LabOptions) -> Lab {
        assert!(
            (1..=50).contains(&opts.backends),
            "1..=50 backends supported"
        );
        let cli = NetNs::new("cli");
        let lb = NetNs::new("lb");
        let sw = NetNs::new("sw");
        let backends: Vec<Backend> = (1..=opts.backends)
            .map(|i| Backend {
                name: format!("be{i}"),
                ns: NetNs::new(&format!("be{i}")),
                ip4: be4(i),
                ip6: be6(i),
            })
            .collect();

        // links, created from the root namespace directly between namespaces
        let mut root = vec![
            format!(
                "link add eth0 netns {} type veth peer name ethf netns {}",
                cli.name, lb.name
            ),
            format!(
                "link add ethb netns {} type veth peer name lb netns {}",
                lb.name, sw.name
            ),
        ];
        for b in &backends {
            root.push(format!(
                "link add eth0 netns {} type veth peer name {} netns {}",
                b.ns.name, b.name, sw.name
            ));
        }
        ip_batch(None, &root);

        // switch
        let mut ports = vec!["lb"];
        ports.extend(backends.iter().map(|b| b.name.as_str()));
        make_switch(&sw, &ports);

        // load balancer
        lb.sysctl("net/ipv4/ip_forward", "1");
        lb.sysctl("net/ipv6/conf/all/forwarding", "1");
        ip_batch(
            Some(&lb.name),
            &[
                "link set ethf up".into(),
                "link set ethb up".into(),
                format!("addr add {LB_FRONT4}/24 dev ethf"),
                format!("addr add {LB_FRONT6}/64 dev ethf nodad"),
                format!("addr add {LB_BACK4}/24 dev ethb"),
                format!("addr add {LB_BACK6}/64 dev ethb nodad"),
            ],
        );

        // client
        ip_batch(
            Some(&cli.name),
            &[
                "link set eth0 up".into(),
                format!("addr add {CLI4}/24 dev eth0"),
                format!("addr add {CLI6}/64 dev eth0 nodad"),
                format!("route add default via {LB_FRONT4}"),
                format!("route add default via {LB_FRONT6}"),
            ],
        );

        // backends
        for b in &backends {
            let mut l = vec![
                "link set eth0 up".to_string(),
                format!("addr add {}/24 dev eth0", b.ip4),
                format!("addr add {}/64 dev eth0 nodad", b.ip6),
            ];
            if opts.backend_default_route {
                l.push(format!("route add default via {LB_BACK4}"));
                l.push(format!("route add default via {LB_BACK6}"));
            }
            ip_batch(Some(&b.ns.name), &l);
        }

        Lab {
            servers: Mutex::new(Vec::new()),
            backends,
            cli,
            lb,
            sw,
        }
    }

    /// Backend `i` (1-based).
    pub fn be(&self, i: usize) -> &Backend {
        &self.backends[i - 1]
    }

    /// Adds a VIP on the LB front interface (/32 or /128 nodad).
    pub fn add_vip(&self, addr: &str) {
        match ip(addr) {
            IpAddr::V4(_) => self
                .lb
                .ip(&["addr", "add", &format!("{addr}/32"), "dev", "ethf"]),
            IpAddr::V6(_) => self.lb.ip(&[
                "addr",
                "add",
                &format!("{addr}/128"),
                "dev",
                "ethf",
                "nodad",
            ]),
        };
    }

    /// Adds a secondary address on the LB back side (e.g. a SNAT `source-addr`).
    pub fn add_lb_back_addr(&self, addr: &str) {
        match ip(addr) {
            IpAddr::V4(_) => self
                .lb
                .ip(&["addr", "add", &format!("{addr}/24"), "dev", "ethb"]),
            IpAddr::V6(_) => {
                self.lb
                    .ip(&["addr", "add", &format!("{addr}/64"), "dev", "ethb", "nodad"])
            }
        };
    }

    /// Adds a secondary client address (use with the `*_from` helpers).
    pub fn add_client_addr(&self, addr: &str) {
        match ip(addr) {
            IpAddr::V4(_) => self
                .cli
                .ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]),
            IpAddr::V6(_) => {
                self.cli
                    .ip(&["addr", "add", &format!("{addr}/64"), "dev", "eth0", "nodad"])
            }
        };
    }

    /// Removes the backends' default routes (so only SNAT'ed traffic can be answered).
    pub fn remove_backend_routes(&self) {
        for b in &self.backends {
            let _ = b.ns.try_exec(&["ip", "route", "del", "default"]);
            let _ = b.ns.try_exec(&["ip", "-6", "route", "del", "default"]);
        }
    }

    // -- servers ---------------------------------------------------------

    /// TCP server on every backend: one reply line per connection, then close.
    pub fn serve_tcp(&self, port: u16) {
        for b in &self.backends {
            self.keep(tcp_server(&b.ns, &b.name, port, TcpMode::Close));
        }
    }

    /// TCP server on every backend: greeting line, then one reply per received line.
    pub fn serve_tcp_keep_open(&self, port: u16) {
        for b in &self.backends {
            self.keep(tcp_server(&b.ns, &b.name, port, TcpMode::KeepOpen));
        }
    }

    /// UDP server on every backend: one reply datagram per received datagram.
    pub fn serve_udp(&self, port: u16) {
        for b in &self.backends {
            self.keep(udp_server(&b.ns, &b.name, port));
        }
    }

    /// Keeps a server alive until the lab is dropped.
    pub fn keep(&self, s: Server) {
        self.servers.lock().unwrap().push(s);
    }

    // -- client side (all run inside the client namespace) ----------------

    pub fn tcp(&self, addr: &str, port: u16) -> io::Result<(String, IpAddr)> {
        let a = ip(addr);
        self.cli.run(move || tcp_request(a, port, TIMEOUT))
    }

    pub fn tcp_from(&self, src: &str, addr: &str, port: u16) -> io::Result<(String, IpAddr)> {
        let (s, a) = (ip(src), ip(addr));
        self.cli
            .run(move || tcp_request_from(Some(s), a, port, TIMEOUT))
    }

    /// `n` sequential connections; stops early after 3 consecutive failures
    /// (the remaining entries are then that last error kind).
    pub fn tcp_many(&self, addr: &str, port: u16, n: usize) -> Vec<io::Result<(String, IpAddr)>> {
        let a = ip(addr);
        self.cli
            .run(move || many(n, || tcp_request(a, port, TIMEOUT)))
    }

    pub fn tcp_many_from(
        &self,
        src: &str,
        addr: &str,
        port: u16,
        n: usize,
    ) -> Vec<io::Result<(String, IpAddr)>> {
        let (s, a) = (ip(src), ip(addr));
        self.cli
            .run(move || many(n, || tcp_request_from(Some(s), a, port, TIMEOUT)))
    }

    pub fn udp(&self, addr: &str, port: u16) -> io::Result<(String, IpAddr)> {
        let a = ip(addr);
        self.cli.run(move || udp_request(a, port, TIMEOUT))
    }

    pub fn udp_many(&self, addr: &str, port: u16, n: usize) -> Vec<io::Result<(String, IpAddr)>> {
        let a = ip(addr);
        self.cli
            .run(move || many(n, || udp_request(a, port, TIMEOUT)))
    }

    /// Opens a long-lived TCP connection from the client namespace (server must be
    /// a keep-open one). The returned connection can be used from any thread.
    pub fn long_conn(&self, addr: &str, port: u16) -> io::Result<LongConn> {
        let a = ip(addr);
        self.cli.run(move || LongConn::connect(a, port, TIMEOUT))
    }
}

fn many<T>(n: usize, mut f: impl FnMut() -> io::Result<T>) -> Vec<io::Result<T>> {
    let mut v = Vec::with_capacity(n);
    let mut fails = 0;
    for _ in 0..n {
        if fails >= 3 {
            let kind = v
                .last()
                .and_then(|r: &io::Result<T>| r.as_ref().err().map(|e| e.kind()))
                .unwrap_or(io::ErrorKind::Other);
            v.push(Err(io::Error::new(
                kind,
                "skipped after 3 consecutive failures",
            )));
            continue;
        }
        let r = f();
        if r.is_err() {
            fails += 1;
        } else {
            fails = 0;
        }
        v.push(r);
    }
    v
}

/// Backend names of successful replies; panics with the index on the first error.
pub fn names(results: &[io::Result<(String, IpAddr)>]) -> Vec<String> {
    results
        .iter()
        .enumerate()
        .map(|(i, r)| match r {
            Ok((n, _)) => n.clone(),
            Err(e) => panic!("request #{i} failed: {e} (all results: {results:?})"),
        })
        .collect()
}

/// Client addresses the backends saw; panics on the first error.
pub fn seen(results: &[io::Result<(String, IpAddr)>]) -> Vec<IpAddr> {
    results
        .iter()
        .enumerate()
        .map(|(i, r)| match r {
            Ok((_, a)) => *a,
            Err(e) => panic!("request #{i} failed: {e} (all results: {results:?})"),
        })
        .collect()
}

pub fn counts(names: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_insert(0) += 1;
    }
    m
}

// ---------------------------------------------------------------------------
// servers

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpMode {
    /// Write `"<name> <peer>\n"` and close.
    Close,
    /// Write `"<name> <peer>\n"` on connect, then the same line for every line received.
    KeepOpen,
}

/// A running toy server; stopped (and its threads joined) on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub desc: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn reply_line(name: &str, peer: &SocketAddr) -> String {
    format!("{name} {}\n", peer.ip().to_canonical())
}

fn bind_dual(ty: Type, port: u16) -> io::Result<Socket> {
    let proto = if ty == Type::STREAM {
        Protocol::TCP
    } else {
        Protocol::UDP
    };
    let s = Socket::new(Domain::IPV6, ty, Some(proto))?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())?;
    Ok(s)
}

fn poll_readable(fd: i32, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let rc = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    rc > 0
}

fn start_server(
    ns: &NetNs,
    desc: String,
    body: impl FnOnce(&mpsc::Sender<io::Result<()>>, Arc<AtomicBool>) + Send + 'static,
) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let st = stop.clone();
    let thread = ns.spawn(move || body(&tx, st));
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Server {
            stop,
            thread: Some(thread),
            desc,
        },
        Ok(Err(e)) => {
            let _ = thread.join();
            panic!("{desc}: cannot start: {e}")
        }
        Err(_) => panic!("{desc}: did not start within 10 s"),
    }
}

/// Starts a dual-stack TCP server on `[::]:port` inside `ns`.
pub fn tcp_server(ns: &NetNs, name: &str, port: u16, mode: TcpMode) -> Server {
    let name = name.to_string();
    let desc = format!("tcp server {name} :{port} ({mode:?}) in {}", ns.name());
    start_server(ns, desc, move |tx, stop| {
        let listener: TcpListener = match bind_dual(Type::STREAM, port).and_then(|s| {
            s.listen(128)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        }) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            if !poll_readable(listener.as_raw_fd(), POLL) {
                conns.retain(|h| !h.is_finished());
                continue;
            }
            let (stream, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    eprintln!("tcp server {name}:{port}: accept: {e}");
                    break;
                }
            };
            let line = reply_line(&name, &peer);
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            match mode {
                TcpMode::Close => {
                    let _ = (&stream).write_all(line.as_bytes());
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                }
                TcpMode::KeepOpen => {
                    conns.retain(|h| !h.is_finished());
                    if conns.len() < 256 {
                        let stop = stop.clone();
                        conns.push(thread::spawn(move || keep_open(stream, line, &stop)));
                    }
                }
            }
        }
        for h in conns {
            let _ = h.join();
        }
    })
}

fn keep_open(mut s: TcpStream, line: String, stop: &AtomicBool) {
    if s.write_all(line.as_bytes()).is_err() || s.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::SeqCst) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                for _ in buf[..n].iter().filter(|&&b| b == b'\n') {
                    if s.write_all(line.as_bytes()).is_err() {
                        return;
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// Answers every datagram on `sock` with the server's reply line until `stop` is set.
fn udp_answer(sock: &UdpSocket, name: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        match sock.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let _ = sock.send_to(reply_line(name, &peer).as_bytes(), peer);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => {
                eprintln!("udp server {name} ({:?}): {e}", sock.local_addr());
                break;
            }
        }
    }
}

/// Starts a dual-stack UDP server on `[::]:port` inside `ns`.
pub fn udp_server(ns: &NetNs, name: &str, port: u16) -> Server {
    let name = name.to_string();
    let desc = format!("udp server {name} :{port} in {}", ns.name());
    start_server(ns, desc, move |tx, stop| {
        let sock: UdpSocket = match bind_dual(Type::DGRAM, port).and_then(|s| {
            s.set_read_timeout(Some(POLL))?;
            Ok(s.into())
        }) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        udp_answer(&sock, &name, &stop);
    })
}

// ---------------------------------------------------------------------------
// clients (call these inside a namespace, e.g. via `lab.cli.run(...)`)

fn parse_reply(line: &str) -> io::Result<(String, IpAddr)> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {line:?}"));
    let mut it = line.split_whitespace();
    let name = it.next().ok_or_else(bad)?;
    let addr: IpAddr = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    Ok((name.to_string(), addr))
}

fn connect(
    src: Option<IpAddr>,
    addr: IpAddr,
    port: u16,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let dst = SocketAddr::new(addr, port);
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(src) = src {
        s.bind(&SocketAddr::new(src, 0).into())?;
    }
    s.connect_timeout(&dst.into(), timeout)?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    r.take(4096).read_line(&mut line)?;
    if !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed before a full reply line (got {line:?})"),
        ));
    }
    Ok(line)
}

/// One TCP connection: returns (backend name, client address the backend saw).
pub fn tcp_request(addr: IpAddr, port: u16, timeout: Duration) -> io::Result<(String, IpAddr)> {
    tcp_request_from(None, addr, port, timeout)
}

/// Same as [`tcp_request`], with the client socket bound to `src` first.
pub fn tcp_request_from(
    src: Option<IpAddr>,
    addr: IpAddr,
    port: u16,
    timeout: Duration,
) -> io::Result<(String, IpAddr)> {
    let s = connect(src, addr, port, timeout)?;
    parse_reply(&read_line(&mut BufReader::new(s))?)
}

/// One UDP exchange (up to 3 sends on the same socket, i.e. the same flow).
pub fn udp_request(addr: IpAddr, port: u16, timeout: Duration) -> io::Result<(String, IpAddr)> {
    udp_request_from(None, addr, port, timeout)
}

pub fn udp_request_from(
    src: Option<IpAddr>,
    addr: IpAddr,
    port: u16,
    timeout: Duration,
) -> io::Result<(String, IpAddr)> {
    let bind = src.unwrap_or(match addr {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    let s = UdpSocket::bind(SocketAddr::new(bind, 0))?;
    s.connect(SocketAddr::new(addr, port))?;
    s.set_read_timeout(Some(timeout / 3))?;
    let mut buf = [0u8; 2048];
    for _ in 0..3 {
        s.send(b"ping\n")?;
        match s.recv(&mut buf) {
            Ok(n) => return parse_reply(&String::from_utf8_lossy(&buf[..n])),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, "no UDP reply"))
}

/// A long-lived TCP connection to a keep-open server.
pub struct LongConn {
    reader: BufReader<TcpStream>,
    /// Backend that accepted the connection (from the greeting).
    pub backend: String,
    /// Client address that backend saw.
    pub client: IpAddr,
}

impl LongConn {
    pub fn connect(addr: IpAddr, port: u16, timeout: Duration) -> io::Result<LongConn> {
        let s = connect(None, addr, port, timeout)?;
        let mut reader = BufReader::new(s);
        let (backend, client) = parse_reply(&read_line(&mut reader)?)?;
        Ok(LongConn {
            reader,
            backend,
            client,
        })
    }

    /// Sends a line and reads the reply on the same connection.
    pub fn ping(&mut self) -> io::Result<(String, IpAddr)> {
        self.reader.get_mut().write_all(b"ping\n")?;
        parse_reply(&read_line(&mut self.reader)?)
    }
}

// ---------------------------------------------------------------------------
// daemon

pub const API_PORT: u16 = 5555;
pub const API_KEY: &str = "nlbt-test-key-0123456789";

/// The nftlb daemon running in a namespace; SIGTERM'ed (by PID) on drop.
pub struct Daemon<'a> {
    ns: &'a NetNs,
    pub key: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl<'a> Daemon<'a> {
    /// Starts the daemon inside `ns` and waits (bounded) until its API answers.
    pub fn start(ns: &'a NetNs) -> Daemon<'a> {
        let mut d = Daemon::unstarted(ns);
        d.spawn();
        d
    }

    /// A daemon for `ns` with the test key and a fresh directory (state file, log), not
    /// started yet.
    fn unstarted(ns: &'a NetNs) -> Daemon<'a> {
        let dir = std::env::temp_dir().join(unique("nlbt", "daemon"));
        fs::create_dir_all(&dir).expect("create daemon temp dir");
        Daemon {
            ns,
            key: API_KEY.to_string(),
            dir,
            child: None,
        }
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open daemon log");
        let bin = daemon_bin();
        let state = self.state_file();
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            self.ns.name(),
            &bin,
            "-k",
            &self.key,
            "-H",
            "127.0.0.1",
        ])
        .args(["-P", &API_PORT.to_string()])
        .arg("--state-file")
        .arg(&state)
        .args(["-L", "2", "-l", "7"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log);
        // If the test process dies without running Drop, the daemon gets SIGKILL.
        // (`ip netns exec` execs the daemon, so this PID is the daemon's.)
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn nftlb daemon");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                self.child = None;
                panic!(
                    "nftlb daemon exited during start-up ({st}); log:\n{}",
                    self.log()
                );
            }
            match self.try_request("GET", "/farms", &[], None) {
                Ok(r) if r.status == 200 => return,
                Ok(r) => last = format!("status {} body {}", r.status, r.text()),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                panic!(
                    "nftlb API did not answer within 15 s (last: {last}); log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGTERM (to this PID only), bounded wait (10 s, then SIGKILL + panic).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    let st = child.wait().ok();
                    if !thread::panicking() {
                        panic!(
                            "nftlb daemon did not exit within 10 s of SIGTERM ({st:?}); log:\n{}",
                            self.log()
                        );
                    }
                    return st;
                }
            }
        }
    }

    /// The name of the namespace the daemon runs in.
    pub fn ns_name(&self) -> &str {
        self.ns.name()
    }

    /// SIGKILL (to this PID only) and reap: a crash at whatever point it is.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }

    /// Starts the daemon again (after [`crash`](Self::crash) or [`stop`](Self::stop)).
    pub fn respawn(&mut self) {
        self.spawn();
    }

    /// SIGTERM, wait, start again with the same state file and key.
    pub fn restart(&mut self) {
        if let Some(st) = self.stop() {
            assert!(
                st.success(),
                "daemon exit status after SIGTERM: {st}; log:\n{}",
                self.log()
            );
        }
        self.spawn();
    }

    /// Raw HTTP request to the API from inside the namespace. `headers` are added
    /// after Host (the `Key` header is added unless `headers` has a `Key` entry or
    /// `no_key` is wanted: pass `("Key", "")` to omit it).
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<HttpResponse> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{API_PORT}\r\n");
        match headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("key")) {
            Some((_, "")) => {}
            Some((_, v)) => head += &format!("Key: {v}\r\n"),
            None => head += &format!("Key: {}\r\n", self.key),
        }
        for (k, v) in headers {
            if !k.eq_ignore_ascii_case("key") {
                head += &format!("{k}: {v}\r\n");
            }
        }
        if let Some(b) = body {
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                head += "Content-Type: application/json\r\n";
            }
            head += &format!("Content-Length: {}\r\n", b.len());
        }
        head += "Connection: close\r\n\r\n";
        let mut req = head.into_bytes();
        if let Some(b) = body {
            req.extend_from_slice(b);
        }
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), API_PORT);
        self.ns
            .run(move || http_exchange(addr, &req, Duration::from_secs(10)))
    }

    /// Like [`try_request`](Self::try_request) but panics (with the daemon log) on I/O errors.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpResponse {
        self.try_request(method, path, headers, body)
            .unwrap_or_else(|e| {
                panic!(
                    "{method} {path}: {e}; daemon log tail:\n{}",
                    tail(&self.log(), 4000)
                )
            })
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self.request("GET", path, &[], None);
        (r.status, r.json())
    }

    /// GET returning the raw body bytes (for byte-identical comparisons).
    pub fn get_raw(&self, path: &str) -> (u16, Vec<u8>) {
        let r = self.request("GET", path, &[], None);
        (r.status, r.body)
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string().as_bytes())
    }

    pub fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value) {
        let r = self.request("POST", path, &[], Some(body));
        (r.status, r.json())
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        let r = self.request("DELETE", path, &[], None);
        (r.status, r.json())
    }

    /// POST /farms and assert 200.
    pub fn apply(&self, doc: &Value) -> Value {
        let (st, body) = self.post("/farms", doc);
        assert_eq!(
            st,
            200,
            "POST /farms {doc} -> {st} {body}; daemon log tail:\n{}",
            tail(&self.log(), 4000)
        );
        body
    }

    /// DELETE and assert 200.
    pub fn delete_ok(&self, path: &str) -> Value {
        let (st, body) = self.delete(path);
        assert_eq!(
            st,
            200,
            "DELETE {path} -> {st} {body}; daemon log tail:\n{}",
            tail(&self.log(), 4000)
        );
        body
    }

    /// GET /farms/NAME and return the farm object (asserts 200 and one farm).
    pub fn farm(&self, name: &str) -> Value {
        let (st, body) = self.get(&format!("/farms/{name}"));
        assert_eq!(st, 200, "GET /farms/{name} -> {st} {body}");
        body["farms"][0].clone()
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        let _ = self.stop();
        if thread::panicking() {
            eprintln!(
                "---- nftlb daemon log ({}) tail ----\n{}\n---- end of daemon log ----",
                self.log_path().display(),
                tail(&self.log(), 16000)
            );
            if std::env::var_os("NLBT_KEEP").is_some() {
                return;
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Body as JSON; `Null` when empty, a JSON string when it is not JSON.
    pub fn json(&self) -> Value {
        if self.body.iter().all(|b| b.is_ascii_whitespace()) {
            return Value::Null;
        }
        serde_json::from_slice(&self.body).unwrap_or_else(|_| Value::String(self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Minimal HTTP/1.1 exchange: writes the request (write errors are tolerated so that
/// an early error response can still be read), reads until EOF.
pub fn http_exchange(addr: SocketAddr, req: &[u8], timeout: Duration) -> io::Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    // No half-close after the request: hyper-based servers drop the response on EOF.
    let write_err = s.write_all(req).err();
    let mut raw = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if !raw.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => {
                return Err(match write_err {
                    Some(w) => io::Error::new(e.kind(), format!("{e} (after write error: {w})")),
                    None => e,
                })
            }
        }
        if raw.len() > 64 << 20 || Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "response too big or too slow",
            ));
        }
        // Stop early once a complete Content-Length response is in.
        if let Some(r) = parse_response(&raw) {
            if r.1 {
                break;
            }
        }
    }
    match parse_response(&raw) {
        Some((r, _)) => Ok(r),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "incomplete HTTP response ({} bytes): {:?}",
                raw.len(),
                String::from_utf8_lossy(&raw[..raw.len().min(300)])
            ),
        )),
    }
}

/// Parses a response; the bool tells whether it is complete per Content-Length.
fn parse_response(raw: &[u8]) -> Option<(HttpResponse, bool)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let hdr = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let (body, complete) =
        if hdr("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            dechunk(rest)
        } else if let Some(len) = hdr("content-length").and_then(|v| v.parse::<usize>().ok()) {
            (rest[..rest.len().min(len)].to_vec(), rest.len() >= len)
        } else {
            (rest.to_vec(), false)
        };
    Some((
        HttpResponse {
            status,
            headers,
            body,
        },
        complete,
    ))
}

fn dechunk(mut data: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size_txt = String::from_utf8_lossy(&data[..eol]);
        let size_txt = size_txt.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_txt, 16) else {
            return (out, false);
        };
        data = &data[eol + 2..];
        if size == 0 {
            return (out, true);
        }
        if data.len() < size + 2 {
            out.extend_from_slice(&data[..data.len().min(size)]);
            return (out, false);
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

// ---------------------------------------------------------------------------
// JSON helpers for farm documents

/// A backend object (all values as strings, as nftlb expects).
pub fn bck(name: &str, ip_addr: &str) -> Value {
    serde_json::json!({
        "name": name,
        "ip-addr": ip_addr,
        "weight": "1",
        "priority": "1",
        "state": "up"
    })
}

/// Sets extra string keys on a JSON object.
pub fn with(mut v: Value, kv: &[(&str, &str)]) -> Value {
    let obj = v.as_object_mut().expect("JSON object");
    for (k, val) in kv {
        obj.insert(k.to_string(), Value::String(val.to_string()));
    }
    v
}

/// `{"farms":[farm]}`
pub fn farms_doc(farm: Value) -> Value {
    serde_json::json!({ "farms": [farm] })
}

/// A farm object: `name` first, then the given string keys, then `backends`.
pub fn farm(name: &str, kv: &[(&str, &str)], backends: Vec<Value>) -> Value {
    let mut f = with(serde_json::json!({ "name": name }), kv);
    f["backends"] = Value::Array(backends);
    f
}

/// `{"farms":[web]}`: farm `web`, IPv4 TCP `vip`:80, dnat, rr, then `extra`
/// (which may override any of those keys), with the given backends.
pub fn web_farm_doc(vip: &str, extra: &[(&str, &str)], backends: Vec<Value>) -> Value {
    let base = [
        ("family", "ipv4"),
        ("virtual-addr", vip),
        ("virtual-ports", "80"),
        ("protocol", "tcp"),
        ("mode", "dnat"),
        ("scheduler", "rr"),
    ];
    farms_doc(with(farm("web", &base, backends), extra))
}

/// Backends be1..=beN with their IPv4 addresses.
pub fn v4_backends(n: usize) -> Vec<Value> {
    (1..=n).map(|i| bck(&format!("be{i}"), &be4(i))).collect()
}

/// Backends be1..=beN with their IPv6 addresses.
pub fn v6_backends(n: usize) -> Vec<Value> {
    (1..=n).map(|i| bck(&format!("be{i}"), &be6(i))).collect()
}

/// `{"farms":[{"name":farm,"backends":[{"name":backend, key: value}]}]}`
pub fn backend_patch(farm: &str, backend: &str, key: &str, value: &str) -> Value {
    serde_json::json!({ "farms": [ { "name": farm, "backends": [ { "name": backend, key: value } ] } ] })
}

/// Map literal for count assertions: `expect_counts(&[("be1", 2), ("be2", 2)])`.
pub fn expect_counts(v: &[(&str, usize)]) -> BTreeMap<String, usize> {
    v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

/// POST `body` to the API of the daemon in namespace `ns` with `key`, from the calling
/// thread (which enters the namespace). The status, or `None` if the connection failed
/// or was cut (e.g. the daemon was killed).
pub fn raw_post(ns: &str, key: &str, path: &str, body: &[u8]) -> Option<u16> {
    let file = File::open(format!("/run/netns/{ns}")).ok()?;
    enter(&file, ns);
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nKey: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), API_PORT);
    http_exchange(addr, &req, Duration::from_secs(120))
        .ok()
        .map(|r| r.status)
}

// ---------------------------------------------------------------------------
// daemon variants and process checks (tests/api_abuse.rs)

impl<'a> Daemon<'a> {
    /// Like [`start`](Self::start), with `prefix` run before the binary (e.g.
    /// `prlimit --nofile=1024:1024`, which execs it: the PID stays the daemon's), `extra`
    /// arguments after the usual ones and `env` added to its environment. (A
    /// [`restart`](Self::restart) starts it without them.)
    pub fn start_with(
        ns: &'a NetNs,
        prefix: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon<'a> {
        let mut d = Daemon::unstarted(ns);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.log_path())
            .expect("open daemon log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()])
            .args(prefix)
            .arg(env!("CARGO_BIN_EXE_nftlb"))
            .args(["-k", &d.key, "-H", "127.0.0.1"])
            .args(["-P", &API_PORT.to_string()])
            .arg("--state-file")
            .arg(d.state_file())
            .args(["-L", "2", "-l", "7"])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        d.child = Some(cmd.spawn().expect("spawn nftlb daemon"));
        d.wait_ready();
        d
    }

    /// Sends `sig` to the daemon (its PID only).
    pub fn signal(&self, sig: i32) {
        let pid = self.pid().expect("daemon running");
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }

    /// Whether the daemon process is still running (not exited).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `sig` and waits up to `timeout` for the process to exit: its status and how
    /// long it took (None: still running after `timeout`; it is then SIGKILLed).
    pub fn stop_with(&mut self, sig: i32, timeout: Duration) -> (Option<ExitStatus>, Duration) {
        let mut child = self.child.take().expect("daemon running");
        let t = Instant::now();
        unsafe {
            libc::kill(child.id() as i32, sig);
        }
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return (Some(st), t.elapsed());
            }
            if t.elapsed() >= timeout {
                let waited = t.elapsed();
                let _ = child.kill();
                let _ = child.wait();
                return (None, waited);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// A `/proc/PID/status` field in kB (e.g. `VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid().expect("daemon running"), field)
    }

    /// Open file descriptors of the daemon.
    pub fn open_fds(&self) -> usize {
        let pid = self.pid().expect("daemon running");
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// A `/proc/PID/status` field in kB (0 when absent).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Raises this process's open-file soft limit to its hard limit (tests that hold many
/// sockets).
pub fn raise_nofile() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
    }
    rl.rlim_cur
}

/// The daemon binary the tests start: this build's, or `NLBT_DAEMON_BIN` (a copy, so that
/// a long run is not disturbed by rebuilds).
pub fn daemon_bin() -> String {
    std::env::var("NLBT_DAEMON_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_nftlb").to_string())
}

impl<'a> Daemon<'a> {
    /// Starts a daemon in `ns` on a copy of another daemon's state file (snapshot and
    /// journal), as a restart on another machine would: to compare what it builds.
    pub fn start_from_state(ns: &'a NetNs, other: &Daemon) -> Daemon<'a> {
        let mut d = Daemon::unstarted(ns);
        d.key = other.key.clone();
        let dir = d.dir.clone();
        let src = other.state_file();
        let (from, base) = (src.parent().unwrap(), src.file_name().unwrap());
        for e in fs::read_dir(from).expect("read state dir").flatten() {
            let n = e.file_name();
            if n.to_string_lossy().starts_with(&*base.to_string_lossy()) {
                fs::copy(e.path(), dir.join(&n)).expect("copy state file");
            }
        }
        d.spawn();
        d
    }

    /// Whether the daemon process still runs (not exited, not a zombie).
    pub fn alive(&self) -> bool {
        let Some(pid) = self.pid() else {
            return false;
        };
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|st| st != "Z" && st != "X"),
            Err(_) => false,
        }
    }
}
