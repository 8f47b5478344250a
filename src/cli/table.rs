//! Plain-text tables for people: aligned columns, `-` for empty cells.
//!
//! Widths count characters, not bytes, because masked keys carry `…` (three
//! bytes, one column). Control characters are escaped so a key name sent by
//! the API cannot move the cursor or forge extra rows.

/// How a column's cells sit in their width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table that is built row by row and rendered once.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    aligns: Vec<Align>,
    rows: Vec<Vec<String>>,
}

/// The gap between columns.
const GAP: &str = "  ";

impl Table {
    /// A table with these column headers, all left-aligned.
    pub fn new<I, S>(headers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let headers: Vec<String> = headers.into_iter().map(Into::into).collect();
        let aligns = vec![Align::Left; headers.len()];
        Table { headers, aligns, rows: Vec::new() }
    }

    /// Right-aligns the given columns (counts read better that way).
    pub fn right(mut self, columns: &[usize]) -> Self {
        for &column in columns {
            if let Some(align) = self.aligns.get_mut(column) {
                *align = Align::Right;
            }
        }
        self
    }

    /// Adds a row; missing cells render as `-`, extra cells are dropped.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut row: Vec<String> = cells.into_iter().map(|cell| clean(&cell.into())).take(self.headers.len()).collect();
        row.resize(self.headers.len(), "-".to_owned());
        self.rows.push(row);
    }

    /// The table as text, one line per row (header first), each ending in `\n`.
    /// No line has trailing spaces.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str(GAP);
                }
                let pad = widths[i] - width(cell);
                match self.aligns[i] {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn width(text: &str) -> usize {
    text.chars().count()
}

/// Makes one cell of API-supplied text safe to print: empty becomes `-`,
/// control characters are escaped (`\n`, `\u{1b}`).
pub fn clean(text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        return "-".to_owned();
    }
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell() {
        let mut table = Table::new(["ID", "NAME", "COUNT"]).right(&[2]);
        table.row(["key_1", "web", "5"]);
        table.row(["key_22", "a longer name", "1234"]);
        let expected = "\
ID      NAME           COUNT
key_1   web                5
key_22  a longer name   1234
";
        assert_eq!(table.render(), expected);
    }

    #[test]
    fn empty_and_missing_cells_render_as_a_dash() {
        let mut table = Table::new(["A", "B", "C"]);
        table.row(["x", "", "  "]);
        table.row(["y"]);
        assert_eq!(table.render(), "A  B  C\nx  -  -\ny  -  -\n");
    }

    #[test]
    fn widths_count_characters_not_bytes() {
        let mut table = Table::new(["MASKED", "X"]);
        table.row(["kg_live_Ab3d…x9Zq", "1"]);
        table.row(["short", "2"]);
        let rendered = table.render();
        let lines: Vec<&str> = rendered.lines().collect();
        // The `X` column starts at the same character offset on every line.
        let column = |line: &str| line.chars().position(|c| c == 'X' || c == '1' || c == '2');
        assert_eq!(column(lines[0]), column(lines[1]));
        assert_eq!(column(lines[1]), column(lines[2]));
        assert_eq!(lines[1], "kg_live_Ab3d…x9Zq  1");
    }

    #[test]
    fn no_trailing_spaces_and_control_characters_are_escaped() {
        let mut table = Table::new(["NAME", "OWNER"]);
        table.row(["evil\nrow\u{1b}[2J", ""]);
        table.row(["a", "b"]);
        let rendered = table.render();
        assert!(rendered.lines().all(|line| !line.ends_with(' ')), "{rendered:?}");
        assert_eq!(rendered.lines().count(), 3, "{rendered:?}");
        assert!(rendered.contains("evil\\nrow\\u{1b}[2J"), "{rendered:?}");
    }

    #[test]
    fn extra_cells_are_dropped() {
        let mut table = Table::new(["A"]);
        table.row(["1", "2"]);
        assert_eq!(table.render(), "A\n1\n");
    }
}
