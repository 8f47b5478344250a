//! Where each node of the YAML text sits, by field path ("routes[1].match").
//!
//! serde_norway's `Value` forgets positions, so the text is walked a second time
//! with yaml-rust2's marked event parser. The two parsers can disagree on exotic
//! input; then the map is merely incomplete and errors fall back to an ancestor.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// 1-based line and column (yaml-rust2 gives 0-based columns).
pub(crate) type Pos = (usize, usize);

#[derive(Debug, Default)]
pub(crate) struct Positions {
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
    /// Paths whose value is a mapping or a list: an error there reads best at
    /// the key that introduces it (`keys:`), when there is one.
    collections: HashSet<String>,
    /// Mapping keys seen twice, where serde_norway reports no useful position.
    duplicates: Vec<(String, Pos)>,
    /// The document's top node, for errors about the file as a whole.
    root: Option<Pos>,
}

impl Positions {
    pub(crate) fn build(text: &str) -> Positions {
        let mut walker = Walker::default();
        // A scan error only cuts the walk short; what was seen so far is kept.
        let _ = Parser::new_from_str(text).load(&mut walker, false);
        walker.positions
    }

    /// Position of the value at `path`, else of its nearest ancestor other than the
    /// document itself; the empty path is the document's top node.
    pub(crate) fn value(&self, path: &str) -> Option<Pos> {
        if path.is_empty() {
            return self.root;
        }
        let mut current = path;
        loop {
            if self.collections.contains(current) {
                if let Some(pos) = self.keys.get(current) {
                    return Some(*pos);
                }
            }
            if let Some(pos) = self.values.get(current) {
                return Some(*pos);
            }
            current = parent(current)?;
        }
    }

    /// Position of the mapping key at `path` (what an unknown field error
    /// should point at), else the value's position.
    pub(crate) fn key(&self, path: &str) -> Option<Pos> {
        self.keys.get(path).copied().or_else(|| self.value(path))
    }

    /// The first mapping key that appears twice in its mapping.
    pub(crate) fn first_duplicate(&self) -> Option<&(String, Pos)> {
        self.duplicates.first()
    }
}

/// Where the text goes on past its first document: the start of a second one, or
/// where reading stopped. serde_norway refuses several documents without saying where.
pub(crate) fn past_first_document(text: &str) -> Option<Pos> {
    #[derive(Default)]
    struct Starts {
        seen: usize,
        second: Option<Marker>,
    }
    impl MarkedEventReceiver for Starts {
        fn on_event(&mut self, event: Event, mark: Marker) {
            if matches!(event, Event::DocumentStart) {
                self.seen += 1;
                if self.seen == 2 {
                    self.second.get_or_insert(mark);
                }
            }
        }
    }
    let mut starts = Starts::default();
    let stopped = Parser::new_from_str(text).load(&mut starts, true).err().map(|e| *e.marker());
    starts.second.or(stopped).map(|mark| (mark.line(), mark.col() + 1))
}

/// "a.b[2].c" -> "a.b[2]" -> "a.b" -> "a" -> None.
pub(crate) fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

/// Appends a mapping key to a path.
pub(crate) fn join_key(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_owned()
    } else {
        format!("{base}.{key}")
    }
}

/// Appends a list index to a path.
pub(crate) fn join_index(base: &str, index: usize) -> String {
    format!("{base}[{index}]")
}

enum Frame {
    Map {
        /// None while waiting for a key, or under a key that is not a scalar.
        key: Option<String>,
        expecting_key: bool,
        /// Where the mapping starts, until its first key says it better: a
        /// block mapping's start event is marked past its first key.
        start: Option<Marker>,
    },
    Seq {
        index: usize,
    },
    /// Inside a collection used as a mapping key; nothing there is addressable.
    ComplexKey {
        depth: usize,
    },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    positions: Positions,
}

impl Walker {
    fn path(&self) -> Option<String> {
        let mut path = String::new();
        for frame in &self.stack {
            match frame {
                Frame::Map { key: Some(key), .. } => path = join_key(&path, key),
                Frame::Map { key: None, .. } | Frame::ComplexKey { .. } => return None,
                Frame::Seq { index } => path = join_index(&path, *index),
            }
        }
        Some(path)
    }

    /// A value node is complete: move the parent on to its next key or index.
    fn advance(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key, expecting_key, .. }) => {
                *key = None;
                *expecting_key = true;
            }
            Some(Frame::Seq { index }) => *index += 1,
            Some(Frame::ComplexKey { .. }) | None => {}
        }
    }

    fn record_value(&mut self, mark: Marker, collection: bool) {
        if self.stack.is_empty() {
            self.positions.root.get_or_insert((mark.line(), mark.col() + 1));
            return;
        }
        // An empty key's value is not addressable apart from the document.
        if let Some(path) = self.path().filter(|p| !p.is_empty()) {
            if collection {
                self.positions.collections.insert(path.clone());
            }
            self.positions.values.entry(path).or_insert((mark.line(), mark.col() + 1));
        }
    }

    /// Records the innermost mapping's position at `mark` if still pending.
    fn settle_map_start(&mut self, mark: Option<Marker>) {
        let Some(Frame::Map { start, .. }) = self.stack.last_mut() else {
            return;
        };
        let Some(start) = start.take() else { return };
        let frame = self.stack.pop();
        self.record_value(mark.unwrap_or(start), true);
        self.stack.extend(frame);
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if let Some(Frame::ComplexKey { depth }) = self.stack.last_mut() {
            match event {
                Event::SequenceStart(..) | Event::MappingStart(..) => *depth += 1,
                Event::SequenceEnd | Event::MappingEnd => {
                    *depth -= 1;
                    if *depth == 0 {
                        self.stack.pop();
                        if let Some(Frame::Map { expecting_key, .. }) = self.stack.last_mut() {
                            *expecting_key = false;
                        }
                    }
                }
                _ => {}
            }
            return;
        }
        let is_node =
            matches!(event, Event::Scalar(..) | Event::Alias(_) | Event::SequenceStart(..) | Event::MappingStart(..));
        if is_node {
            if matches!(self.stack.last(), Some(Frame::Map { expecting_key: true, .. })) {
                self.settle_map_start(Some(mark));
            }
            if let Some(Frame::Map { key, expecting_key: expecting_key @ true, .. }) = self.stack.last_mut() {
                *expecting_key = false;
                match event {
                    Event::Scalar(text, ..) => {
                        *key = Some(text);
                        if let Some(path) = self.path() {
                            let pos = (mark.line(), mark.col() + 1);
                            match self.positions.keys.entry(path) {
                                Entry::Occupied(seen) => {
                                    self.positions.duplicates.push((seen.key().clone(), pos));
                                }
                                Entry::Vacant(slot) => {
                                    slot.insert(pos);
                                }
                            }
                        }
                    }
                    Event::SequenceStart(..) | Event::MappingStart(..) => {
                        self.stack.push(Frame::ComplexKey { depth: 1 });
                    }
                    _ => {}
                }
                return;
            }
        }
        match event {
            Event::Scalar(..) | Event::Alias(_) => {
                self.record_value(mark, false);
                self.advance();
            }
            Event::SequenceStart(..) => {
                self.record_value(mark, true);
                self.stack.push(Frame::Seq { index: 0 });
            }
            Event::MappingStart(..) => {
                self.stack.push(Frame::Map { key: None, expecting_key: true, start: Some(mark) });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                // An empty mapping has no first key: keep its start mark.
                self.settle_map_start(None);
                self.stack.pop();
                self.advance();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
mode: gateway
admin:
  address: 127.0.0.1:9090
routes:
  - name: a
    match: { path_prefix: /x, methods: [GET, GTE] }
  - name: b
? [complex, key]
: ignored
after: 1
";

    #[test]
    fn positions_are_one_based_lines_and_columns() {
        let p = Positions::build(TEXT);
        assert_eq!(p.value("mode"), Some((1, 7)));
        assert_eq!(p.key("mode"), Some((1, 1)));
        assert_eq!(p.value("admin.address"), Some((3, 12)));
        assert_eq!(p.key("admin.address"), Some((3, 3)));
    }

    #[test]
    fn positions_cover_list_elements_and_flow_collections() {
        let p = Positions::build(TEXT);
        assert_eq!(p.value("routes[0].name"), Some((5, 11)));
        assert_eq!(p.value("routes[0].match.methods[1]"), Some((6, 46)));
        assert_eq!(p.value("routes[1].name"), Some((7, 11)));
    }

    #[test]
    fn positions_of_collections_are_their_keys_or_first_entries() {
        let p = Positions::build(TEXT);
        assert_eq!(p.value("admin"), Some((2, 1)));
        assert_eq!(p.value("routes"), Some((4, 1)));
        // A list element has no key: its first entry marks it.
        assert_eq!(p.value("routes[1]"), Some((7, 5)));
        assert_eq!(p.value("routes[0].match"), Some((6, 5)));
        let empty = Positions::build(
            "a:
  - {}
",
        );
        assert_eq!(empty.value("a[0]"), Some((2, 5)));
    }

    #[test]
    fn positions_fall_back_to_the_nearest_ancestor() {
        let p = Positions::build(TEXT);
        assert_eq!(p.value("routes[1].upstream"), p.value("routes[1]"));
        assert_eq!(p.value("nowhere.at.all"), None);
    }

    #[test]
    fn positions_survive_complex_keys() {
        let p = Positions::build(TEXT);
        assert_eq!(p.value("after"), Some((10, 8)));
    }

    #[test]
    fn positions_note_duplicate_keys() {
        let p = Positions::build("a: 1\nb:\n  c: 1\n  c: 2\n");
        assert_eq!(p.first_duplicate(), Some(&("b.c".to_owned(), (4, 3))));
    }

    #[test]
    fn the_empty_path_is_the_documents_top_node() {
        assert_eq!(Positions::build(TEXT).value(""), Some((1, 1)));
        assert_eq!(Positions::build("# note\n\n  - a\n").value(""), Some((3, 3)));
        assert_eq!(Positions::build("").value(""), None);
    }

    #[test]
    fn a_second_document_is_located() {
        assert_eq!(past_first_document("a: 1\n---\nb: 2\n"), Some((2, 1)));
        assert_eq!(past_first_document("  a: 1\nb"), Some((2, 1)));
        assert_eq!(past_first_document("a: 1\n"), None);
    }

    #[test]
    fn path_parent_strips_one_segment() {
        assert_eq!(parent("a.b[2].c"), Some("a.b[2]"));
        assert_eq!(parent("a.b[2]"), Some("a.b"));
        assert_eq!(parent("a"), Some(""));
        assert_eq!(parent(""), None);
    }
}
