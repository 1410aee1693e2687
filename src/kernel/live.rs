//! What only the kernel knows, read for GET answers: named counters, per-element
//! counters, and the elements the data path learns (with their expiry).
//!
//! Reads run on the API's threads, beside the writer, so they do not use libnftables (it
//! keeps process-wide state, such as its interface cache, that contexts on several
//! threads would share unguarded): each read asks the kernel over a `NETLINK_NETFILTER`
//! socket of its own, taken from a small pool.

use std::sync::Mutex;

use super::verify::{
    attr, be32, nfproto, nlas, nul_terminated, Dumper, NFT_MSG_GETOBJ, NFT_MSG_GETSETELEM,
};
use super::KernelError;
use crate::ruleset::{TableFamily, TABLE};

/// `NFT_OBJECT_COUNTER`.
const OBJECT_COUNTER: u32 = 1;

/// One element of a set or map as the kernel holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveElement {
    /// The key's bytes (concatenated fields padded to 4 bytes each).
    pub key: Vec<u8>,
    /// A map element's value bytes.
    pub data: Option<Vec<u8>>,
    /// Milliseconds left before the element expires.
    pub expires_ms: Option<u64>,
    /// The element's counter: (packets, bytes).
    pub counter: Option<(u64, u64)>,
}

/// Read-only access to our tables' live data, usable from any thread.
pub trait Live: Send + Sync {
    /// The named counter `name` of our table in `fam`: (packets, bytes); `None` if
    /// there is no such counter.
    fn counter(&self, fam: TableFamily, name: &str) -> Result<Option<(u64, u64)>, KernelError>;
    /// The elements of the set or map `set` of our table in `fam` (none if it does not
    /// exist).
    fn elements(&self, fam: TableFamily, set: &str) -> Result<Vec<LiveElement>, KernelError>;
}

/// No kernel to ask (the in-memory test backend): every read fails.
pub struct NoLive;

impl Live for NoLive {
    fn counter(&self, _: TableFamily, _: &str) -> Result<Option<(u64, u64)>, KernelError> {
        Err(KernelError::Unavailable("no kernel".into()))
    }
    fn elements(&self, _: TableFamily, _: &str) -> Result<Vec<LiveElement>, KernelError> {
        Err(KernelError::Unavailable("no kernel".into()))
    }
}

/// Reads over netlink, in the network namespace of the process. Sockets are reused: a
/// read takes one from the pool (or opens one) and gives it back.
#[derive(Default)]
pub struct NetlinkLive {
    idle: Mutex<Vec<Dumper>>,
}

/// Sockets kept open between reads (one per concurrent reader is enough).
const IDLE_SOCKETS: usize = 8;

impl NetlinkLive {
    fn with<R>(
        &self,
        f: impl FnOnce(&mut Dumper) -> Result<R, KernelError>,
    ) -> Result<R, KernelError> {
        let taken = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut d = match taken {
            Some(d) => d,
            None => Dumper::new()?,
        };
        let r = f(&mut d);
        // A socket whose request failed may hold a half-read answer: drop it.
        if r.is_ok() {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < IDLE_SOCKETS {
                idle.push(d);
            }
        }
        r
    }
}

impl Live for NetlinkLive {
    fn counter(&self, fam: TableFamily, name: &str) -> Result<Option<(u64, u64)>, KernelError> {
        let table = nul_terminated(TABLE);
        let obj = nul_terminated(name);
        let ty = OBJECT_COUNTER.to_be_bytes();
        let mut out = None;
        self.with(|d| {
            d.get(
                nfproto(fam),
                NFT_MSG_GETOBJ,
                &[(1, &table), (2, &obj), (3, &ty)],
                |attrs| {
                    // NFTA_OBJ_DATA: NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS.
                    if let Some(data) = attr(attrs, 4) {
                        let n = |ty| attr(data, ty).map_or(0, be64);
                        out = Some((n(2), n(1)));
                    }
                },
            )
        })?;
        Ok(out)
    }

    fn elements(&self, fam: TableFamily, set: &str) -> Result<Vec<LiveElement>, KernelError> {
        let table = nul_terminated(TABLE);
        let name = nul_terminated(set);
        let mut out = Vec::new();
        self.with(|d| {
            d.dump(
                nfproto(fam),
                NFT_MSG_GETSETELEM,
                &[(1, &table), (2, &name)],
                |attrs| {
                    // NFTA_SET_ELEM_LIST_ELEMENTS: NFTA_LIST_ELEM each.
                    let Some(list) = attr(attrs, 3) else {
                        return;
                    };
                    out.extend(nlas(list).map(|(_, e)| element(e)));
                },
            )
        })?;
        Ok(out)
    }
}

/// An element from its `NFTA_LIST_ELEM` payload.
fn element(e: &[u8]) -> LiveElement {
    // NFTA_DATA_VALUE inside NFTA_SET_ELEM_KEY / NFTA_SET_ELEM_DATA.
    let value = |a: &[u8]| attr(a, 1).map(<[u8]>::to_vec);
    // NFTA_SET_ELEM_EXPR (one expression) or NFTA_SET_ELEM_EXPRESSIONS (a list).
    let exprs = attr(e, 7).into_iter().chain(
        attr(e, 11)
            .into_iter()
            .flat_map(|l| nlas(l).map(|(_, x)| x)),
    );
    let mut counter = None;
    for x in exprs {
        if attr(x, 1).is_some_and(|n| n.starts_with(b"counter\0")) {
            let data = attr(x, 2).unwrap_or_default();
            let n = |ty| attr(data, ty).map_or(0, be64);
            counter = Some((n(2), n(1)));
        }
    }
    LiveElement {
        key: attr(e, 1).and_then(value).unwrap_or_default(),
        data: attr(e, 2).and_then(value),
        expires_ms: attr(e, 5).map(be64).filter(|ms| *ms > 0),
        counter,
    }
}

fn be64(b: &[u8]) -> u64 {
    b.get(..8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or_else(|| u64::from(be32(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(ty: u16, v: &[u8]) -> Vec<u8> {
        let mut out = ((4 + v.len()) as u16).to_ne_bytes().to_vec();
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(v);
        out.resize(out.len().div_ceil(4) * 4, 0);
        out
    }

    #[test]
    fn elements_are_read_with_their_counter_and_expiry() {
        let counter = [
            nla(1, b"counter\0"),
            nla(
                2,
                &[nla(1, &700u64.to_be_bytes()), nla(2, &7u64.to_be_bytes())].concat(),
            ),
        ]
        .concat();
        let e = [
            nla(1, &nla(1, &[198, 18, 0, 1])),
            nla(2, &nla(1, &[0x10, 0, 0, 0])),
            nla(5, &12_345u64.to_be_bytes()),
            nla(7, &counter),
        ]
        .concat();
        let got = element(&e);
        assert_eq!(got.key, vec![198, 18, 0, 1]);
        assert_eq!(got.data, Some(vec![0x10, 0, 0, 0]));
        assert_eq!(got.expires_ms, Some(12_345));
        assert_eq!(got.counter, Some((7, 700)));
        // Several expressions come as a list.
        let e = [nla(1, &nla(1, &[1; 4])), nla(11, &nla(1, &counter))].concat();
        assert_eq!(element(&e).counter, Some((7, 700)));
        assert_eq!(element(&e).expires_ms, None);
    }
}
