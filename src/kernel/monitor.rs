//! Watches our tables for changes the daemon did not make, as `nft monitor` does: the
//! kernel announces every committed nftables transaction to the `NFNLGRP_NFTABLES`
//! multicast group, object by object, and closes it with a new-generation message that
//! names the process that made it. A transaction that touched a table named `nftlb`
//! and came from another process is reported, so that the writer can read the kernel
//! back and repair it (see `kernel::verify`).
//!
//! The data path (persistence, meters) changes dynamic sets without a transaction and
//! is not announced. With the `nft` command backend, the daemon's own changes come
//! from child processes and are reported too; the check then finds nothing to repair.

use std::io;
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

use super::netlink::messages;
use super::verify::{attr, attr_str};
use crate::ruleset::TABLE;

/// `NFNLGRP_NFTABLES`.
const GROUP: u32 = 7;
const SUBSYS: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
/// How long to wait for more changes after one was seen, so that a burst of hand edits
/// is checked once.
const SETTLE: Duration = Duration::from_millis(50);

/// What a foreign transaction touched, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    /// The process that made it (or why it is not known).
    pub by: String,
    /// What it touched, e.g. `delete rule (chain prerouting)`; at most a few.
    pub what: Vec<String>,
    /// The sets and maps whose elements were changed: (nfproto family, name). `None`
    /// when they are not known (announcements were lost, or too many to list).
    pub sets: Option<Vec<(u8, String)>>,
}

/// The most set names one report lists (beyond: `sets` is `None`, all are suspect).
const MAX_SETS: usize = 256;

/// Runs forever on the calling thread (in its network namespace), calling `report` for
/// each burst of foreign changes to our tables. Returns only if the socket cannot be
/// opened or fails for good.
pub fn watch(mut report: impl FnMut(Foreign)) -> io::Error {
    let mut sock = match open() {
        Ok(s) => s,
        Err(e) => return e,
    };
    let me = std::process::id();
    let mut buf = vec![0u8; 1 << 20];
    let mut touched: Vec<String> = Vec::new();
    let mut touched_sets: Vec<(u8, String)> = Vec::new();
    let mut pending: Option<Foreign> = None;
    loop {
        // With a report pending, wait only a moment for more.
        let timeout = pending.as_ref().map(|_| SETTLE);
        let n = match recv(&sock, &mut buf, timeout) {
            Ok(Some(n)) => n,
            Ok(None) => {
                if let Some(f) = pending.take() {
                    report(f);
                }
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                // Announcements were lost: assume the worst.
                touched.clear();
                touched_sets.clear();
                pending = Some(Foreign {
                    by: "unknown (announcements were lost)".into(),
                    what: Vec::new(),
                    sets: None,
                });
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("nftables monitor: {e}; reopening");
                std::thread::sleep(Duration::from_secs(1));
                match open() {
                    Ok(s) => sock = s,
                    Err(e) => return e,
                }
                continue;
            }
        };
        for part in messages(&buf[..n]) {
            let ty = u16::from_ne_bytes([part[4], part[5]]);
            if ty >> 8 != SUBSYS {
                continue;
            }
            let msg = ty & 0xff;
            let attrs = part.get(20..).unwrap_or_default();
            if msg == NFT_MSG_NEWGEN {
                if !touched.is_empty() {
                    let pid = attr(attrs, 2).map(|b| {
                        u32::from_be_bytes(b.get(..4).unwrap_or(&[0; 4]).try_into().expect("4"))
                    });
                    // The kernel names the thread that committed: ours are any of
                    // this process's threads.
                    let ours = pid.is_some_and(|p| {
                        p == me || std::path::Path::new(&format!("/proc/self/task/{p}")).exists()
                    });
                    if !ours {
                        let name = attr_str(attrs, 3).unwrap_or_default();
                        let by = match pid {
                            Some(p) => format!("{name} (PID {p})"),
                            None => "an unknown process".into(),
                        };
                        let f = pending.get_or_insert(Foreign {
                            by,
                            what: Vec::new(),
                            sets: Some(Vec::new()),
                        });
                        if let Some(sets) = &mut f.sets {
                            for s in touched_sets.drain(..) {
                                if !sets.contains(&s) {
                                    sets.push(s);
                                }
                            }
                            if sets.len() > MAX_SETS {
                                f.sets = None;
                            }
                        }
                        for t in touched.drain(..) {
                            if f.what.len() < 5 && !f.what.contains(&t) {
                                f.what.push(t);
                            }
                        }
                    }
                }
                touched.clear();
                touched_sets.clear();
                continue;
            }
            let Some(verb) = describe(msg) else {
                continue;
            };
            // Every object message names its table first (`NFTA_*_TABLE` is 1).
            if attr_str(attrs, 1).as_deref() != Some(TABLE) {
                continue;
            }
            let name = match msg {
                // rule: its chain; element: its set; others: their name.
                6 | 8 => attr_str(attrs, 2).map(|c| format!(" (chain {c})")),
                12 | 14 => attr_str(attrs, 2).map(|c| format!(" ({c})")),
                0 | 2 => None,
                3 | 5 => attr_str(attrs, 3).map(|c| format!(" {c}")),
                _ => attr_str(attrs, 2).map(|c| format!(" {c}")),
            };
            if matches!(msg, 12 | 14) && touched_sets.len() <= MAX_SETS {
                if let Some(set) = attr_str(attrs, 2) {
                    let family = part.get(16).copied().unwrap_or(0);
                    if !touched_sets.contains(&(family, set.clone())) {
                        touched_sets.push((family, set));
                    }
                }
            }
            touched.push(format!("{verb}{}", name.unwrap_or_default()));
        }
    }
}

/// What an object message does, for the messages that change our tables.
fn describe(msg: u16) -> Option<&'static str> {
    Some(match msg {
        0 => "add table",
        2 => "delete table",
        3 => "add chain",
        5 => "delete chain",
        6 => "add rule",
        8 => "delete rule",
        9 => "add set",
        11 => "delete set",
        12 => "add element",
        14 => "delete element",
        18 => "add object",
        20 => "delete object",
        _ => return None,
    })
}

fn open() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.add_membership(GROUP)?;
    // A flush of a large table announces every element: room for many.
    let _ = sock.set_rx_buf_sz(8 << 20);
    Ok(sock)
}

/// One datagram; `None` when `timeout` passed without one.
fn recv(sock: &Socket, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<usize>> {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| t.as_millis() as i32);
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if r == 0 {
        return Ok(None);
    }
    // SAFETY: recv into our buffer, whose length we pass.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(n as usize))
}
