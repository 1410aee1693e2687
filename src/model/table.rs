//! An ordered name → object table with O(1) clone and a log of the names changed since
//! the last [`Table::take_changes`].
//!
//! Every request works on a copy of the whole state and the copy replaces the state only
//! if everything succeeds. With 100,000 farms a copy of an ordinary map (one string and
//! one reference count per farm) and the comparisons needed to find what a request
//! changed cost milliseconds per request. This table shares structure between copies
//! (persistent maps from `imbl`), so a copy is O(1), an edit is O(log n), and the change
//! log says what a request touched without walking the table.

use std::fmt;
use std::sync::Arc;

use imbl::{HashMap as PMap, OrdMap};

/// Objects by name, in creation order.
pub struct Table<T> {
    /// Position → (name, object). Positions only grow; a rename keeps the position.
    order: OrdMap<u64, (String, Arc<T>)>,
    /// Name → position.
    index: PMap<String, u64>,
    /// The next free position.
    next: u64,
    /// Names inserted, replaced, removed or borrowed mutably since the last
    /// [`Table::take_changes`] (possibly repeated; possibly unchanged in value).
    log: Vec<String>,
    /// An object changed its position or name (a journal entry cannot express that).
    reordered: bool,
}

impl<T> Clone for Table<T> {
    fn clone(&self) -> Self {
        Self {
            order: self.order.clone(),
            index: self.index.clone(),
            next: self.next,
            log: self.log.clone(),
            reordered: self.reordered,
        }
    }
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self {
            order: OrdMap::new(),
            index: PMap::new(),
            next: 0,
            log: Vec::new(),
            reordered: false,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Table<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Equal when the same names map to equal objects in the same order (the change log is
/// not compared).
impl<T: PartialEq> PartialEq for Table<T> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .iter()
                .zip(other.iter())
                .all(|((a, x), (b, y))| a == b && (Arc::ptr_eq(x, y) || x == y))
    }
}

impl<T: Eq> Eq for Table<T> {}

impl<T> Table<T> {
    /// Number of objects.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there is no object.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The object called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<T>> {
        let pos = self.index.get(name)?;
        self.order.get(pos).map(|(_, v)| v)
    }

    /// Whether there is an object called `name`.
    pub fn contains_key(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The object called `name`, to change in place (logged as changed).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Arc<T>> {
        let pos = *self.index.get(name)?;
        self.log.push(name.to_string());
        self.order.get_mut(&pos).map(|(_, v)| v)
    }

    /// Inserts or replaces; a replaced object keeps its position, a new one goes last.
    pub fn insert(&mut self, name: String, value: Arc<T>) -> Option<Arc<T>> {
        self.log.push(name.clone());
        if let Some(pos) = self.index.get(&name) {
            let slot = self.order.get_mut(pos).expect("index and order agree");
            return Some(std::mem::replace(&mut slot.1, value));
        }
        let pos = self.next;
        self.next += 1;
        self.index.insert(name.clone(), pos);
        self.order.insert(pos, (name, value));
        None
    }

    /// Removes `name`; the others keep their order.
    pub fn shift_remove(&mut self, name: &str) -> Option<Arc<T>> {
        let pos = self.index.remove(name)?;
        self.log.push(name.to_string());
        self.order.remove(&pos).map(|(_, v)| v)
    }

    /// Renames `old` to `new` in place (same position). False if `old` does not exist.
    pub fn rename(&mut self, old: &str, new: &str, set_name: impl FnOnce(&mut Arc<T>)) -> bool {
        let Some(pos) = self.index.remove(old) else {
            return false;
        };
        self.log.push(old.to_string());
        self.log.push(new.to_string());
        self.reordered = true;
        self.index.insert(new.to_string(), pos);
        let slot = self.order.get_mut(&pos).expect("index and order agree");
        slot.0 = new.to_string();
        set_name(&mut slot.1);
        true
    }

    /// Where `name` sits (an opaque, ordered position), to put an object back there with
    /// [`Table::place_at`].
    pub fn position(&self, name: &str) -> Option<u64> {
        self.index.get(name).copied()
    }

    /// Moves `name` to a position that [`Table::position`] returned for an object since
    /// removed (the position must be free).
    pub fn place_at(&mut self, name: &str, pos: u64) {
        let Some(old) = self.index.get(name).copied() else {
            return;
        };
        if old == pos || self.order.contains_key(&pos) {
            return;
        }
        let entry = self.order.remove(&old).expect("index and order agree");
        self.order.insert(pos, entry);
        self.index.insert(name.to_string(), pos);
        self.reordered = true;
    }

    /// Objects in order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<T>)> + '_ {
        self.order.values().map(|(k, v)| (k, v))
    }

    /// Names in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> + '_ {
        self.order.values().map(|(k, _)| k)
    }

    /// Objects in order.
    pub fn values(&self) -> impl Iterator<Item = &Arc<T>> + '_ {
        self.order.values().map(|(_, v)| v)
    }

    /// Objects in order from position `from` on, each with its position (so that an
    /// iteration can stop and resume later on the same table).
    pub fn values_from(&self, from: u64) -> impl Iterator<Item = (u64, &Arc<T>)> + '_ {
        self.order.range(from..).map(|(p, (_, v))| (*p, v))
    }

    /// Lets `f` change any object; only the objects it replaced (a different `Arc`
    /// afterwards, e.g. through `Arc::make_mut`) are written back and logged.
    pub fn for_each_mut(&mut self, mut f: impl FnMut(&mut Arc<T>)) {
        let mut changed = Vec::new();
        for (pos, (_, v)) in self.order.iter() {
            let mut w = Arc::clone(v);
            f(&mut w);
            if !Arc::ptr_eq(&w, v) {
                changed.push((*pos, w));
            }
        }
        for (pos, w) in changed {
            let slot = self.order.get_mut(&pos).expect("position exists");
            self.log.push(slot.0.clone());
            slot.1 = w;
        }
    }

    /// Keeps only the objects for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&String, &Arc<T>) -> bool) {
        let gone: Vec<String> = self
            .iter()
            .filter(|(k, v)| !keep(k, v))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.shift_remove(&k);
        }
    }

    /// Names logged since the last call (deduplicated, in first-logged order), and
    /// whether an object moved or was renamed; clears the log.
    pub fn take_changes(&mut self) -> (Vec<String>, bool) {
        let log = std::mem::take(&mut self.log);
        let reordered = std::mem::replace(&mut self.reordered, false);
        let mut seen = std::collections::HashSet::new();
        let names = log.into_iter().filter(|n| seen.insert(n.clone())).collect();
        (names, reordered)
    }

    /// Whether nothing was logged since the last [`Table::take_changes`].
    pub fn unchanged(&self) -> bool {
        self.log.is_empty() && !self.reordered
    }
}

impl<T> std::ops::Index<&str> for Table<T> {
    type Output = Arc<T>;
    fn index(&self, name: &str) -> &Arc<T> {
        self.get(name).expect("no object of that name")
    }
}

impl<T> std::ops::Index<&String> for Table<T> {
    type Output = Arc<T>;
    fn index(&self, name: &String) -> &Arc<T> {
        &self[name.as_str()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names<T>(t: &Table<T>) -> Vec<&str> {
        t.keys().map(String::as_str).collect()
    }

    #[test]
    fn keeps_creation_order_through_replace_remove_rename_and_place() {
        let mut t = Table::default();
        for n in ["a", "b", "c", "d"] {
            t.insert(n.to_string(), Arc::new(n.to_string()));
        }
        t.insert("b".into(), Arc::new("B".into()));
        assert_eq!(names(&t), ["a", "b", "c", "d"]);
        assert_eq!(*t["b"], "B");
        t.shift_remove("a");
        assert_eq!(names(&t), ["b", "c", "d"]);
        assert!(t.rename("c", "x", |v| *v = Arc::new("X".into())));
        assert_eq!(names(&t), ["b", "x", "d"]);
        assert!(t.get("c").is_none());
        assert_eq!(*t["x"], "X");
        let pos = t.position("b").unwrap();
        t.shift_remove("b");
        t.insert("b".into(), Arc::new("again".into()));
        assert_eq!(names(&t), ["x", "d", "b"]);
        t.place_at("b", pos);
        assert_eq!(names(&t), ["b", "x", "d"]);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn copies_are_independent_and_the_log_names_what_changed() {
        let mut t = Table::default();
        for i in 0..1000 {
            t.insert(format!("f{i}"), Arc::new(i));
        }
        let _ = t.take_changes();
        let mut u = t.clone();
        assert!(u.unchanged());
        *Arc::make_mut(u.get_mut("f7").unwrap()) = -7;
        u.shift_remove("f9");
        u.insert("new".into(), Arc::new(5));
        u.for_each_mut(|v| {
            if **v == 500 {
                *Arc::make_mut(v) = -500;
            }
        });
        assert_eq!(*t["f7"], 7);
        assert!(t.contains_key("f9"));
        assert_eq!(*u["f7"], -7);
        assert_eq!(*u["f500"], -500);
        let (changed, reordered) = u.take_changes();
        assert_eq!(changed, ["f7", "f9", "new", "f500"]);
        assert!(!reordered);
        assert!(u.unchanged());
        assert_ne!(t, u);
        assert_eq!(t, t.clone());
    }

    #[test]
    fn retain_removes_and_logs() {
        let mut t = Table::default();
        for i in 0..10 {
            t.insert(format!("f{i}"), Arc::new(i));
        }
        let _ = t.take_changes();
        t.retain(|_, v| **v % 2 == 0);
        assert_eq!(names(&t), ["f0", "f2", "f4", "f6", "f8"]);
        assert_eq!(t.take_changes().0, ["f1", "f3", "f5", "f7", "f9"]);
    }
}
