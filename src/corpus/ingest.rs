//! Reading raw records from the input formats `corpus ingest` accepts: plain text, JSONL, CSV/TSV,
//! Parquet, and a directory of `.txt` files whose first-level subfolder names are the domains.
//! Text-based inputs may be gzip-compressed (`.gz`). Every malformed input is reported as
//! `file:line: reason` (or `file: reason` where no line applies).

use std::path::{Path, PathBuf};

use crate::corpus::RawRecord;
use crate::error::{Error, Result};
use crate::io;

/// An input format. Detected from the file name (after stripping `.gz`) unless given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Plain UTF-8 text; samples per `--unit` (default one per line).
    Text,
    /// One JSON object per line with `text`, optional `id` and `domain`.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
    /// Tab-separated values with a header row.
    Tsv,
    /// A Parquet table.
    Parquet,
    /// A directory: `<dir>/<domain>/**/*.txt`.
    Dir,
}

impl Format {
    /// Guess the format from a path: a directory, or the extension before any `.gz`.
    pub fn detect(path: &Path) -> Result<Format> {
        if path.is_dir() {
            return Ok(Format::Dir);
        }
        let name = io::logical_name(path);
        let ext = name.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
        match ext {
            "txt" | "text" => Ok(Format::Text),
            "jsonl" | "ndjson" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            "tsv" => Ok(Format::Tsv),
            "parquet" | "pq" => Ok(Format::Parquet),
            _ => Err(Error::in_file(
                path,
                format!(
                    "unknown input format (extension {:?}); name it .txt, .jsonl, .csv, .tsv or \
                     .parquet (optionally .gz), or pass --format",
                    ext
                ),
            )),
        }
    }
}

/// What counts as one sample in plain-text inputs (text files and directories).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Unit {
    /// Each non-blank line.
    #[default]
    Line,
    /// Each block of lines separated by blank lines.
    Paragraph,
    /// The whole file.
    File,
}

/// Where the text, domain and id come from.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// `None`: detect from the path.
    pub format: Option<Format>,
    /// Line, paragraph or whole file per sample (text inputs).
    pub unit: Unit,
    /// Field/column holding the text.
    pub text_field: String,
    /// Field/column holding the domain; `None`: use `domain` when present.
    pub domain_field: Option<String>,
    /// Field/column holding the id; `None`: use `id` when present, else the origin `file:line`.
    pub id_field: Option<String>,
    /// Domain of records that have none.
    pub default_domain: String,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            format: None,
            unit: Unit::Line,
            text_field: "text".into(),
            domain_field: None,
            id_field: None,
            default_domain: "general".into(),
        }
    }
}

/// Read every raw record of `path`. Fails, naming the place, on an empty input, invalid UTF-8,
/// malformed JSON/CSV, a missing field or column, or an unknown format.
pub fn read_records(path: &Path, opts: &IngestOptions) -> Result<Vec<RawRecord>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let format = match opts.format {
        Some(f) => f,
        None => Format::detect(path)?,
    };
    if format == Format::Dir && !meta.is_dir() {
        return Err(Error::in_file(path, "--format dir needs a directory"));
    }
    if format != Format::Dir && meta.is_dir() {
        return Err(Error::in_file(
            path,
            "is a directory; use --format dir or omit --format",
        ));
    }
    if meta.is_file() && meta.len() == 0 {
        return Err(Error::in_file(path, "the file is empty"));
    }
    let label = display_name(path);
    let records = match format {
        Format::Text => read_text(path, &label, &opts.default_domain, opts.unit)?,
        Format::Jsonl => read_jsonl(path, &label, opts)?,
        Format::Csv => read_delimited(path, &label, b',', opts)?,
        Format::Tsv => read_delimited(path, &label, b'\t', opts)?,
        Format::Parquet => read_parquet_records(path, &label, opts)?,
        Format::Dir => read_dir(path, opts.unit)?,
    };
    if records.is_empty() {
        return Err(Error::in_file(
            path,
            "no samples: the input holds only blank text",
        ));
    }
    Ok(records)
}

/// The name used in origins: the file name, so ids do not depend on where the file lies.
fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn read_text(path: &Path, label: &str, domain: &str, unit: Unit) -> Result<Vec<RawRecord>> {
    let mut out = Vec::new();
    let mut block = String::new();
    let mut block_start = 0usize;
    let push = |origin: String, text: &str, out: &mut Vec<RawRecord>| {
        if !text.trim().is_empty() {
            out.push(RawRecord {
                origin,
                id: None,
                text: text.to_owned(),
                domain: domain.to_owned(),
                long_tail: None,
                neglected: None,
                noise: None,
            });
        }
    };
    for item in io::lines(path)? {
        let (line_no, line) = item?;
        match unit {
            Unit::Line => push(format!("{label}:{line_no}"), &line, &mut out),
            Unit::Paragraph | Unit::File => {
                if unit == Unit::Paragraph && line.trim().is_empty() {
                    push(format!("{label}:{block_start}"), &block, &mut out);
                    block.clear();
                    continue;
                }
                if block.is_empty() {
                    block_start = line_no;
                }
                block.push_str(&line);
                block.push('\n');
            }
        }
    }
    match unit {
        Unit::Paragraph => push(format!("{label}:{block_start}"), &block, &mut out),
        Unit::File => push(label.to_owned(), &block, &mut out),
        Unit::Line => {}
    }
    Ok(out)
}

fn read_jsonl(path: &Path, label: &str, opts: &IngestOptions) -> Result<Vec<RawRecord>> {
    let domain_key = opts.domain_field.as_deref().unwrap_or("domain");
    let id_key = opts.id_field.as_deref().unwrap_or("id");
    let mut out = Vec::new();
    for item in io::lines(path)? {
        let (line_no, line) = item?;
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| Error::at_line(path, line_no, msg);
        // A UTF-8 byte-order mark (as Windows editors write) is not part of the JSON.
        let line = line.strip_prefix('\u{feff}').unwrap_or(&line);
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| at(format!("invalid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| at("expected a JSON object per line".into()))?;
        let text = match obj.get(&opts.text_field) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(at(format!(
                    "field `{}` must be a string, found {}",
                    opts.text_field,
                    json_kind(other)
                )))
            }
            None => return Err(at(format!("missing field `{}`", opts.text_field))),
        };
        let domain = match obj.get(domain_key) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(serde_json::Value::Null) | None if opts.domain_field.is_none() => {
                opts.default_domain.clone()
            }
            None => return Err(at(format!("missing field `{domain_key}`"))),
            Some(other) => {
                return Err(at(format!(
                    "field `{domain_key}` must be a non-empty string, found {}",
                    json_kind(other)
                )))
            }
        };
        let id = match obj.get(id_key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            Some(serde_json::Value::Null) | None if opts.id_field.is_none() => None,
            None => return Err(at(format!("missing field `{id_key}`"))),
            Some(other) => {
                return Err(at(format!(
                    "field `{id_key}` must be a string or number, found {}",
                    json_kind(other)
                )))
            }
        };
        out.push(RawRecord {
            origin: format!("{label}:{line_no}"),
            id,
            text,
            domain,
            long_tail: None,
            neglected: None,
            noise: None,
        });
    }
    Ok(out)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Resolve the text/domain/id columns among `columns`; missing required ones are errors.
struct ColumnPlan {
    text: usize,
    domain: Option<usize>,
    id: Option<usize>,
}

fn plan_columns(path: &Path, columns: &[String], opts: &IngestOptions) -> Result<ColumnPlan> {
    let find = |name: &str| columns.iter().position(|c| c == name);
    let missing = |name: &str| {
        Error::in_file(
            path,
            format!("missing column `{name}` (columns: {})", columns.join(", ")),
        )
    };
    let text = find(&opts.text_field).ok_or_else(|| missing(&opts.text_field))?;
    let domain = match &opts.domain_field {
        Some(name) => Some(find(name).ok_or_else(|| missing(name))?),
        None => find("domain"),
    };
    let id = match &opts.id_field {
        Some(name) => Some(find(name).ok_or_else(|| missing(name))?),
        None => find("id"),
    };
    Ok(ColumnPlan { text, domain, id })
}

fn read_delimited(
    path: &Path,
    label: &str,
    delimiter: u8,
    opts: &IngestOptions,
) -> Result<Vec<RawRecord>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_reader(io::open_text(path)?);
    let csv_err = |e: csv::Error| match e.position() {
        Some(p) => Error::at_line(path, p.line() as usize, csv_message(&e)),
        None => Error::in_file(path, csv_message(&e)),
    };
    let headers: Vec<String> = reader
        .headers()
        .map_err(csv_err)?
        .iter()
        .map(|h| h.trim().to_owned())
        .collect();
    let plan = plan_columns(path, &headers, opts)?;
    let mut out = Vec::new();
    for row in reader.records() {
        let row = row.map_err(csv_err)?;
        let line = row.position().map(|p| p.line() as usize).unwrap_or(0);
        let text = row.get(plan.text).unwrap_or("");
        if text.trim().is_empty() {
            continue;
        }
        let domain = plan
            .domain
            .and_then(|i| row.get(i))
            .filter(|d| !d.trim().is_empty())
            .map(|d| d.trim().to_owned());
        let domain = match (domain, &opts.domain_field) {
            (Some(d), _) => d,
            (None, None) => opts.default_domain.clone(),
            (None, Some(name)) => {
                return Err(Error::at_line(path, line, format!("empty `{name}` value")))
            }
        };
        out.push(RawRecord {
            origin: format!("{label}:{line}"),
            id: plan
                .id
                .and_then(|i| row.get(i))
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            text: text.to_owned(),
            domain,
            long_tail: None,
            neglected: None,
            noise: None,
        });
    }
    Ok(out)
}

fn csv_message(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "invalid UTF-8; convert the file to UTF-8".into(),
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("{len} fields where the header has {expected_len}"),
        _ => e.to_string(),
    }
}

fn read_parquet_records(path: &Path, label: &str, opts: &IngestOptions) -> Result<Vec<RawRecord>> {
    let df = io::read_parquet(path)?;
    let columns: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|c| c.to_string())
        .collect();
    let plan = plan_columns(path, &columns, opts)?;
    let get = |i: usize| -> Result<Vec<Option<String>>> {
        let col = &df.columns()[i];
        let cast = col
            .cast(&polars::prelude::DataType::String)
            .map_err(|_| Error::in_file(path, format!("column `{}` is not text", col.name())))?;
        let ca = cast
            .str()
            .map_err(|e| Error::table("reading a string column", e))?;
        Ok(ca.iter().map(|v| v.map(str::to_owned)).collect())
    };
    let texts = get(plan.text)?;
    let domains = plan.domain.map(get).transpose()?;
    let ids = plan.id.map(get).transpose()?;
    let mut out = Vec::new();
    for (row, text) in texts.into_iter().enumerate() {
        let row1 = row + 1;
        let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
            continue;
        };
        let domain = domains.as_ref().and_then(|d| d[row].clone());
        let domain = match (domain, &opts.domain_field) {
            (Some(d), _) if !d.is_empty() => d,
            (_, None) => opts.default_domain.clone(),
            (_, Some(name)) => {
                return Err(Error::in_file(
                    path,
                    format!("column `{name}`: null or empty in row {row1}"),
                ))
            }
        };
        out.push(RawRecord {
            origin: format!("{label}:row{row1}"),
            id: ids.as_ref().and_then(|v| v[row].clone()),
            text,
            domain,
            long_tail: None,
            neglected: None,
            noise: None,
        });
    }
    Ok(out)
}

/// `<dir>/<domain>/**/*.txt(.gz)`, visited in sorted order; files directly in `<dir>` are an error
/// (their domain would be unknown).
fn read_dir(root: &Path, unit: Unit) -> Result<Vec<RawRecord>> {
    let mut files = Vec::new();
    collect_txt(root, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(Error::in_file(root, "no .txt files under this directory"));
    }
    let mut out = Vec::new();
    for file in files {
        let rel = file.strip_prefix(root).unwrap_or(&file);
        let mut parts = rel.components();
        let domain =
            match (parts.next(), parts.next()) {
                (Some(d), Some(_)) => d.as_os_str().to_string_lossy().into_owned(),
                _ => return Err(Error::in_file(
                    &file,
                    "a .txt file directly in the input directory has no domain; move it into a \
                     subfolder named after its domain",
                )),
            };
        let label = rel.to_string_lossy().replace('\\', "/");
        out.extend(read_text(&file, &label, &domain, unit)?);
    }
    Ok(out)
}

fn collect_txt(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            collect_txt(&path, out)?;
        } else if io::logical_name(&path).ends_with(".txt") {
            out.push(path);
        } else {
            tracing::debug!("skipping {} (not .txt)", path.display());
        }
    }
    Ok(())
}
