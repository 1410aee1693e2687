//! What the data plane needs to know about the host's network (interfaces, MAC
//! addresses, routes, neighbours), gathered through netlink before rendering so that
//! rendering stays a pure function.

/// A snapshot of the network facts rendering needs. Empty until discovery is
/// implemented.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetView {}
