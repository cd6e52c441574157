//! The rows the dashboard shows, kept up to date as events arrive instead of recomputed
//! from every package per event or per frame: an event touches one package, so it costs
//! O(log n) here (a lookup in the sorted rows, the arches of one package), and only a
//! snapshot or a new filter goes over every package.

use std::collections::BTreeMap;

use kiln_shared::protocol::{Event, PackageState, Snapshot};

/// The names of the shown packages in order, and the architecture columns.
#[derive(Debug, Clone, Default)]
pub struct RowIndex {
    /// Names of the packages that match `filter`, sorted (the snapshot's order).
    names: Vec<String>,
    /// The filter `names` was made for.
    filter: String,
    /// Each arch any package lists, with how many packages list it.
    archs: BTreeMap<String, usize>,
    /// The shown rows' name and tag widths (width to how many rows have it): the table's
    /// columns are as wide as the widest, known without going over the rows per frame.
    name_widths: BTreeMap<usize, usize>,
    tag_widths: BTreeMap<usize, usize>,
}

/// Adds one to (or takes one from) the count of `width`.
fn count(widths: &mut BTreeMap<usize, usize>, width: usize, add: bool) {
    if add {
        *widths.entry(width).or_default() += 1;
    } else if let Some(n) = widths.get_mut(&width) {
        *n -= 1;
        if *n == 0 {
            widths.remove(&width);
        }
    }
}

/// True when `p` is shown under `filter` (already lower case).
fn matches(p: &PackageState, filter: &str) -> bool {
    filter.is_empty()
        || p.name.to_lowercase().contains(filter)
        || p.dir.to_string_lossy().to_lowercase().contains(filter)
}

/// The package whose row or arches an event may change.
pub fn package_of(event: &Event) -> Option<&str> {
    match event {
        Event::PackageAdded { package } => Some(&package.name),
        Event::PackageRemoved { package }
        | Event::PackageError { package, .. }
        | Event::TargetPlanned { package, .. } => Some(package),
        _ => None,
    }
}

impl RowIndex {
    /// The index of every package of `snapshot` under `filter`.
    pub fn build(snapshot: &Snapshot, filter: &str) -> RowIndex {
        let mut index = RowIndex {
            filter: filter.to_owned(),
            ..RowIndex::default()
        };
        let lower = filter.to_lowercase();
        for p in snapshot.packages.values() {
            if matches(p, &lower) {
                index.names.push(p.name.clone());
                index.count_widths(p, true);
            }
            index.count_archs(p, true);
        }
        index
    }

    /// Makes it the index for `filter`: a filter that contains the current one (typed
    /// on) keeps only the shown rows that still match; any other goes over every package.
    pub fn refilter(&mut self, snapshot: &Snapshot, filter: &str) {
        let lower = filter.to_lowercase();
        if !lower.contains(&self.filter.to_lowercase()) {
            *self = RowIndex::build(snapshot, filter);
            return;
        }
        let mut names = std::mem::take(&mut self.names);
        names.retain(|n| match snapshot.packages.get(n) {
            Some(p) if matches(p, &lower) => true,
            Some(p) => {
                self.count_widths(p, false);
                false
            }
            None => false,
        });
        self.names = names;
        self.filter = filter.to_owned();
    }

    /// The widest shown name and tag (0 when none shows).
    pub fn widths(&self) -> (usize, usize) {
        let widest = |w: &BTreeMap<usize, usize>| w.keys().next_back().copied().unwrap_or(0);
        (widest(&self.name_widths), widest(&self.tag_widths))
    }

    fn count_widths(&mut self, p: &PackageState, add: bool) {
        count(&mut self.name_widths, p.name.chars().count(), add);
        if let Some(t) = &p.tag {
            let w = crate::ui::fmt::tag(t.as_str(), crate::ui::fmt::TAG_WIDTH)
                .chars()
                .count();
            count(&mut self.tag_widths, w, add);
        }
    }

    /// True when it was made for `filter`.
    pub fn is_for(&self, filter: &str) -> bool {
        self.filter == filter
    }

    /// The shown names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The position of `name` among the shown rows.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.names.binary_search_by(|n| n.as_str().cmp(name)).ok()
    }

    /// The architecture columns, in order.
    pub fn archs(&self) -> impl Iterator<Item = &String> {
        self.archs.keys()
    }

    /// How many architecture columns there are.
    pub fn arch_count(&self) -> usize {
        self.archs.len()
    }

    fn count_archs(&mut self, p: &PackageState, add: bool) {
        for arch in p.targets.keys() {
            if add {
                *self.archs.entry(arch.clone()).or_default() += 1;
            } else if let Some(n) = self.archs.get_mut(arch) {
                *n -= 1;
                if *n == 0 {
                    self.archs.remove(arch);
                }
            }
        }
    }

    /// Takes `name` out before an event changes it (its row and its arches).
    pub fn forget(&mut self, snapshot: &Snapshot, name: &str) {
        if let Some(p) = snapshot.packages.get(name) {
            self.count_archs(p, false);
        }
        if let Some(i) = self.position(name) {
            self.names.remove(i);
            if let Some(p) = snapshot.packages.get(name) {
                self.count_widths(p, false);
            }
        }
    }

    /// Puts `name` back after the event, as it is now.
    pub fn note(&mut self, snapshot: &Snapshot, name: &str) {
        let Some(p) = snapshot.packages.get(name) else {
            return;
        };
        self.count_archs(p, true);
        if matches(p, &self.filter.to_lowercase())
            && let Err(i) = self.names.binary_search_by(|n| n.as_str().cmp(name))
        {
            self.names.insert(i, name.to_owned());
            self.count_widths(p, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_shared::protocol::PackageInfo;

    fn added(name: &str, archs: &[&str]) -> Event {
        Event::PackageAdded {
            package: PackageInfo {
                name: name.into(),
                dir: format!("/ws/{name}").into(),
                tag: None,
                archs: archs.iter().map(|a| (*a).to_owned()).collect(),
            },
        }
    }

    /// Applies events to a snapshot and to the index as the dashboard does, and checks
    /// the index against one built from scratch after each.
    #[test]
    fn events_keep_the_index_equal_to_a_fresh_one() {
        let mut s = Snapshot::default();
        let mut index = RowIndex::build(&s, "b");
        let events = [
            added("o/b2", &["amd64"]),
            added("o/a", &["amd64", "arm64"]),
            added("o/b1", &["riscv64"]),
            added("o/b2", &["arm64"]),
            Event::PackageError {
                package: "o/bad".into(),
                dir: "/ws/o/bad".into(),
                error: "x".into(),
                archs: vec!["mips64le".into()],
            },
            Event::PackageRemoved {
                package: "o/b1".into(),
            },
            Event::TargetPlanned {
                package: "o/a".into(),
                arch: "s390x".into(),
                tag: "t".parse().unwrap(),
            },
        ];
        for e in &events {
            let name = package_of(e).map(str::to_owned);
            if let Some(n) = &name {
                index.forget(&s, n);
            }
            s.apply(e);
            if let Some(n) = &name {
                index.note(&s, n);
            }
            let fresh = RowIndex::build(&s, "b");
            assert_eq!(index.names, fresh.names, "after {e:?}");
            assert_eq!(index.archs, fresh.archs, "after {e:?}");
            assert_eq!(index.name_widths, fresh.name_widths, "after {e:?}");
            assert_eq!(index.tag_widths, fresh.tag_widths, "after {e:?}");
        }
        assert_eq!(index.names(), ["o/b2", "o/bad"]);
        assert_eq!(index.widths(), (5, 0), "no shown row has a tag");
        assert_eq!(
            index.archs().cloned().collect::<Vec<_>>(),
            ["amd64", "arm64", "mips64le", "s390x"]
        );
    }

    /// Typing on narrows the shown rows to those that still match; any other filter is
    /// the same as an index built for it.
    #[test]
    fn a_filter_typed_on_narrows_and_others_rebuild() {
        let mut s = Snapshot::default();
        for n in ["o/ab", "o/abc", "o/b", "o/longer-name"] {
            s.apply(&added(n, &["amd64"]));
        }
        let mut index = RowIndex::build(&s, "");
        for f in ["a", "ab", "abc", "b", "", "LONG"] {
            index.refilter(&s, f);
            let fresh = RowIndex::build(&s, f);
            assert_eq!(index.names, fresh.names, "filter {f:?}");
            assert_eq!(index.name_widths, fresh.name_widths, "filter {f:?}");
            assert_eq!(index.archs, fresh.archs, "filter {f:?}");
            assert!(index.is_for(f));
        }
        assert_eq!(index.names(), ["o/longer-name"]);
    }
}
