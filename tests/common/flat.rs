//! A flat layer-2 lab for the ingress topologies (`dsr`, `stlsdnat`): client, load
//! balancer and backends on one bridge, as direct server return needs.
//!
//! ```text
//!  sw   br0 (bridge, no addresses)
//!   ├── cli  eth0 198.18.0.2/24  2001:2::2/64   02:00:00:00:00:02
//!   ├── lb   eth0 198.18.0.1/24  2001:2::1/64   02:00:00:00:00:01  (+ VIPs, add_vip)
//!   └── beN  eth0 198.18.0.(10+N)/24 2001:2::(10+N)/64 02:00:00:00:00:(10+N)
//!            arp_ignore=1, arp_announce=2 (a VIP on lo is never announced),
//!            arp_notify=1 (a MAC change is announced with a gratuitous ARP)
//! ```
//!
//! Nothing is created in the root namespace; every namespace is deleted on drop (after
//! the servers are stopped). Addresses are RFC 2544 / RFC 5180 benchmarking ones.

use super::*;

pub const FLAT_CLI4: &str = "198.18.0.2";
pub const FLAT_LB4: &str = "198.18.0.1";
pub const FLAT_CLI6: &str = "2001:2::2";
pub const FLAT_LB6: &str = "2001:2::1";

/// IPv4 address of flat backend `i` (1-based).
pub fn flat_be4(i: usize) -> String {
    format!("198.18.0.{}", 10 + i)
}

/// IPv6 address of flat backend `i` (1-based).
pub fn flat_be6(i: usize) -> String {
    format!("2001:2::{}", 10 + i)
}

/// The MAC every lab interface starts with: 02:00:00:00:00:xx.
pub fn flat_mac(last: u8) -> String {
    format!("02:00:00:00:00:{last:02x}")
}

pub struct FlatBackend {
    /// `be1`, `be2`, ... (also what its servers answer with)
    pub name: String,
    pub ns: NetNs,
    pub ip4: String,
    pub ip6: String,
    pub mac: String,
}

/// Client, load balancer and backends on one bridge.
pub struct FlatLab {
    servers: Mutex<Vec<Server>>,
    pub backends: Vec<FlatBackend>,
    pub cli: NetNs,
    pub lb: NetNs,
    pub sw: NetNs,
}

impl FlatLab {
    pub fn new(n_backends: usize) -> FlatLab {
        assert!((1..=20).contains(&n_backends), "1..=20 backends supported");
        let cli = NetNs::new("fcli");
        let lb = NetNs::new("flb");
        let sw = NetNs::new("fsw");
        let backends: Vec<FlatBackend> = (1..=n_backends)
            .map(|i| FlatBackend {
                name: format!("be{i}"),
                ns: NetNs::new(&format!("fbe{i}")),
                ip4: flat_be4(i),
                ip6: flat_be6(i),
                mac: flat_mac(0x10 + i as u8),
            })
            .collect();
        let mut root = vec![
            format!(
                "link add eth0 netns {} type veth peer name cli netns {}",
                cli.name, sw.name
            ),
            format!(
                "link add eth0 netns {} type veth peer name lb netns {}",
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
        let mut ports = vec!["cli", "lb"];
        ports.extend(backends.iter().map(|b| b.name.as_str()));
        make_switch(&sw, &ports);
        let host = |ns: &NetNs, mac: &str, ip4: &str, ip6: &str| {
            ip_batch(
                Some(&ns.name),
                &[
                    format!("link set eth0 address {mac}"),
                    "link set eth0 up".into(),
                    format!("addr add {ip4}/24 dev eth0"),
                    format!("addr add {ip6}/64 dev eth0 nodad"),
                ],
            );
        };
        host(&cli, &flat_mac(2), FLAT_CLI4, FLAT_CLI6);
        host(&lb, &flat_mac(1), FLAT_LB4, FLAT_LB6);
        for b in &backends {
            for (k, v) in [
                ("arp_ignore", "1"),
                ("arp_announce", "2"),
                ("arp_notify", "1"),
            ] {
                b.ns.sysctl(&format!("net/ipv4/conf/all/{k}"), v);
                b.ns.sysctl(&format!("net/ipv4/conf/default/{k}"), v);
            }
            host(&b.ns, &b.mac, &b.ip4, &b.ip6);
            for (k, v) in [
                ("arp_ignore", "1"),
                ("arp_announce", "2"),
                ("arp_notify", "1"),
            ] {
                b.ns.sysctl(&format!("net/ipv4/conf/eth0/{k}"), v);
            }
        }
        FlatLab {
            servers: Mutex::new(Vec::new()),
            backends,
            cli,
            lb,
            sw,
        }
    }

    /// Backend `i` (1-based).
    pub fn be(&self, i: usize) -> &FlatBackend {
        &self.backends[i - 1]
    }

    /// A virtual address on the load balancer's eth0 (it answers ARP / ND for it).
    pub fn add_lb_vip(&self, addr: &str) {
        match ip(addr) {
            IpAddr::V4(_) => self
                .lb
                .ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"]),
            IpAddr::V6(_) => self.lb.ip(&[
                "addr",
                "add",
                &format!("{addr}/128"),
                "dev",
                "eth0",
                "nodad",
            ]),
        };
    }

    /// A virtual address on every backend's `lo` (direct server return: they accept
    /// and answer from it, but do not announce it).
    pub fn backends_own(&self, addr: &str) {
        let len = if ip(addr).is_ipv4() { 32 } else { 128 };
        for b in &self.backends {
            b.ns.ip(&["addr", "add", &format!("{addr}/{len}"), "dev", "lo"]);
        }
    }

    /// Backends send replies for `client` through the load balancer (stateless DNAT
    /// in one arm).
    pub fn backends_route_via_lb(&self, client: &str) {
        let (len, gw) = if ip(client).is_ipv4() {
            (32, FLAT_LB4)
        } else {
            (128, FLAT_LB6)
        };
        for b in &self.backends {
            b.ns.ip(&["route", "add", &format!("{client}/{len}"), "via", gw]);
        }
    }

    /// TCP server on every backend: one reply line per connection, then close.
    pub fn serve_tcp(&self, port: u16) {
        for b in &self.backends {
            self.keep(tcp_server(&b.ns, &b.name, port, TcpMode::Close));
        }
    }

    /// UDP server on every backend bound to `addr` (replies come from it).
    pub fn serve_udp_on(&self, addr: &str, port: u16) {
        for b in &self.backends {
            self.keep(udp_server_on(&b.ns, &b.name, ip(addr), port));
        }
    }

    pub fn keep(&self, s: Server) {
        self.servers.lock().unwrap().push(s);
    }

    /// `n` sequential TCP connections from the client (see [`many`]).
    pub fn tcp_many(&self, addr: &str, port: u16, n: usize) -> Vec<io::Result<(String, IpAddr)>> {
        let a = ip(addr);
        self.cli
            .run(move || many(n, || tcp_request(a, port, TIMEOUT)))
    }

    /// `n` UDP exchanges from the client, each from a new socket (a new flow).
    pub fn udp_many(&self, addr: &str, port: u16, n: usize) -> Vec<io::Result<(String, IpAddr)>> {
        let a = ip(addr);
        self.cli
            .run(move || many(n, || udp_request(a, port, TIMEOUT)))
    }
}

/// A UDP server bound to one address (a DSR backend must answer from the VIP).
pub fn udp_server_on(ns: &NetNs, name: &str, addr: IpAddr, port: u16) -> Server {
    let name = name.to_string();
    let desc = format!("udp server {name} {addr}:{port} in {}", ns.name());
    start_server(ns, desc, move |tx, stop| {
        let sock = match UdpSocket::bind(SocketAddr::new(addr, port))
            .and_then(|s| s.set_read_timeout(Some(POLL)).map(|_| s))
        {
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

/// Turns transmit checksum offload off on `ifname` inside `ns` (SIOCETHTOOL,
/// ETHTOOL_STXCSUM), so that the interface sends fully computed checksums and a
/// receiver on a veth really verifies them: with offload on, veth carries "checksum
/// pending" packets that no receiver checks, which would hide a rewrite that forgets
/// to fix a checksum.
pub fn disable_tx_checksum(ns: &NetNs, ifname: &str) {
    let name = ifname.to_string();
    ns.run(move || {
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            data: *mut EthtoolValue,
            _pad: [u8; 16],
        }
        const SIOCETHTOOL: libc::c_ulong = 0x8946;
        const ETHTOOL_GTXCSUM: u32 = 0x16;
        const ETHTOOL_STXCSUM: u32 = 0x17;
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        let call = |cmd: u32, data: u32| -> u32 {
            let mut v = EthtoolValue { cmd, data };
            let mut req = IfReq {
                name: [0; 16],
                data: &mut v,
                _pad: [0; 16],
            };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
            assert!(
                rc == 0,
                "SIOCETHTOOL {cmd:#x} on {name}: {}",
                io::Error::last_os_error()
            );
            v.data
        };
        call(ETHTOOL_STXCSUM, 0);
        let now = call(ETHTOOL_GTXCSUM, 0);
        unsafe { libc::close(fd) };
        assert_eq!(now, 0, "tx checksumming still on for {name}");
    });
}

/// Counters in a table of their own (`table netdev probe`) at the very start of
/// `ifname`'s ingress inside `ns`: each `(name, match)` counts the packets matching.
pub struct Probe<'a> {
    ns: &'a NetNs,
}

impl<'a> Probe<'a> {
    pub fn install(ns: &'a NetNs, ifname: &str, counters: &[(&str, &str)]) -> Probe<'a> {
        let mut text = String::from("table netdev probe {\n");
        for (name, _) in counters {
            text += &format!("\tcounter {name} {{\n\t}}\n");
        }
        text += &format!(
            "\tchain in {{\n\t\ttype filter hook ingress device \"{ifname}\" priority -500; policy accept;\n"
        );
        for (name, m) in counters {
            text += &format!("\t\t{m} counter name \"{name}\"\n");
        }
        text += "\t}\n}\n";
        let path = std::env::temp_dir().join(format!(
            "nlbt-probe-{}-{}.nft",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        fs::write(&path, &text).expect("write probe rules");
        let out = ns.try_exec(&["nft", "-f", path.to_str().unwrap()]);
        let _ = fs::remove_file(&path);
        assert!(
            out.status.success(),
            "probe rules refused: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        Probe { ns }
    }

    /// Packets counted so far by counter `name`.
    pub fn packets(&self, name: &str) -> u64 {
        let out = self.ns.nft(&["list", "counter", "netdev", "probe", name]);
        let mut it = out.split_whitespace();
        while let Some(w) = it.next() {
            if w == "packets" {
                return it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("bad counter listing: {out}"));
            }
        }
        panic!("no packets in counter listing: {out}");
    }
}
