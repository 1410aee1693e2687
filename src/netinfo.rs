//! What the data plane needs to know about the host's network (interfaces, MAC
//! addresses, routes, neighbours), gathered through netlink before rendering so that
//! rendering stays a pure function.

use crate::model::State;

/// A snapshot of the network facts rendering needs. Empty until discovery is
/// implemented.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetView {}

/// Gathers the facts `state` needs (only for farms that need them: `dsr`, `stlsdnat`).
/// Must be cheap when no farm needs anything.
pub fn gather(_state: &State) -> NetView {
    NetView::default()
}

/// Watches the network for changes that matter (addresses, links, neighbours) and calls
/// `changed` after each burst of them; runs until the process ends. The daemon calls it
/// on a thread of its own; `changed` makes the writer gather and re-render.
pub fn watch(_changed: impl Fn() + Send + 'static) {}
