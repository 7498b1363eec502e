//! Formatting results as tables or stable JSON.

use indicatif::HumanBytes;
use serde::Serialize;

use crate::args::OutputFormat;

/// Prints `value` as pretty JSON.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_stdout(text.as_bytes())
}

/// Writes to standard output. A reader that went away (`coffre … | head`)
/// is not an error: the output is simply cut there, as with other tools.
pub fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to standard output"))
        }
        _ => Ok(()),
    }
}

/// Prints either `json` or the lines produced by `table`.
pub fn emit<T: Serialize>(
    format: OutputFormat,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => json(value),
        OutputFormat::Table => write_stdout(table(value).as_bytes()),
    }
}

/// A time in a table: local time to the second, as restic and `az` show
/// it (the `TZ` variable, else the system's zone). JSON keeps RFC 3339
/// with full precision.
pub fn when(t: jiff::Timestamp) -> String {
    t.to_zoned(jiff::tz::TimeZone::system())
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// [`when`], or `-` for no time.
pub fn when_or_dash(t: Option<jiff::Timestamp>) -> String {
    t.map_or_else(|| "-".into(), when)
}

/// Binary human-readable bytes.
pub fn bytes(n: u64) -> String {
    HumanBytes(n).to_string()
}

/// Renders rows as left-aligned columns under a header.
pub fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}
