//! BEIR dataset folders (Thakur et al., 2021; the format of `beir.datasets.data_loader.
//! GenericDataLoader`):
//!
//! ```text
//! <dir>/corpus.jsonl[.gz]    {"_id": "...", "title": "...", "text": "...", ...} per line
//! <dir>/queries.jsonl        {"_id": "...", "text": "...", ...} per line
//! <dir>/qrels/<split>.tsv    header "query-id\tcorpus-id\tscore", then one judgment per line
//! ```
//!
//! As BEIR does, only the queries judged in the split are kept, scores are integer grades (a
//! later line for the same pair replaces an earlier one), and a missing `title` is empty. CRLF
//! line ends and a UTF-8 byte-order mark are tolerated. Every error names file:line and the field.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::fuse::Hit;
use crate::metrics::{Evaluation, Qrels, Run, evaluate};
use crate::{Error, Result};

/// A corpus document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    pub id: String,
    pub title: String,
    pub text: String,
}

impl Doc {
    /// `title + " " + text`, the single field BEIR's BM25 baselines index (a missing title
    /// gives just the text).
    pub fn contents(&self) -> String {
        if self.title.is_empty() {
            self.text.clone()
        } else {
            format!("{} {}", self.title, self.text)
        }
    }
}

/// A query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: String,
    pub text: String,
}

/// A loaded BEIR split: the whole corpus, the judged queries (in file order), the judgments.
#[derive(Debug, Clone)]
pub struct Beir {
    pub corpus: Vec<Doc>,
    pub queries: Vec<Query>,
    pub qrels: Qrels,
}

impl Beir {
    /// Runs `search` for every judged query and evaluates its hits as BEIR does (identical ids
    /// ignored). Hit ids are positions in `self.corpus`. Returns the run (BEIR doc ids) too.
    pub fn evaluate(
        &self,
        mut search: impl FnMut(&Query) -> Result<Vec<Hit>>,
    ) -> Result<(Run, Evaluation)> {
        let mut run = Run::new();
        for q in &self.queries {
            let mut list = Vec::new();
            for h in search(q)? {
                let doc = self.corpus.get(h.id as usize).ok_or_else(|| Error::Param {
                    name: "hit id",
                    value: h.id.to_string(),
                    problem: "not a position in the corpus",
                })?;
                list.push((doc.id.clone(), f64::from(h.score)));
            }
            run.insert(q.id.clone(), list);
        }
        let evaluation = evaluate(&self.qrels, &run, true);
        Ok((run, evaluation))
    }
}

/// Loads `dir` for `split` (e.g. "test", "train", "dev").
pub fn load(dir: &Path, split: &str) -> Result<Beir> {
    let gz = dir.join("corpus.jsonl.gz");
    let plain = dir.join("corpus.jsonl");
    let corpus = if plain.exists() {
        load_corpus(&plain)?
    } else {
        load_corpus(&gz)?
    };
    let qrels_path = qrels_path(dir, split);
    let qrels = load_qrels(&qrels_path)?;
    let queries_path = dir.join("queries.jsonl");
    let mut queries = load_queries(&queries_path)?;
    queries.retain(|q| qrels.contains_key(&q.id));
    let have: HashSet<&str> = queries.iter().map(|q| q.id.as_str()).collect();
    if let Some(missing) = qrels.keys().find(|q| !have.contains(q.as_str())) {
        return Err(Error::File {
            path: qrels_path,
            problem: format!(
                "query-id {missing:?} is judged but not in {}",
                queries_path.display()
            ),
        });
    }
    Ok(Beir {
        corpus,
        queries,
        qrels,
    })
}

/// Opens `path`, decompressing when it ends in `.gz`.
fn open_lines(path: &Path) -> Result<Box<dyn BufRead>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 16, reader)))
}

/// Calls `f(line_number, line)` for each line of `path`, without its `\n`/`\r\n` and without a
/// leading byte-order mark.
fn for_each_line(path: &Path, mut f: impl FnMut(usize, &str) -> Result<()>) -> Result<()> {
    let mut reader = open_lines(path)?;
    let mut buf = String::new();
    let mut number = 0;
    loop {
        buf.clear();
        number += 1;
        let n = reader.read_line(&mut buf).map_err(|e| Error::Line {
            path: path.to_path_buf(),
            line: number,
            problem: format!("read failed: {e}"),
        })?;
        if n == 0 {
            return Ok(());
        }
        let mut line = buf.strip_suffix('\n').unwrap_or(&buf);
        line = line.strip_suffix('\r').unwrap_or(line);
        if number == 1 {
            line = line.strip_prefix('\u{feff}').unwrap_or(line);
        }
        f(number, line)?;
    }
}

fn line_error(path: &Path, line: usize, problem: impl Into<String>) -> Error {
    Error::Line {
        path: path.to_path_buf(),
        line,
        problem: problem.into(),
    }
}

/// A string field of a JSON object; numbers are accepted as ids (some BEIR exports write them).
fn field(obj: &Value, name: &str, path: &Path, line: usize, required: bool) -> Result<String> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) if name == "_id" => Ok(n.to_string()),
        None | Some(Value::Null) if !required => Ok(String::new()),
        None => Err(line_error(path, line, format!("field \"{name}\": missing"))),
        Some(other) => Err(line_error(
            path,
            line,
            format!(
                "field \"{name}\": expected a string, found {}",
                json_kind(other)
            ),
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses one JSONL line into an object; `None` for a blank line.
fn json_line(path: &Path, line: usize, text: &str) -> Result<Option<Value>> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| line_error(path, line, format!("invalid JSON: {e}")))?;
    if !value.is_object() {
        return Err(line_error(
            path,
            line,
            format!("expected a JSON object, found {}", json_kind(&value)),
        ));
    }
    Ok(Some(value))
}

/// Reads a corpus file (`.jsonl` or `.jsonl.gz`). Ids must be distinct.
pub fn load_corpus(path: &Path) -> Result<Vec<Doc>> {
    let mut docs = Vec::new();
    let mut seen = HashSet::new();
    for_each_line(path, |line, text| {
        let Some(obj) = json_line(path, line, text)? else {
            return Ok(());
        };
        let id = field(&obj, "_id", path, line, true)?;
        let title = field(&obj, "title", path, line, false)?;
        let text = field(&obj, "text", path, line, true)?;
        if !seen.insert(id.clone()) {
            return Err(line_error(
                path,
                line,
                format!("field \"_id\": {id:?} repeats an earlier document"),
            ));
        }
        docs.push(Doc { id, title, text });
        Ok(())
    })?;
    Ok(docs)
}

/// Reads a queries file. Ids must be distinct.
pub fn load_queries(path: &Path) -> Result<Vec<Query>> {
    let mut queries = Vec::new();
    let mut seen = HashSet::new();
    for_each_line(path, |line, text| {
        let Some(obj) = json_line(path, line, text)? else {
            return Ok(());
        };
        let id = field(&obj, "_id", path, line, true)?;
        let text = field(&obj, "text", path, line, true)?;
        if !seen.insert(id.clone()) {
            return Err(line_error(
                path,
                line,
                format!("field \"_id\": {id:?} repeats an earlier query"),
            ));
        }
        queries.push(Query { id, text });
        Ok(())
    })?;
    Ok(queries)
}

/// Reads a qrels TSV with its header line.
pub fn load_qrels(path: &Path) -> Result<Qrels> {
    let mut qrels = Qrels::new();
    for_each_line(path, |line, text| {
        if line == 1 {
            let header: Vec<&str> = text.split('\t').map(str::trim).collect();
            if header != ["query-id", "corpus-id", "score"] {
                return Err(line_error(
                    path,
                    1,
                    format!("expected the header \"query-id\\tcorpus-id\\tscore\", found {text:?}"),
                ));
            }
            return Ok(());
        }
        if text.trim().is_empty() {
            return Ok(());
        }
        let cols: Vec<&str> = text.split('\t').collect();
        if cols.len() != 3 {
            return Err(line_error(
                path,
                line,
                format!("expected 3 tab-separated columns, found {}", cols.len()),
            ));
        }
        let (query, doc, score) = (cols[0].trim(), cols[1].trim(), cols[2].trim());
        for (name, value) in [("query-id", query), ("corpus-id", doc)] {
            if value.is_empty() {
                return Err(line_error(path, line, format!("column \"{name}\": empty")));
            }
        }
        let score: i32 = score.parse().map_err(|_| {
            line_error(
                path,
                line,
                format!("column \"score\": {score:?} is not an integer"),
            )
        })?;
        qrels
            .entry(query.to_string())
            .or_default()
            .insert(doc.to_string(), score);
        Ok(())
    })?;
    Ok(qrels)
}

/// The qrels file of `split` in a BEIR folder.
pub fn qrels_path(dir: &Path, split: &str) -> PathBuf {
    dir.join("qrels").join(format!("{split}.tsv"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir.join(name).parent().expect("parent")).expect("mkdir");
        std::fs::write(dir.join(name), text).expect("write");
    }

    #[test]
    fn loads_folder_with_gz_corpus_crlf_and_grades() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let corpus = "{\"_id\": \"d1\", \"title\": \"T1\", \"text\": \"one\", \"metadata\": {}}\n\
                      {\"_id\": 2, \"text\": \"two\"}\n\n";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(corpus.as_bytes()).expect("gz");
        std::fs::write(dir.join("corpus.jsonl.gz"), gz.finish().expect("gz")).expect("write");
        write(
            dir,
            "queries.jsonl",
            "{\"_id\": \"q1\", \"text\": \"first?\"}\r\n{\"_id\": \"q2\", \"text\": \"unjudged\"}\r\n",
        );
        write(
            dir,
            "qrels/test.tsv",
            "query-id\tcorpus-id\tscore\r\nq1\td1\t2\r\nq1\t2\t0\r\n",
        );
        let b = load(dir, "test").expect("load");
        assert_eq!(b.corpus.len(), 2);
        assert_eq!(b.corpus[0].contents(), "T1 one");
        assert_eq!(
            b.corpus[1],
            Doc {
                id: "2".into(),
                title: String::new(),
                text: "two".into()
            }
        );
        assert_eq!(
            b.queries,
            [Query {
                id: "q1".into(),
                text: "first?".into()
            }]
        );
        assert_eq!(b.qrels["q1"]["d1"], 2);
        assert_eq!(b.qrels["q1"]["2"], 0);
        assert!(load(dir, "dev").is_err());
        // Evaluate a retriever that returns corpus position 0 (d1, grade 2) then 1.
        let two = |_: &Query| Ok(vec![Hit { id: 0, score: 2.0 }, Hit { id: 1, score: 1.0 }]);
        let (run, ev) = b.evaluate(two).expect("evaluate");
        assert_eq!(run["q1"][0], ("d1".to_string(), 2.0));
        assert_eq!(
            (ev.mean.ndcg_10, ev.mean.recall_100, ev.mean.mrr_10),
            (1.0, 1.0, 1.0)
        );
        let bad = |_: &Query| Ok(vec![Hit { id: 9, score: 1.0 }]);
        assert!(b.evaluate(bad).is_err());
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        write(
            dir,
            "corpus.jsonl",
            "{\"_id\": \"d1\", \"text\": \"ok\"}\n{\"_id\": \"d2\", \"text\": 5}\n",
        );
        let err = load_corpus(&dir.join("corpus.jsonl"))
            .expect_err("bad")
            .to_string();
        assert!(
            err.contains("corpus.jsonl:2") && err.contains("\"text\""),
            "{err}"
        );
        write(dir, "q.jsonl", "{\"text\": \"no id\"}\n");
        let err = load_queries(&dir.join("q.jsonl"))
            .expect_err("bad")
            .to_string();
        assert!(
            err.contains("q.jsonl:1") && err.contains("\"_id\": missing"),
            "{err}"
        );
        write(
            dir,
            "bad.jsonl",
            "{\"_id\": \"x\", \"text\": \"a\"}\nnot json\n",
        );
        let err = load_queries(&dir.join("bad.jsonl"))
            .expect_err("bad")
            .to_string();
        assert!(
            err.contains("bad.jsonl:2") && err.contains("invalid JSON"),
            "{err}"
        );
        write(dir, "r.tsv", "query-id\tcorpus-id\tscore\nq\td\tx\n");
        let err = load_qrels(&dir.join("r.tsv")).expect_err("bad").to_string();
        assert!(
            err.contains("r.tsv:2") && err.contains("\"score\""),
            "{err}"
        );
        write(dir, "h.tsv", "q\td\t1\n");
        assert!(
            load_qrels(&dir.join("h.tsv"))
                .expect_err("no header")
                .to_string()
                .contains("h.tsv:1")
        );
        // A judged query missing from queries.jsonl.
        write(dir, "corpus.jsonl", "{\"_id\": \"d1\", \"text\": \"ok\"}\n");
        write(dir, "queries.jsonl", "{\"_id\": \"q1\", \"text\": \"a\"}\n");
        write(
            dir,
            "qrels/test.tsv",
            "query-id\tcorpus-id\tscore\nq9\td1\t1\n",
        );
        let err = load(dir, "test").expect_err("missing query").to_string();
        assert!(err.contains("test.tsv") && err.contains("q9"), "{err}");
    }
}
