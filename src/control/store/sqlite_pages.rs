//! The snapshot's read of a SQLite file: one statement stepped on a blocking
//! thread of its own connection, handed to the async side a page at a time.
//!
//! sqlx's SQLite driver steps every statement on a worker thread and sends each
//! row through a channel, copying every value twice on the way and waking the
//! reader per row. At millions of keys that is most of a snapshot's cost (about
//! 10 µs a key, where stepping the rows takes SQLite 1 µs). Here the rows are read
//! in place and only a page of them (a frame's worth) crosses threads.
//!
//! The connection is read-only and opened for the one statement, after the
//! caller read the feed version: in WAL mode the statement reads one consistent
//! state at least that new, and never blocks the pool's writer. An in-memory
//! database has no file to open and keeps sqlx's path.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::mpsc;

use super::{GatewayKeyRow, Result};

/// Pages read ahead of the consumer: the reader stays at most this far ahead.
const PAGES_AHEAD: usize = 2;

/// Every key of the database at `file`, in pages of up to `page` rows.
pub(super) fn gateway_key_pages(file: PathBuf, page: usize) -> BoxStream<'static, Result<Vec<GatewayKeyRow>>> {
    let (pages, received) = mpsc::channel(PAGES_AHEAD);
    let page = page.max(1);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = read_pages(&file, page, &pages) {
            // Nobody listening means the consumer stopped: nothing to report to.
            let _ = pages.blocking_send(Err(e));
        }
    });
    futures_util::stream::unfold(
        received,
        |mut received| async move { received.recv().await.map(|page| (page, received)) },
    )
    .boxed()
}

fn read_pages(file: &std::path::Path, page: usize, pages: &mpsc::Sender<Result<Vec<GatewayKeyRow>>>) -> Result<()> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = Connection::open_with_flags(file, flags)?;
    // As the pool's connections: a checkpoint holding the file briefly is waited for.
    connection.busy_timeout(Duration::from_secs(10))?;
    let mut statement = connection.prepare(concat!("SELECT ", gateway_key_columns!(), " FROM keys"))?;
    let mut rows = statement.query([])?;
    let mut current = Vec::with_capacity(page);
    while let Some(row) = rows.next()? {
        current.push(GatewayKeyRow {
            id: row.get(0)?,
            hash: row.get(1)?,
            name: row.get(2)?,
            owner: row.get(3)?,
            plan: row.get(4)?,
            scopes: row.get(5)?,
            ip_allowlist: row.get(6)?,
            rate_limit: row.get(7)?,
            quota: row.get(8)?,
            status: row.get(9)?,
            expires_at: row.get(10)?,
            metadata: row.get(11)?,
            tags: row.get(12)?,
            imported: row.get(13)?,
        });
        if current.len() == page {
            let full = std::mem::replace(&mut current, Vec::with_capacity(page));
            if pages.blocking_send(Ok(full)).is_err() {
                return Ok(());
            }
        }
    }
    if !current.is_empty() {
        let _ = pages.blocking_send(Ok(current));
    }
    Ok(())
}
