//! Writing results: aligned tables, JSON, streamed text, and the formats for sizes and times.

use std::io::{self, Write};

use serde_json::Value;

/// stdout, where a closed pipe ends the program quietly instead of panicking.
pub struct Out {
    w: io::Stdout,
}

impl Out {
    pub fn stdout() -> Self {
        Out { w: io::stdout() }
    }

    pub fn line(&mut self, s: &str) -> Result<(), super::Failure> {
        let mut w = self.w.lock();
        writeln!(w, "{s}")?;
        w.flush()?;
        Ok(())
    }

    /// Streamed text: no newline, flushed at once.
    pub fn text(&mut self, s: &str) -> Result<(), super::Failure> {
        let mut w = self.w.lock();
        write!(w, "{s}")?;
        w.flush()?;
        Ok(())
    }

    /// Pretty-printed JSON document.
    pub fn json(&mut self, v: &Value) -> Result<(), super::Failure> {
        let s =
            serde_json::to_string_pretty(v).map_err(|e| super::Failure::Local(e.to_string()))?;
        self.line(&s)
    }

    /// One JSON object on one line (for streams).
    pub fn json_line(&mut self, v: &Value) -> Result<(), super::Failure> {
        self.line(&v.to_string())
    }

    pub fn table(&mut self, t: &Table) -> Result<(), super::Failure> {
        let mut w = self.w.lock();
        w.write_all(t.render().as_bytes())?;
        w.flush()?;
        Ok(())
    }
}

/// A table with columns padded to their widest cell, like `ollama ps`.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    show_header: bool,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            show_header: true,
        }
    }

    pub fn headerless(mut self) -> Self {
        self.show_header = false;
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let all: Vec<&Vec<String>> = self
            .show_header
            .then_some(&self.header)
            .into_iter()
            .chain(&self.rows)
            .collect();
        let cols = self.header.len();
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                all.iter()
                    .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for r in all {
            let mut line = String::new();
            for (c, w) in widths.iter().enumerate() {
                let cell = r.get(c).map_or("", String::as_str);
                if c + 1 == cols {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(w - cell.chars().count() + 3));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Sizes the way `ollama ps` shows them: GiB with one decimal, or MiB / KiB for small files.
pub fn fmt_bytes(b: u64) -> String {
    const KIB: f64 = 1024.0;
    let f = b as f64;
    if f >= KIB * KIB * KIB {
        format!("{:.1} GiB", f / (KIB * KIB * KIB))
    } else if f >= KIB * KIB {
        format!("{:.1} MiB", f / (KIB * KIB))
    } else if f >= KIB {
        format!("{:.1} KiB", f / KIB)
    } else {
        format!("{b} B")
    }
}

/// `45s`, `4m05s`, `2h03m`, `3d04h`.
pub fn fmt_secs(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Unix milliseconds as an RFC 3339 UTC timestamp (civil-from-days, proleptic Gregorian).
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86400);
    let tod = secs.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        tod / 3600,
        (tod % 3600) / 60,
        tod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["NAME", "SIZE"]);
        t.row(vec!["a".into(), "1.0 GiB".into()]);
        t.row(vec!["longer".into(), "2 B".into()]);
        assert_eq!(
            t.render(),
            "NAME     SIZE\na        1.0 GiB\nlonger   2 B\n"
        );
    }

    #[test]
    fn sizes_and_times() {
        assert_eq!(fmt_bytes(3 << 30), "3.0 GiB");
        assert_eq!(fmt_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(fmt_bytes(100 << 20), "100.0 MiB");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_secs(59), "59s");
        assert_eq!(fmt_secs(245), "4m05s");
        assert_eq!(fmt_secs(7380), "2h03m");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_795_651_200_000), "2026-11-26T00:00:00.000Z");
    }
}
