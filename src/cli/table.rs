//! The one table look of the command line (`status`, `peer ls`): upper-case
//! headers, columns two spaces apart, aligned by display width (tabwriter,
//! so a peer name in any script lines up), empty cells as `-`.

use std::io::Write;

use tabwriter::TabWriter;

use super::output::out;

pub(super) struct Table {
    tw: TabWriter<Vec<u8>>,
}

impl Table {
    pub(super) fn new(headers: &[&str]) -> Table {
        let mut t = Table::plain();
        t.row(headers.iter().map(|h| h.to_string()));
        t
    }

    /// A table without a header row (`key  value` lines).
    pub(super) fn plain() -> Table {
        Table {
            tw: TabWriter::new(Vec::new()).padding(2),
        }
    }

    pub(super) fn row(&mut self, cells: impl IntoIterator<Item = String>) {
        let cells: Vec<String> = cells
            .into_iter()
            // A tab or newline in a cell (a peer's name) would break the columns.
            .map(|c| c.replace(['\t', '\n', '\r'], " "))
            .map(|c| if c.is_empty() { "-".to_string() } else { c })
            .collect();
        // Writing into a Vec cannot fail.
        let _ = writeln!(self.tw, "{}", cells.join("\t"));
    }

    /// Print the aligned table on stdout.
    pub(super) fn print(self) {
        let bytes = self.tw.into_inner().unwrap_or_default();
        out!("{}", String::from_utf8_lossy(&bytes));
    }
}
