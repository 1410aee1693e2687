//! What the data plane needs to know about the host's network (interfaces, MAC
//! addresses, routes, neighbours), gathered through rtnetlink before rendering so that
//! rendering stays a pure function of the state and a [`NetView`].
//!
//! Only the ingress topologies (`dsr`, `stlsdnat`) need it. For every such farm that is
//! up, [`gather`] finds:
//! - the input interface of each virtual address: the local interface holding the
//!   address (`iface` overrides), and its MAC (`iether-addr` overrides);
//! - the output interface toward each backend: a route lookup (`oface` overrides),
//!   refused when the route goes through a gateway (the backend is not on our L2);
//! - each backend's MAC from the neighbour table (the backend's `ether-addr`
//!   overrides). An unknown neighbour is resolved with an `RTM_NEWNEIGH` carrying
//!   `NTF_USE` (the kernel's own "resolve this" request: ARP or neighbour discovery,
//!   no traffic of ours, IPv4 and IPv6 alike). A neighbour never seen before is
//!   waited for briefly (at most [`RESOLVE_WAIT`]), so that a new farm on a healthy
//!   LAN is served by the time its request is answered; otherwise the farm is rendered
//!   without it and [`watch`] re-renders when it resolves.
//!
//! A MAC once learned is kept while the kernel's entry is merely absent (the kernel
//! garbage-collects unused entries, and in these topologies the host itself never
//! sends to the backends, so their entries are never refreshed by use). A backend is
//! dropped only when its entry is `FAILED` (it does not answer) or shows another MAC.
//!
//! With no `dsr`/`stlsdnat` farm up, [`gather`] does no I/O at all and [`watch`]
//! ignores every event.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_MULTIPART, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::model::{BackendStatus, FarmState, Mac, Mode, State};

/// Longest time [`gather`] waits for neighbours it has just asked the kernel to resolve.
pub const RESOLVE_WAIT: Duration = Duration::from_millis(150);
/// Shortest interval between two resolution requests for the same neighbour.
const RETRIGGER: Duration = Duration::from_secs(2);
/// Timeout of one netlink exchange.
const NL_TIMEOUT: Duration = Duration::from_secs(2);

/// A snapshot of the network facts rendering needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetView {
    /// Whether discovery ran (it does only when some farm needs it).
    pub gathered: bool,
    /// Why discovery failed, when it did (every ingress farm then reports it).
    pub error: Option<String>,
    /// Interfaces by name.
    pub links: BTreeMap<String, Link>,
    /// Local addresses and the interface holding each (the first one found).
    pub addrs: BTreeMap<IpAddr, String>,
    /// Route lookups of backend addresses.
    pub routes: BTreeMap<IpAddr, Route>,
    /// Neighbours by (interface, address).
    pub neighbours: BTreeMap<(String, IpAddr), Neigh>,
}

/// An interface.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Hardware address (none for loopback and layer-3 devices).
    pub mac: Option<Mac>,
    /// Administratively up.
    pub up: bool,
    /// The loopback interface.
    pub loopback: bool,
}

/// Where the kernel would send a packet to an address.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// Out of `oif`, directly (`gateway` none) or through a gateway.
    Via {
        /// Output interface name.
        oif: String,
        /// Next hop, when not on-link.
        gateway: Option<IpAddr>,
    },
    /// The address is one of this host's.
    Local,
    /// No usable route (the kernel's answer).
    Unreachable(String),
}

/// What the neighbour table says about an address on an interface.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Neigh {
    /// Resolved (or last known) MAC.
    Known(Mac),
    /// Resolution in progress.
    Resolving,
    /// The address did not answer.
    Failed,
}

impl NetView {
    /// The interface holding a local address.
    pub fn iface_of(&self, ip: &IpAddr) -> Option<&str> {
        self.addrs.get(ip).map(String::as_str)
    }
}

// ---------------------------------------------------------------------------
// what the farms need

#[derive(Default)]
struct Needs {
    /// Backend addresses to route (those without an `oface` override).
    route: BTreeSet<IpAddr>,
    /// (oface override or None, backend address, try to resolve).
    neigh: Vec<(Option<String>, IpAddr, bool)>,
    /// Virtual addresses.
    vips: BTreeSet<IpAddr>,
}

fn needs(state: &State) -> Needs {
    let mut n = Needs::default();
    for farm in state.farms.values() {
        if farm.state != FarmState::Up || !matches!(farm.mode, Mode::Dsr | Mode::Stlsdnat) {
            continue;
        }
        for a in state.farm_addresses(farm) {
            if let Some(ip) = a.ip_addr {
                n.vips.insert(ip);
            }
        }
        let statuses = state.backend_statuses(farm);
        for (b, st) in farm.backends.iter().zip(&statuses) {
            let Some(ip) = b.ip_addr else { continue };
            if farm.oface.is_none() {
                n.route.insert(ip);
            }
            if b.ether_addr.is_none() {
                let wanted = matches!(st, BackendStatus::Up | BackendStatus::Available);
                n.neigh.push((farm.oface.clone(), ip, wanted));
            }
        }
    }
    n
}

/// Whether any farm needs network facts.
pub fn needed(state: &State) -> bool {
    state.farms.values().any(|f| farm_needs(f))
}

/// Whether this farm's rules depend on the live network (an up dsr/stlsdnat farm).
pub fn farm_needs(f: &crate::model::Farm) -> bool {
    f.state == FarmState::Up && matches!(f.mode, Mode::Dsr | Mode::Stlsdnat)
}

// ---------------------------------------------------------------------------
// state shared by gather (writer thread) and watch (watcher thread)

#[derive(Default)]
struct Shared {
    /// Last MAC seen per (interface, address).
    cache: BTreeMap<(String, IpAddr), Mac>,
    /// When resolution was last requested per (interface, address).
    triggered: BTreeMap<(String, IpAddr), Instant>,
    /// What the watcher should care about.
    interest: Interest,
    /// Some wanted neighbour is unresolved: the watcher retries now and then.
    unresolved: bool,
}

/// The addresses whose changes matter, from the last gather.
#[derive(Debug, Clone, Default, PartialEq)]
struct Interest {
    backends: BTreeSet<IpAddr>,
    vips: BTreeSet<IpAddr>,
}

impl Interest {
    fn is_empty(&self) -> bool {
        self.backends.is_empty() && self.vips.is_empty()
    }
}

static SHARED: Mutex<Option<Shared>> = Mutex::new(None);

fn with_shared<R>(f: impl FnOnce(&mut Shared) -> R) -> R {
    let mut g = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(Shared::default))
}

// ---------------------------------------------------------------------------
// gather

/// Gathers the facts `state` needs (only for farms that need them: `dsr`, `stlsdnat`,
/// state up). Does no I/O when no farm needs anything. May ask the kernel to resolve
/// unknown neighbours and wait for them for at most [`RESOLVE_WAIT`].
pub fn gather(state: &State) -> NetView {
    if !needed(state) {
        with_shared(|s| {
            s.interest = Interest::default();
            s.unresolved = false;
        });
        return NetView::default();
    }
    let needs = needs(state);
    let mut view = NetView {
        gathered: true,
        ..Default::default()
    };
    if let Err(e) = gather_into(&needs, &mut view) {
        tracing::warn!("network discovery failed: {e}");
        view.error = Some(e.to_string());
    }
    let unresolved = needs.neigh.iter().any(|(oface, ip, wanted)| {
        *wanted
            && oface_for(&view, oface.as_deref(), ip)
                .is_some_and(|o| !matches!(view.neighbours.get(&(o, *ip)), Some(Neigh::Known(_))))
    });
    with_shared(|s| {
        s.interest = Interest {
            backends: needs
                .neigh
                .iter()
                .map(|(_, ip, _)| *ip)
                .chain(needs.route.iter().copied())
                .collect(),
            vips: needs.vips.clone(),
        };
        s.unresolved = unresolved;
    });
    view
}

/// The output interface toward a backend: the override, else the route's interface
/// when the backend is on-link.
fn oface_for(view: &NetView, oface: Option<&str>, ip: &IpAddr) -> Option<String> {
    match oface {
        Some(o) => Some(o.to_string()),
        None => match view.routes.get(ip) {
            Some(Route::Via { oif, gateway: None }) => Some(oif.clone()),
            _ => None,
        },
    }
}

fn gather_into(needs: &Needs, view: &mut NetView) -> io::Result<()> {
    let mut nl = Nl::open()?;
    let mut by_index = BTreeMap::new();
    for m in nl.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
        if let RouteNetlinkMessage::NewLink(l) = m {
            if let Some((name, link)) = parse_link(&l) {
                by_index.insert(link.index, name.clone());
                view.links.insert(name, link);
            }
        }
    }
    for m in nl.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))? {
        if let RouteNetlinkMessage::NewAddress(a) = m {
            if let (Some(ip), Some(name)) = (addr_of(&a), by_index.get(&a.header.index)) {
                view.addrs.entry(ip).or_insert_with(|| name.clone());
            }
        }
    }
    for ip in &needs.route {
        let r = match nl.get_route(*ip) {
            Ok(Some((kind, oif, gw))) => match kind {
                RouteType::Local => Route::Local,
                RouteType::Unicast => match oif.and_then(|i| by_index.get(&i)) {
                    Some(name) => Route::Via {
                        oif: name.clone(),
                        gateway: gw,
                    },
                    None => Route::Unreachable("no output interface".into()),
                },
                other => Route::Unreachable(format!("route type {other:?}")),
            },
            Ok(None) => Route::Unreachable("no route".into()),
            Err(e) => Route::Unreachable(e.to_string()),
        };
        view.routes.insert(*ip, r);
    }
    // Neighbours: read, request resolution where needed, wait briefly for new ones.
    let mut keys: BTreeMap<(String, IpAddr), bool> = BTreeMap::new();
    for (oface, ip, wanted) in &needs.neigh {
        if let Some(o) = oface_for(view, oface.as_deref(), ip) {
            *keys.entry((o, *ip)).or_default() |= *wanted;
        }
    }
    let now = Instant::now();
    let mut waiting = Vec::new();
    let mut table = None;
    for ((oface, ip), wanted) in &keys {
        let Some(link) = view.links.get(oface) else {
            continue;
        };
        let index = link.index;
        let state = read_neigh(&mut nl, &mut table, index, *ip)?;
        let key = (oface.clone(), *ip);
        let (neigh, trigger, wait) = with_shared(|s| {
            let cached = s.cache.get(&key).copied();
            let recent = s
                .triggered
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < RETRIGGER);
            match state {
                Some(NeighRead::Valid(mac)) => {
                    s.cache.insert(key.clone(), mac);
                    (Neigh::Known(mac), false, false)
                }
                Some(NeighRead::Incomplete) => {
                    (cached.map_or(Neigh::Resolving, Neigh::Known), false, false)
                }
                Some(NeighRead::Failed) => {
                    s.cache.remove(&key);
                    (Neigh::Failed, *wanted && !recent, false)
                }
                None => match cached {
                    Some(mac) => (Neigh::Known(mac), *wanted && !recent, false),
                    None => (Neigh::Resolving, *wanted && !recent, *wanted && !recent),
                },
            }
        });
        if trigger {
            match nl.resolve(index, *ip) {
                Ok(()) => {
                    with_shared(|s| s.triggered.insert(key.clone(), now));
                    if wait {
                        waiting.push((index, key.clone()));
                    }
                }
                Err(e) => tracing::warn!("cannot request resolution of {ip} on {oface}: {e}"),
            }
        }
        view.neighbours.insert(key, neigh);
    }
    let deadline = Instant::now() + RESOLVE_WAIT;
    while !waiting.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        // A dumped table (old kernels) is a snapshot: take a new one.
        table = None;
        let mut still = Vec::new();
        for (index, key) in waiting {
            match read_neigh(&mut nl, &mut table, index, key.1)? {
                Some(NeighRead::Valid(mac)) => {
                    with_shared(|s| s.cache.insert(key.clone(), mac));
                    view.neighbours.insert(key, Neigh::Known(mac));
                }
                Some(NeighRead::Failed) => {
                    view.neighbours.insert(key, Neigh::Failed);
                }
                _ => still.push((index, key)),
            }
        }
        waiting = still;
    }
    // Forget cached MACs of addresses no farm uses any more.
    with_shared(|s| {
        s.cache.retain(|k, _| keys.contains_key(k));
        s.triggered.retain(|k, _| keys.contains_key(k));
    });
    Ok(())
}

/// One neighbour entry: asked for alone, or (kernels without `RTM_GETNEIGH` for one
/// entry, before 5.0) looked up in a dump of the table, taken once per gather.
fn read_neigh(
    nl: &mut Nl,
    table: &mut Option<BTreeMap<(u32, IpAddr), NeighRead>>,
    index: u32,
    ip: IpAddr,
) -> io::Result<Option<NeighRead>> {
    if table.is_none() {
        match nl.get_neigh(index, ip) {
            Ok(r) => return Ok(r),
            Err(e) => {
                tracing::debug!("single neighbour lookup failed ({e}); dumping the table");
                let mut t = BTreeMap::new();
                for m in nl.dump(RouteNetlinkMessage::GetNeighbour(
                    NeighbourMessage::default(),
                ))? {
                    if let RouteNetlinkMessage::NewNeighbour(n) = m {
                        if let (Some(dst), Some(r)) = (neigh_dst(&n), neigh_read(&n)) {
                            t.insert((n.header.ifindex, dst), r);
                        }
                    }
                }
                *table = Some(t);
            }
        }
    }
    Ok(table.as_ref().and_then(|t| t.get(&(index, ip)).copied()))
}

fn parse_link(l: &LinkMessage) -> Option<(String, Link)> {
    let mut name = None;
    let mut mac = None;
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(b) if b.len() == 6 => {
                let mut m = [0u8; 6];
                m.copy_from_slice(b);
                if m != [0; 6] {
                    mac = Some(Mac(m));
                }
            }
            _ => {}
        }
    }
    Some((
        name?,
        Link {
            index: l.header.index,
            mac,
            up: l.header.flags.contains(LinkFlags::Up),
            loopback: l.header.flags.contains(LinkFlags::Loopback),
        },
    ))
}

fn addr_of(a: &AddressMessage) -> Option<IpAddr> {
    // IFA_LOCAL is the local address on point-to-point links; IFA_ADDRESS otherwise.
    let mut addr = None;
    for at in &a.attributes {
        match at {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => addr = Some(*ip),
            _ => {}
        }
    }
    addr
}

// ---------------------------------------------------------------------------
// netlink

/// A neighbour entry as read from the kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NeighRead {
    Valid(Mac),
    Incomplete,
    Failed,
}

fn neigh_read(m: &NeighbourMessage) -> Option<NeighRead> {
    let lladdr = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
            let mut x = [0u8; 6];
            x.copy_from_slice(b);
            Some(Mac(x))
        }
        _ => None,
    });
    match m.header.state {
        NeighbourState::Reachable
        | NeighbourState::Stale
        | NeighbourState::Delay
        | NeighbourState::Probe
        | NeighbourState::Permanent
        | NeighbourState::Noarp => lladdr.map(NeighRead::Valid),
        NeighbourState::Incomplete => Some(NeighRead::Incomplete),
        NeighbourState::Failed => Some(NeighRead::Failed),
        _ => None,
    }
}

fn neigh_dst(m: &NeighbourMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

fn family(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn neigh_addr(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

fn set_timeout(fd: i32, opt: libc::c_int, d: Duration) {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt with a valid timeval on a socket we own.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
}

/// A route lookup's answer: (type, output interface index, gateway).
type RouteAnswer = (RouteType, Option<u32>, Option<IpAddr>);

/// A synchronous rtnetlink request socket.
struct Nl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Nl {
    fn open() -> io::Result<Nl> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        set_timeout(sock.as_raw_fd(), libc::SO_RCVTIMEO, NL_TIMEOUT);
        set_timeout(sock.as_raw_fd(), libc::SO_SNDTIMEO, NL_TIMEOUT);
        Ok(Nl {
            sock,
            seq: 0,
            buf: vec![0; 1 << 16],
        })
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        m.finalize();
        let mut out = vec![0u8; m.buffer_len()];
        m.serialize(&mut out);
        self.sock.send_to(&out, &SocketAddr::new(0, 0), 0)?;
        Ok(self.seq)
    }

    /// Sends a request and collects the answers (a dump's parts, or the single reply),
    /// until NLMSG_DONE, an error/ACK, or the end of a non-multipart reply.
    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(msg, flags)?;
        let mut out = Vec::new();
        let deadline = Instant::now() + NL_TIMEOUT;
        // Bounded: a dump of a million objects still ends; the deadline covers a
        // misbehaving peer.
        for _ in 0..1_000_000 {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "netlink: no answer",
                ));
            }
            // SAFETY: recv into our buffer, whose length we pass.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    self.buf.as_mut_ptr() as *mut libc::c_void,
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut finished = false;
            for part in crate::kernel::netlink::messages(&self.buf[..n as usize]) {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(part)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                if m.header.sequence_number != seq {
                    continue;
                }
                let multipart = m.header.flags & NLM_F_MULTIPART != 0;
                match m.payload {
                    NetlinkPayload::Done(_) => finished = true,
                    NetlinkPayload::Error(e) => {
                        if let Some(code) = e.code {
                            return Err(io::Error::from_raw_os_error(-code.get()));
                        }
                        finished = true;
                    }
                    NetlinkPayload::InnerMessage(inner) => {
                        out.push(inner);
                        if !multipart && flags & NLM_F_DUMP != NLM_F_DUMP {
                            finished = flags & NLM_F_ACK == 0;
                        }
                    }
                    _ => {}
                }
            }
            if finished {
                return Ok(out);
            }
        }
        Err(io::Error::other("netlink: reply too long"))
    }

    fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.exchange(msg, NLM_F_DUMP)
    }

    /// Route lookup: (type, output interface index, gateway).
    fn get_route(&mut self, ip: IpAddr) -> io::Result<Option<RouteAnswer>> {
        let mut m = RouteMessage::default();
        m.header.address_family = family(&ip);
        m.header.destination_prefix_length = if ip.is_ipv4() { 32 } else { 128 };
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(ip)));
        let replies = match self.exchange(RouteNetlinkMessage::GetRoute(m), 0) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ESRCH)
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        for r in replies {
            if let RouteNetlinkMessage::NewRoute(r) = r {
                let mut oif = None;
                let mut gw = None;
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(IpAddr::V4(*g)),
                        RouteAttribute::Gateway(RouteAddress::Inet6(g)) => {
                            gw = Some(IpAddr::V6(*g))
                        }
                        _ => {}
                    }
                }
                return Ok(Some((r.header.kind, oif, gw)));
            }
        }
        Ok(None)
    }

    /// One neighbour entry; `None` when there is none.
    fn get_neigh(&mut self, index: u32, ip: IpAddr) -> io::Result<Option<NeighRead>> {
        let mut m = NeighbourMessage::default();
        m.header.family = family(&ip);
        m.header.ifindex = index;
        m.attributes
            .push(NeighbourAttribute::Destination(neigh_addr(ip)));
        match self.exchange(RouteNetlinkMessage::GetNeighbour(m), 0) {
            Ok(replies) => Ok(replies.iter().find_map(|r| match r {
                RouteNetlinkMessage::NewNeighbour(n) => neigh_read(n),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Asks the kernel to resolve a neighbour (creates the entry if needed and starts
    /// ARP / neighbour discovery, as if a packet were waiting for it).
    fn resolve(&mut self, index: u32, ip: IpAddr) -> io::Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = family(&ip);
        m.header.ifindex = index;
        m.header.flags = NeighbourFlags::Use;
        m.attributes
            .push(NeighbourAttribute::Destination(neigh_addr(ip)));
        self.exchange(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(|_| ())
    }
}

// ---------------------------------------------------------------------------
// watch

/// rtnetlink multicast groups (RTNLGRP_*).
const GROUPS: [u32; 6] = [
    1,  // LINK
    3,  // NEIGH
    5,  // IPV4_IFADDR
    7,  // IPV4_ROUTE
    9,  // IPV6_IFADDR
    11, // IPV6_ROUTE
];
/// How long events are collected before one refresh is requested.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Retry intervals for unresolved neighbours (doubling up to the maximum).
const RETRY_MIN: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What the watcher remembers to tell real changes from repetitions.
#[derive(Default)]
struct Seen {
    links: BTreeMap<u32, (String, Option<Mac>, bool)>,
    neigh: BTreeMap<(u32, IpAddr), Option<Mac>>,
}

impl Seen {
    /// Whether an event changes something the farms depend on.
    fn relevant(&mut self, interest: &Interest, m: &RouteNetlinkMessage) -> bool {
        match m {
            RouteNetlinkMessage::NewLink(l) => {
                let Some((name, link)) = parse_link(l) else {
                    return false;
                };
                let now = (name, link.mac, link.up);
                let before = self.links.insert(link.index, now.clone());
                before.as_ref() != Some(&now) && !interest.is_empty()
            }
            RouteNetlinkMessage::DelLink(l) => {
                self.links.remove(&l.header.index).is_some() && !interest.is_empty()
            }
            RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
                addr_of(a).is_some_and(|ip| interest.vips.contains(&ip))
            }
            RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
                let Some(ip) = neigh_dst(n) else {
                    return false;
                };
                if !interest.backends.contains(&ip) {
                    return false;
                }
                let mac = match (m, neigh_read(n)) {
                    (RouteNetlinkMessage::DelNeighbour(_), _) => None,
                    (_, Some(NeighRead::Valid(mac))) => Some(mac),
                    (_, Some(NeighRead::Failed)) => None,
                    // In progress: nothing to act on yet.
                    _ => return false,
                };
                let key = (n.header.ifindex, ip);
                let before = self.neigh.insert(key, mac);
                before != Some(mac) && !(before.is_none() && mac.is_none())
            }
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                    RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                    _ => None,
                });
                let plen = r.header.destination_prefix_length;
                interest
                    .backends
                    .iter()
                    .any(|b| prefix_contains(dst, plen, b))
            }
            _ => false,
        }
    }
}

/// Whether `ip` is inside `net/plen` (a missing destination is the default route).
fn prefix_contains(net: Option<IpAddr>, plen: u8, ip: &IpAddr) -> bool {
    match (net, ip) {
        (None, _) => plen == 0,
        (Some(IpAddr::V4(n)), IpAddr::V4(a)) => {
            let p = u32::from(plen.min(32));
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            u32::from(n) & mask == u32::from(*a) & mask
        }
        (Some(IpAddr::V6(n)), IpAddr::V6(a)) => {
            let p = u32::from(plen.min(128));
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            u128::from(n) & mask == u128::from(*a) & mask
        }
        _ => false,
    }
}

/// Watches the network for changes that matter (addresses, links, routes, neighbours)
/// and calls `changed` once after each burst of them; runs until the process ends. The
/// daemon calls it on a thread of its own; `changed` makes the writer gather and
/// re-render. While a wanted neighbour is unresolved it also calls `changed` now and
/// then (every 2 s, doubling up to 30 s) so that resolution is retried.
pub fn watch(changed: impl Fn() + Send + 'static) {
    let sock = match open_watch() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("network watcher disabled: cannot subscribe to rtnetlink: {e}");
            return;
        }
    };
    let fd = sock.as_raw_fd();
    let mut buf = vec![0u8; 1 << 16];
    let mut seen = Seen::default();
    let mut dirty_since: Option<Instant> = None;
    let mut retry_wait = RETRY_MIN;
    let mut next_retry: Option<Instant> = None;
    let mut errors = 0u32;
    loop {
        let unresolved = with_shared(|s| s.unresolved);
        let now = Instant::now();
        match (unresolved, next_retry) {
            (true, None) => next_retry = Some(now + retry_wait),
            (false, _) => {
                next_retry = None;
                retry_wait = RETRY_MIN;
            }
            _ => {}
        }
        let mut deadlines = Vec::new();
        if let Some(t) = dirty_since {
            deadlines.push(t + DEBOUNCE);
        }
        if let Some(t) = next_retry {
            deadlines.push(t);
        }
        let timeout_ms: i32 = match deadlines.iter().min() {
            Some(d) => d.saturating_duration_since(now).as_millis().min(60_000) as i32,
            // Nothing pending: wake up once a minute anyway to pick up a new interest.
            None => 60_000,
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid descriptor.
        let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if rc > 0 {
            // What matters now (a request may have changed it while we slept).
            let interest = with_shared(|s| s.interest.clone());
            // Drain what is queued (bounded).
            for _ in 0..1024 {
                // SAFETY: non-blocking recv into our buffer.
                let n = unsafe {
                    libc::recv(
                        fd,
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) => break,
                        Some(libc::EINTR) => continue,
                        // Events were lost: assume something changed.
                        Some(libc::ENOBUFS) => {
                            dirty_since.get_or_insert(Instant::now());
                            continue;
                        }
                        _ => {
                            errors += 1;
                            tracing::warn!("network watcher: {e}");
                            if errors > 100 {
                                tracing::error!("network watcher stops after repeated errors");
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(100));
                            break;
                        }
                    }
                }
                let mut relevant = false;
                for_each_message(&buf[..n as usize], |m| {
                    if seen.relevant(&interest, m) {
                        tracing::debug!("network change: {}", describe(m));
                        relevant = true;
                    }
                });
                if relevant {
                    dirty_since.get_or_insert(Instant::now());
                }
            }
        }
        let now = Instant::now();
        let debounced = dirty_since.is_some_and(|t| now >= t + DEBOUNCE);
        let retry = next_retry.is_some_and(|t| now >= t);
        if debounced || retry {
            if retry {
                retry_wait = (retry_wait * 2).min(RETRY_MAX);
            }
            dirty_since = None;
            next_retry = None;
            tracing::debug!(retry, "network changed: rendering again");
            changed();
        }
    }
}

/// A short description of an event, for the debug log.
fn describe(m: &RouteNetlinkMessage) -> String {
    match m {
        RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => format!(
            "link {} {:?}",
            l.header.index,
            parse_link(l).map(|(n, _)| n)
        ),
        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
            format!("address {:?}", addr_of(a))
        }
        RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
            format!("neighbour {:?} {:?}", neigh_dst(n), neigh_read(n))
        }
        RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_) => "route".into(),
        _ => "other".into(),
    }
}

fn open_watch() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    for g in GROUPS {
        sock.add_membership(g)?;
    }
    let _ = sock.set_rx_buf_sz(1 << 20);
    Ok(sock)
}

fn for_each_message(data: &[u8], mut f: impl FnMut(&RouteNetlinkMessage)) {
    let mut off = 0usize;
    while off + 16 <= data.len() {
        let len = u32::from_ne_bytes(data[off..off + 4].try_into().expect("4 bytes")) as usize;
        if len < 16 || off + len > data.len() {
            break;
        }
        if let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..off + len]) {
            if let NetlinkPayload::InnerMessage(inner) = &m.payload {
                f(inner);
            }
        }
        off += (len + 3) & !3;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes() {
        assert!(prefix_contains(
            Some(ip("198.18.0.0")),
            24,
            &ip("198.18.0.7")
        ));
        assert!(!prefix_contains(
            Some(ip("198.18.1.0")),
            24,
            &ip("198.18.0.7")
        ));
        assert!(prefix_contains(None, 0, &ip("2001:2::1")));
        assert!(prefix_contains(
            Some(ip("2001:2::")),
            48,
            &ip("2001:2:0:1::11")
        ));
        assert!(!prefix_contains(
            Some(ip("2001:2::")),
            48,
            &ip("198.18.0.7")
        ));
    }

    fn neigh(ip: IpAddr, state: NeighbourState, mac: Option<[u8; 6]>) -> RouteNetlinkMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = family(&ip);
        m.header.ifindex = 2;
        m.header.state = state;
        m.attributes
            .push(NeighbourAttribute::Destination(neigh_addr(ip)));
        if let Some(mac) = mac {
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        }
        RouteNetlinkMessage::NewNeighbour(m)
    }

    #[test]
    fn neighbour_events_signal_only_mac_changes() {
        let be = ip("198.18.0.11");
        let interest = Interest {
            backends: [be].into(),
            vips: BTreeSet::new(),
        };
        let mut seen = Seen::default();
        let a = [2, 0, 0, 0, 0, 0x11];
        let b = [2, 0, 0, 0, 0, 0x99];
        // Resolution in progress, then failure without ever a MAC: nothing to do.
        assert!(!seen.relevant(&interest, &neigh(be, NeighbourState::Incomplete, None)));
        assert!(!seen.relevant(&interest, &neigh(be, NeighbourState::Failed, None)));
        // Resolved: relevant once; state changes with the same MAC are not.
        assert!(seen.relevant(&interest, &neigh(be, NeighbourState::Reachable, Some(a))));
        assert!(!seen.relevant(&interest, &neigh(be, NeighbourState::Stale, Some(a))));
        assert!(!seen.relevant(&interest, &neigh(be, NeighbourState::Delay, Some(a))));
        // A new MAC is.
        assert!(seen.relevant(&interest, &neigh(be, NeighbourState::Stale, Some(b))));
        // Failure after a MAC is.
        assert!(seen.relevant(&interest, &neigh(be, NeighbourState::Failed, None)));
        // Other addresses never are.
        assert!(!seen.relevant(
            &interest,
            &neigh(ip("198.18.0.99"), NeighbourState::Reachable, Some(a))
        ));
        // Nothing is when no farm needs the network.
        let mut seen = Seen::default();
        assert!(!seen.relevant(
            &Interest::default(),
            &neigh(be, NeighbourState::Reachable, Some(a))
        ));
    }

    #[test]
    fn no_ingress_farm_means_no_io() {
        let st = State::default();
        assert_eq!(gather(&st), NetView::default());
    }
}
