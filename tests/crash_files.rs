//! Torn files: the journal cut at many byte positions (a crash or a full disk while
//! appending), a snapshot left half-written, a state file cut short. The daemon starts
//! from whatever a crash can leave, keeps every whole entry, and goes on appending to
//! a journal that stays readable; a damaged state file stops it with a message naming
//! the file, and the file is left as it was.

mod common;

use std::fs;

use common::*;
use serde_json::{json, Value};

fn backend_change(i: usize) -> Value {
    json!({"farms": [{"name": "web", "backends": [{"name": format!("b{i}"), "ip-addr": be4(1), "weight": "1"}]}]})
}

fn backend_names(d: &Daemon) -> Vec<String> {
    d.farm("web")["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_torn_journal_at_any_byte_starts_and_keeps_whole_entries() {
    let ns = NetNs::new("torn");
    let mut d = Daemon::start(&ns);
    d.apply(&json!({"farms": [farm("web", &[("virtual-addr", "198.18.0.100"), ("virtual-ports", "80")], vec![])]}));
    // Five changes journaled after the snapshot.
    d.stop();
    let snapshot = fs::read(d.state_file()).unwrap();
    d.respawn();
    for i in 0..5 {
        d.apply(&backend_change(i));
    }
    d.crash();
    let journal_path = d.state_file().with_extension("json.journal");
    let journal = fs::read(&journal_path).expect("a journal after small changes");
    assert_eq!(
        fs::read(d.state_file()).unwrap(),
        snapshot,
        "the changes went to the journal"
    );
    let lines: Vec<usize> = journal
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(lines.len(), 5, "five journal entries");
    // Every byte of the last two entries, and a spread over the rest.
    let mut cuts: Vec<usize> = (lines[2]..=journal.len()).step_by(31).collect();
    cuts.extend((0..lines[2]).step_by(lines[2] / 6 + 1));
    cuts.extend([
        0,
        lines[3] - 1,
        lines[3],
        lines[3] + 1,
        journal.len() - 1,
        journal.len() - 40,
    ]);
    cuts.sort();
    cuts.dedup();
    for &cut in &cuts {
        fs::write(d.state_file(), &snapshot).unwrap();
        fs::write(&journal_path, &journal[..cut]).unwrap();
        let whole = lines.iter().filter(|&&l| l <= cut).count();
        d.respawn();
        let names = backend_names(&d);
        let want: Vec<String> = (0..whole).map(|i| format!("b{i}")).collect();
        assert!(
            names.len() >= whole && names[..whole] == want[..],
            "cut at {cut}: whole entries lost: {names:?}"
        );
        // A change after the torn tail, then a restart: both starts work and the
        // change is kept (the torn tail was cut before the append).
        d.apply(&backend_change(9));
        d.crash();
        d.respawn();
        let names = backend_names(&d);
        assert!(
            names.contains(&"b9".to_string()),
            "cut at {cut}: change lost after restart: {names:?}"
        );
        d.crash();
    }
    eprintln!(
        "journal cut at {} byte positions of {}: every start worked",
        cuts.len(),
        journal.len()
    );
}

#[test]
fn a_half_written_snapshot_is_removed_and_a_cut_state_file_is_refused() {
    let ns = NetNs::new("tornsnap");
    let mut d = Daemon::start(&ns);
    d.apply(&json!({"farms": [farm("web", &[("virtual-addr", "198.18.0.100"), ("virtual-ports", "80")], vec![])]}));
    d.stop();
    let state = fs::read(d.state_file()).unwrap();
    let tmp = d.state_file().with_extension("json.tmp");
    // A snapshot being written when the crash came, at several lengths.
    for cut in (0..state.len()).step_by(state.len() / 8 + 1) {
        fs::write(&tmp, &state[..cut]).unwrap();
        d.respawn();
        assert!(
            !tmp.exists(),
            "cut {cut}: the half-written snapshot is still there"
        );
        assert_eq!(d.farm("web")["name"], "web");
        d.stop();
    }
    // The state file itself cut short (not something a crash does: renames are
    // atomic, but a disk or a hand can): refuse to start, name the file, keep it.
    let bin = env!("CARGO_BIN_EXE_nftlb");
    for cut in (1..state.len() - 1).step_by(state.len() / 6 + 1) {
        fs::write(d.state_file(), &state[..cut]).unwrap();
        let out = std::process::Command::new("timeout")
            .args([
                "20",
                "ip",
                "netns",
                "exec",
                ns.name(),
                bin,
                "-k",
                "k0123456789",
                "-L",
                "2",
            ])
            .arg("--state-file")
            .arg(d.state_file())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "cut {cut}: {err}");
        assert!(
            err.contains(d.state_file().to_str().unwrap()),
            "cut {cut}: the error does not name the file: {err}"
        );
        assert_eq!(
            fs::read(d.state_file()).unwrap(),
            &state[..cut],
            "cut {cut}: the file was changed"
        );
    }
    fs::write(d.state_file(), &state).unwrap();
    d.respawn();
    assert_eq!(d.farm("web")["name"], "web");
}
