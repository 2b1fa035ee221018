//! File plumbing shared by every stage: atomic outputs (write to a temporary sibling, then rename,
//! so a failed or interrupted run never leaves a half-written file under the final name), Parquet
//! tables through polars, and transparent reading of gzip-compressed inputs.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use polars::prelude::{DataFrame, ParquetReader, ParquetWriter, SerReader};

use crate::error::{Error, Result};

/// A file being written under a temporary name beside its destination. `commit` flushes, syncs
/// and renames it into place; dropping it uncommitted removes the temporary file.
pub struct AtomicFile {
    dest: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
}

/// The temporary name `dest` is written under by this process before it is renamed into place:
/// `.NAME.PID.tmp` beside it (files and checkpoint folders alike). Never read under that name.
pub fn temp_path(dest: &Path) -> Result<PathBuf> {
    let name = dest
        .file_name()
        .ok_or_else(|| Error::in_file(dest, "output path has no file name"))?
        .to_string_lossy();
    Ok(dest.with_file_name(format!(".{name}.{}.tmp", std::process::id())))
}

/// Whether `name` is a temporary name (see [`temp_path`]) of process `pid`.
pub fn is_temp_of(name: &str, pid: u32) -> bool {
    name.starts_with('.') && name.ends_with(&format!(".{pid}.tmp"))
}

impl AtomicFile {
    /// Start writing `dest` (its folder is created).
    pub fn create(dest: impl AsRef<Path>) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let tmp = temp_path(&dest)?;
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicFile {
            dest,
            tmp,
            writer: Some(BufWriter::new(file)),
        })
    }

    /// The buffered writer.
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.writer
            .as_mut()
            .expect("AtomicFile writer is present until commit")
    }

    /// Flush, sync and rename into place.
    pub fn commit(mut self) -> Result<()> {
        let writer = self
            .writer
            .take()
            .expect("AtomicFile writer is present until commit");
        let file = writer
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Write `bytes` to `dest` atomically.
pub fn write_atomic(dest: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let dest = dest.as_ref();
    let mut out = AtomicFile::create(dest)?;
    out.writer()
        .write_all(bytes)
        .map_err(|e| Error::io(dest, e))?;
    out.commit()
}

/// Write a table to `dest` as Parquet (zstd), atomically.
pub fn write_parquet(df: &mut DataFrame, dest: impl AsRef<Path>) -> Result<()> {
    let dest = dest.as_ref();
    let mut out = AtomicFile::create(dest)?;
    ParquetWriter::new(out.writer())
        .finish(df)
        .map_err(|e| Error::table(format!("writing {}", dest.display()), e))?;
    out.commit()
}

/// Read a whole Parquet table. A file that is not Parquet is bad input naming the file.
pub fn read_parquet(path: impl AsRef<Path>) -> Result<DataFrame> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    ParquetReader::new(file)
        .finish()
        .map_err(|e| Error::in_file(path, format!("not a readable Parquet table ({e})")))
}

/// Read a TOML file into `T`; a syntax error, unknown key or bad value is bad input naming the
/// file and the line where it starts.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map_or(1, |s| text[..s.start].matches('\n').count() + 1);
        Error::at_line(path, line, e.message().replace('\n', " "))
    })
}

/// A numeric column as f64 (nulls become NaN); a missing or non-numeric column is bad input
/// naming the file and column.
pub fn column_f64(df: &DataFrame, name: &str, path: &Path) -> Result<Vec<f64>> {
    let col = df
        .column(name)
        .map_err(|_| Error::in_file(path, format!("missing column `{name}`")))?;
    let cast = col
        .cast(&polars::prelude::DataType::Float64)
        .map_err(|_| Error::in_file(path, format!("column `{name}` is not numeric")))?;
    Ok(cast
        .f64()
        .map_err(|e| Error::table(format!("reading {name}"), e))?
        .iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}

/// A text column (nulls become empty strings); errors as [`column_f64`].
pub fn column_str(df: &DataFrame, name: &str, path: &Path) -> Result<Vec<String>> {
    let col = df
        .column(name)
        .map_err(|_| Error::in_file(path, format!("missing column `{name}`")))?;
    let cast = col
        .cast(&polars::prelude::DataType::String)
        .map_err(|_| Error::in_file(path, format!("column `{name}` is not text")))?;
    Ok(cast
        .str()
        .map_err(|e| Error::table(format!("reading {name}"), e))?
        .iter()
        .map(|v| v.unwrap_or("").to_string())
        .collect())
}

/// Open a file for reading, decompressing it when its name ends in `.gz`.
pub fn open_text(path: impl AsRef<Path>) -> Result<Box<dyn BufRead>> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader: Box<dyn Read> = if is_gzip(path) {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 16, reader)))
}

/// Whether the file name ends in `.gz`.
pub fn is_gzip(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

/// The file name without a trailing `.gz`, lowercased, for format detection.
pub fn logical_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    name.strip_suffix(".gz").map(str::to_owned).unwrap_or(name)
}

/// Iterate over the lines of a text input as `(line number, line)`, 1-based, with the line
/// terminator removed. Invalid UTF-8 is bad input naming the file and line; a decompression
/// error names the file.
pub fn lines(path: &Path) -> Result<impl Iterator<Item = Result<(usize, String)>>> {
    let mut reader = open_text(path)?;
    let path = path.to_path_buf();
    let mut line_no = 0usize;
    let mut buf = Vec::new();
    Ok(std::iter::from_fn(move || {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(_) => {
                line_no += 1;
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                Some(match std::str::from_utf8(&buf) {
                    Ok(s) => Ok((line_no, s.to_owned())),
                    Err(e) => Err(Error::at_line(
                        &path,
                        line_no,
                        format!(
                            "invalid UTF-8 at byte {} of the line; convert the file to UTF-8",
                            e.valid_up_to() + 1
                        ),
                    )),
                })
            }
            Err(e) => Some(Err(Error::in_file(
                &path,
                format!("read failed after line {line_no}: {e}"),
            ))),
        }
    }))
}

/// Read every tensor of a safetensors file; a malformed file is bad input naming it.
pub fn read_tensors(path: &Path) -> Result<std::collections::HashMap<String, tch::Tensor>> {
    if !path.exists() {
        return Err(Error::in_file(path, "file not found"));
    }
    let list = tch::Tensor::read_safetensors(path)
        .map_err(|e| Error::in_file(path, format!("not a readable safetensors file ({e})")))?;
    Ok(list.into_iter().collect())
}

/// Write named tensors as safetensors, atomically.
pub fn write_tensors(named: &[(String, tch::Tensor)], path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = temp_path(path)?;
    let views = named
        .iter()
        .map(|(n, t)| Ok((n.as_str(), TensorView::new(n, t, path)?)))
        .collect::<Result<Vec<_>>>()?;
    if let Err(e) = safetensors::serialize_to_file(views, None, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        // Name the file the user asked for; a full disk or a size limit is the usual cause.
        let source = match e {
            safetensors::SafeTensorError::IoError(io) => io,
            other => std::io::Error::other(other.to_string()),
        };
        return Err(Error::io(path, source));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A tensor's values as bytes, row-major in its own kind, copied to the CPU (what safetensors
/// stores, and what manifests fingerprint).
pub fn tensor_bytes(t: &tch::Tensor) -> Vec<u8> {
    let cpu = t.to_device(tch::Device::Cpu).contiguous();
    let mut bytes = vec![0u8; cpu.numel() * cpu.kind().elt_size_in_bytes()];
    cpu.copy_data_u8(&mut bytes, cpu.numel());
    bytes
}

/// A tch tensor as a view the `safetensors` crate serialises, one tensor at a time. Written by
/// hand (tch has its own, private one) because tch's writer flattens I/O errors into a string,
/// and a failed write must say which file and why.
struct TensorView<'a> {
    tensor: &'a tch::Tensor,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
}

impl<'a> TensorView<'a> {
    fn new(name: &str, tensor: &'a tch::Tensor, path: &Path) -> Result<Self> {
        use safetensors::Dtype;
        use tch::Kind;
        let dtype = match tensor.kind() {
            Kind::Bool => Dtype::BOOL,
            Kind::Uint8 => Dtype::U8,
            Kind::Int8 => Dtype::I8,
            Kind::Int16 => Dtype::I16,
            Kind::Int => Dtype::I32,
            Kind::Int64 => Dtype::I64,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Half => Dtype::F16,
            Kind::Float => Dtype::F32,
            Kind::Double => Dtype::F64,
            k => {
                return Err(Error::invalid(
                    path.display().to_string(),
                    format!("tensor `{name}` of kind {k:?} cannot be saved as safetensors"),
                ))
            }
        };
        let shape = tensor.size().iter().map(|&d| d.max(0) as usize).collect();
        Ok(TensorView {
            tensor,
            dtype,
            shape,
        })
    }
}

impl safetensors::View for TensorView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        tensor_bytes(self.tensor).into()
    }

    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_recognised_by_process() {
        let me = std::process::id();
        let tmp = temp_path(Path::new("out/step-000003")).unwrap();
        let name = tmp.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name, format!(".step-000003.{me}.tmp"));
        assert!(is_temp_of(&name, me));
        assert!(!is_temp_of(&name, me + 1));
        assert!(!is_temp_of("model.safetensors", me));
        assert!(!is_temp_of(&format!(".x.{me}0.tmp"), me));
        assert!(temp_path(Path::new("/")).is_err());
    }

    #[test]
    fn uncommitted_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.txt");
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.writer().write_all(b"partial").unwrap();
        }
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_atomic(&dest, b"done").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"done");
    }

    #[test]
    fn lines_reports_invalid_utf8_with_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.txt");
        std::fs::write(&p, b"ok\r\nfine\n\xff\xfe bad\n").unwrap();
        let got: Vec<_> = lines(&p).unwrap().collect();
        assert_eq!(got[0].as_ref().unwrap(), &(1, "ok".to_string()));
        assert_eq!(got[1].as_ref().unwrap(), &(2, "fine".to_string()));
        let err = got[2].as_ref().unwrap_err().to_string();
        assert!(err.contains("x.txt:3: invalid UTF-8"), "{err}");
    }
}
