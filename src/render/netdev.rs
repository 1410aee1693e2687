//! Rendering of the ingress (netdev) topologies: `dsr` and `stlsdnat`.
//! Not implemented yet: such farms are reported and not served.

use crate::model::{Farm, State};
use crate::netinfo::NetView;
use crate::render::{Note, RenderConfig, Slots};
use crate::ruleset::Ruleset;

/// Adds the rules of one `dsr` or `stlsdnat` farm to `rs` (the `table netdev nftlb`),
/// or a note saying why it cannot be served.
pub fn render_farm(
    _state: &State,
    farm: &Farm,
    _slots: &Slots,
    _net: &NetView,
    _cfg: &RenderConfig,
    _rs: &mut Ruleset,
    notes: &mut Vec<Note>,
) {
    notes.push((
        farm.name.clone(),
        format!(
            "Farm '{}': mode '{}' is stored but not served by this version",
            farm.name,
            farm.mode.as_str()
        ),
    ));
}
