//! nftlb-rs: an nftables layer-4 load balancer daemon, drop-in compatible with
//! zevenet's nftlb (same flags, REST API and JSON documents).
//!
//! Data flows one way: [`document`] (JSON) -> [`model`] (desired state) -> [`render`]
//! (ruleset) -> [`ruleset::plan`] (one transaction) -> [`kernel`] -> [`store`].
//! [`engine`] is the single writer that runs that pipeline for every change; [`read`]
//! answers GETs from the snapshot it publishes after each one.

pub mod api;
pub mod cli;
pub mod document;
pub mod engine;
pub mod kernel;
pub mod logging;
pub mod model;
pub mod netinfo;
pub mod read;
pub mod render;
pub mod ruleset;
pub mod store;
