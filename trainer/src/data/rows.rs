//! Dataset rows in the sql-create-context shape — `{question, context, answer}`, plus `db_id` when the row comes
//! from a database we can execute on — and the files that hold them: JSON (an array), JSONL, or Parquet.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub question: String,
    /// One-line `CREATE TABLE` statements.
    pub context: String,
    /// The SQL answer.
    pub answer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_id: Option<String>,
}

/// Read rows from `.json` (array or JSONL), `.jsonl`, or `.parquet`.
pub fn read(path: &Path) -> Result<Vec<Row>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "parquet" => read_parquet(path),
        "json" | "jsonl" | "ndjson" => {
            let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let mut r = std::io::BufReader::new(f);
            let first = {
                let buf = r.fill_buf()?;
                buf.iter().find(|b| !b.is_ascii_whitespace()).copied()
            };
            if first == Some(b'[') {
                serde_json::from_reader(r).with_context(|| format!("{} is not a JSON array of rows", path.display()))
            } else {
                let mut rows = Vec::new();
                for (i, line) in r.lines().enumerate() {
                    let line = line?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    rows.push(serde_json::from_str(&line).with_context(|| {
                        format!("{}:{}: not a {{question, context, answer}} row", path.display(), i + 1)
                    })?);
                }
                Ok(rows)
            }
        }
        other => bail!("{}: unknown format .{other} (use .json, .jsonl or .parquet)", path.display()),
    }
}

fn read_parquet(path: &Path) -> Result<Vec<Row>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = SerializedFileReader::new(f).with_context(|| format!("{} is not a Parquet file", path.display()))?;
    let mut rows = Vec::new();
    for (i, rec) in reader.get_row_iter(None)?.enumerate() {
        let rec = rec?;
        let mut question = None;
        let mut context = None;
        let mut answer = None;
        let mut db_id = None;
        for (name, field) in rec.get_column_iter() {
            let Field::Str(s) = field else { continue };
            match name.as_str() {
                "question" => question = Some(s.clone()),
                "context" => context = Some(s.clone()),
                "answer" => answer = Some(s.clone()),
                "db_id" => db_id = Some(s.clone()),
                _ => {}
            }
        }
        let missing = |n: &str| anyhow!("{} row {}: no string column \"{n}\"", path.display(), i + 1);
        rows.push(Row {
            question: question.ok_or_else(|| missing("question"))?,
            context: context.ok_or_else(|| missing("context"))?,
            answer: answer.ok_or_else(|| missing("answer"))?,
            db_id,
        });
    }
    Ok(rows)
}

/// Write JSONL, one object per line.
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    let f = std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    for r in rows {
        serde_json::to_writer(&mut w, r)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(q: &str) -> Row {
        Row {
            question: q.into(),
            context: "CREATE TABLE t (a INTEGER)".into(),
            answer: "SELECT a FROM t".into(),
            db_id: None,
        }
    }

    #[test]
    fn json_array_and_jsonl_round_trip() {
        let dir = std::env::temp_dir().join(format!("copilot-rows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rows = vec![row("a?"), row("b?")];
        let jl = dir.join("x.jsonl");
        write_jsonl(&jl, &rows).unwrap();
        assert_eq!(read(&jl).unwrap(), rows);
        let arr = dir.join("x.json");
        std::fs::write(&arr, serde_json::to_string(&rows).unwrap()).unwrap();
        assert_eq!(read(&arr).unwrap(), rows);
        std::fs::write(&jl, "{\"question\": 1}\n").unwrap();
        assert!(read(&jl).unwrap_err().to_string().contains("x.jsonl:1"));
        assert!(read(&dir.join("x.csv")).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn parquet_rows_are_read_by_column_name() {
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        use std::sync::Arc;
        let dir = std::env::temp_dir().join(format!("copilot-parquet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.parquet");
        let schema = Arc::new(
            parse_message_type(
                "message m { required binary answer (UTF8); required binary question (UTF8); required binary context (UTF8); }",
            )
            .unwrap(),
        );
        let file = std::fs::File::create(&path).unwrap();
        let mut w = SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build())).unwrap();
        let mut rg = w.next_row_group().unwrap();
        for vals in [
            ["SELECT a FROM t", "SELECT b FROM t"],
            ["a?", "b?"],
            ["CREATE TABLE t (a INTEGER)", "CREATE TABLE t (b INTEGER)"],
        ] {
            let mut col = rg.next_column().unwrap().unwrap();
            let data: Vec<ByteArray> = vals.iter().map(|s| ByteArray::from(*s)).collect();
            col.typed::<ByteArrayType>().write_batch(&data, None, None).unwrap();
            col.close().unwrap();
        }
        rg.close().unwrap();
        w.close().unwrap();
        let rows = read(&path).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].question, "b?");
        assert_eq!(rows[1].answer, "SELECT b FROM t");
        assert_eq!(rows[1].context, "CREATE TABLE t (b INTEGER)");
        std::fs::remove_dir_all(&dir).ok();
    }
}
