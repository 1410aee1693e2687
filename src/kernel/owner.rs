//! One daemon per table: the owner marker in the kernel.
//!
//! `set owner` of `table ip nftlb` holds one element, `PID . START`: the process that
//! manages our tables and its start time (from `/proc/PID/stat`, so that a reused PID
//! is not taken for the old owner). The set has room for one element, so two daemons
//! that start at once cannot both claim it: the second one's transaction is refused.
//! A daemon finding a live owner refuses to start and changes nothing; an owner that
//! is gone (killed, crashed) is replaced in the same transaction that claims the set.

use super::{Kernel, KernelError};
use crate::ruleset::TABLE;

/// The owner set's name and declaration (rendered with the tables too).
pub use crate::ruleset::{OWNER_SET as SET, OWNER_SPEC as SPEC};

/// A process that manages our tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Its PID.
    pub pid: u32,
    /// The low 32 bits of its start time (clock ticks since boot).
    pub start: u32,
}

impl Owner {
    /// This process.
    pub fn me() -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            start: start_time(pid).unwrap_or(0),
        }
    }

    /// Whether the process still runs (the same one: same start time).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

/// Field 22 of `/proc/PID/stat` (after the command name, which may hold spaces and
/// parentheses).
fn start_time(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let v: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    Some(v as u32)
}

/// The owner the kernel names, if any.
pub fn current(k: &mut dyn Kernel) -> Option<Owner> {
    let v = k.list_json(&format!("list set ip {TABLE} {SET}")).ok()?;
    let elem = v
        .get("nftables")?
        .as_array()?
        .iter()
        .find_map(|i| i.pointer("/set/elem/0"))?;
    let parts = elem.pointer("/concat")?.as_array()?;
    let num = |i: usize| parts.get(i)?.as_u64().map(|n| n as u32);
    Some(Owner {
        pid: num(0)?,
        start: num(1)?,
    })
}

/// Why this daemon may not manage our tables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// Another live daemon holds them.
    #[error("table ip {TABLE} is managed by another nftlb daemon (PID {0}); stop it first, or run this one in another network namespace")]
    Held(u32),
    /// The kernel refused the claim.
    #[error("cannot claim table ip {TABLE}: {0}")]
    Kernel(KernelError),
}

/// Claims our tables for this process: refuses while another live daemon holds them,
/// replaces a dead owner. Creates the table and the owner set if they are missing
/// (nothing else).
pub fn claim(k: &mut dyn Kernel) -> Result<(), ClaimError> {
    let me = Owner::me();
    let old = current(k);
    if let Some(o) = old.filter(|o| *o != me && o.alive()) {
        return Err(ClaimError::Held(o.pid));
    }
    if old == Some(me) {
        return Ok(());
    }
    let mut text = format!("add table ip {TABLE}\nadd set ip {TABLE} {SET} {{ {SPEC} }}\n");
    if let Some(o) = old {
        text.push_str(&format!(
            "delete element ip {TABLE} {SET} {{ {} . {} }}\n",
            o.pid, o.start
        ));
    }
    text.push_str(&format!(
        "add element ip {TABLE} {SET} {{ {} . {} }}\n",
        me.pid, me.start
    ));
    match k.apply(&text) {
        Ok(()) => {
            if let Some(o) = old {
                tracing::warn!(
                    pid = o.pid,
                    "the previous owner of our tables is gone; taking them over"
                );
            }
            Ok(())
        }
        // Another daemon claimed the set in the meantime.
        Err(e) => match current(k) {
            Some(o) if o != me && o.alive() => Err(ClaimError::Held(o.pid)),
            _ => Err(ClaimError::Kernel(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_changed_start_time_is_not() {
        let me = Owner::me();
        assert!(me.start > 0);
        assert!(me.alive());
        let other = Owner {
            start: me.start.wrapping_add(1),
            ..me
        };
        assert!(!other.alive());
    }
}
