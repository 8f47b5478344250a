//! `keygate keys import FILE`: streams a file of existing keys (NDJSON, one
//! record a line with `hash` instead of a raw key) to `POST /v1/keys/import`.
//!
//! The file is sent as it is read, never loaded whole, and the call has no
//! overall timeout: ten million lines take minutes. The answer lists the lines
//! that failed; any failed line makes the exit code 1, after the summary.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Args;
use futures_util::StreamExt as _;
use serde_json::Value;
use tokio::io::AsyncRead;
use tokio_util::io::ReaderStream;

use super::keys::{pretty, Admin, KeysError};
use super::table::{clean, Table};

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The NDJSON file, one JSON object a line: {"hash": "sha256:…", "id": …, "name": …,
    /// "owner": …, "plan": …, "scopes": […], "status": …}; `-` reads stdin.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

impl ImportArgs {
    fn is_stdin(&self) -> bool {
        self.file.as_os_str() == "-"
    }

    fn display(&self) -> String {
        if self.is_stdin() {
            "stdin".to_owned()
        } else {
            self.file.display().to_string()
        }
    }
}

/// Sends the file; the summary is the output, or the output of a `Partial` error
/// when some line failed.
pub(super) async fn import(admin: &Admin, args: &ImportArgs, json: bool) -> Result<String, KeysError> {
    let reader: Box<dyn AsyncRead + Send + Unpin> = if args.is_stdin() {
        Box::new(tokio::io::stdin())
    } else {
        let file = tokio::fs::File::open(&args.file)
            .await
            .map_err(|e| KeysError::Local(format!("cannot open {}: {e}", args.display())))?;
        Box::new(file)
    };
    // A read error ends the upload; it is reported as what it is, not as a network failure.
    let read_error: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
    let seen = Arc::clone(&read_error);
    let stream = ReaderStream::with_capacity(reader, 64 * 1024).map(move |chunk| {
        if let Err(e) = &chunk {
            if let Ok(mut slot) = seen.lock() {
                slot.get_or_insert_with(|| std::io::Error::new(e.kind(), e.to_string()));
            }
        }
        chunk
    });
    let sent =
        admin.post_stream(&["v1", "keys", "import"], "application/x-ndjson", reqwest::Body::wrap_stream(stream)).await;
    let read_failed = read_error.lock().ok().and_then(|mut slot| slot.take());
    if let Some(e) = read_failed {
        return Err(KeysError::Local(format!(
            "cannot read {}: {e}; the lines sent before may have been imported (running the import again is safe)",
            args.display()
        )));
    }
    let reply = sent?;
    let body = reply.value()?;
    let summary = Summary::of(&body).ok_or_else(|| reply.bad("no \"imported\", \"unchanged\" and \"errors\""))?;
    let output = if json { pretty(&reply.value()?) } else { summary.render() };
    match summary.failed() {
        0 => Ok(output),
        failed => Err(KeysError::Partial {
            output,
            message: format!("{failed} line(s) of {} were not imported", clean(&args.display())),
        }),
    }
}

/// The answer of `POST /v1/keys/import`.
#[derive(Debug, PartialEq)]
struct Summary {
    imported: u64,
    unchanged: u64,
    errors: Vec<(String, String)>,
    omitted: u64,
}

impl Summary {
    fn of(body: &Value) -> Option<Summary> {
        let errors = body
            .get("errors")?
            .as_array()?
            .iter()
            .map(|e| {
                let line = e.get("line").map(|l| l.to_string()).unwrap_or_else(|| "-".into());
                let message = e.get("message").and_then(Value::as_str).unwrap_or("").to_owned();
                (line, message)
            })
            .collect();
        Some(Summary {
            imported: body.get("imported")?.as_u64()?,
            unchanged: body.get("unchanged")?.as_u64()?,
            errors,
            omitted: body.get("errors_omitted").and_then(Value::as_u64).unwrap_or(0),
        })
    }

    fn failed(&self) -> u64 {
        self.errors.len() as u64 + self.omitted
    }

    fn render(&self) -> String {
        let mut out =
            format!("imported:  {}\nunchanged: {}\nerrors:    {}\n", self.imported, self.unchanged, self.failed());
        if !self.errors.is_empty() {
            let mut table = Table::new(["LINE", "ERROR"]).right(&[0]);
            for (line, message) in &self.errors {
                table.row([line.as_str(), message.as_str()]);
            }
            out.push('\n');
            out.push_str(&table.render());
        }
        if self.omitted > 0 {
            out.push_str(&format!("… and {} more error(s) not listed\n", self.omitted));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_summary_lists_failed_lines_and_counts_the_unlisted() {
        let body = json!({
            "imported": 3, "unchanged": 1,
            "errors": [{"line": 2, "message": "hash: is required"}, {"line": 10, "message": "plan: unknown plan \"x\""}],
            "errors_omitted": 4,
        });
        let summary = Summary::of(&body).unwrap();
        assert_eq!(summary.failed(), 6);
        let text = summary.render();
        assert!(text.starts_with("imported:  3\nunchanged: 1\nerrors:    6\n"), "{text}");
        assert!(text.contains("   2  hash: is required\n"), "{text}");
        assert!(text.contains("  10  plan: unknown plan \"x\"\n"), "{text}");
        assert!(text.ends_with("… and 4 more error(s) not listed\n"), "{text}");
    }

    #[test]
    fn a_clean_import_prints_no_error_table() {
        let summary = Summary::of(&json!({"imported": 0, "unchanged": 5, "errors": []})).unwrap();
        assert_eq!(summary.failed(), 0);
        assert_eq!(summary.render(), "imported:  0\nunchanged: 5\nerrors:    0\n");
        assert!(Summary::of(&json!({"imported": 1})).is_none());
    }
}
