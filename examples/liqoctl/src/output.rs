//! Data output: aligned tables for people, YAML and JSON for programs.

use serde::Serialize;

use crate::{CliError, cli::OutputFormat};

/// Prints `data` as YAML or JSON, or the table `table` renders.
pub fn emit<T: Serialize>(
    format: OutputFormat,
    data: &T,
    table: impl FnOnce() -> String,
) -> Result<(), CliError> {
    let text = match format {
        OutputFormat::Table => table(),
        OutputFormat::Json => serde_json::to_string_pretty(data)
            .map(|s| s + "\n")
            .map_err(|e| CliError::plain(format!("rendering JSON: {e}")))?,
        OutputFormat::Yaml => serde_yaml_ng::to_string(data)
            .map_err(|e| CliError::plain(format!("rendering YAML: {e}")))?,
    };
    print!("{text}");
    Ok(())
}

/// Left-aligned columns separated by three spaces, with a header row.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count()) + 3;
                s.push_str(cell);
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `-` for an absent value.
pub fn or_dash(v: Option<impl ToString>) -> String {
    v.map(|v| v.to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let t = table(
            &["ID", "NAME"],
            &[
                vec!["a".into(), "x".into()],
                vec!["longer".into(), "-".into()],
            ],
        );
        assert_eq!(t, "ID       NAME\na        x\nlonger   -\n");
    }
}
