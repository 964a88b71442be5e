//! `lever models pull|list`.

use anyhow::{Result, bail};
use lever_model::registry::{self, REGISTRY};
use serde_json::json;

use crate::cli::ModelsCommand;

pub fn run(cmd: ModelsCommand) -> Result<()> {
    let home = registry::lever_home();
    match cmd {
        ModelsCommand::Pull { names } => {
            let entries: Vec<_> = if names.is_empty() {
                REGISTRY.iter().collect()
            } else {
                names
                    .iter()
                    .map(|n| {
                        registry::find(n).ok_or_else(|| {
                            anyhow::anyhow!(
                                "unknown model `{n}` (registry: {})",
                                REGISTRY
                                    .iter()
                                    .map(|e| e.name)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        })
                    })
                    .collect::<Result<_>>()?
            };
            let mut draw = crate::progress::provisioning();
            for e in entries {
                if e.is_provisioned(&home) {
                    eprintln!("{}: already at {}", e.name, e.main_path(&home).display());
                    continue;
                }
                registry::provision(e, &home, &mut draw)?;
            }
            Ok(())
        }
        ModelsCommand::List { json } => {
            let rows: Vec<_> = REGISTRY
                .iter()
                .map(|e| {
                    json!({
                        "name": e.name,
                        "kind": e.kind,
                        "size": e.size_bytes(&home),
                        "quantization": e.quantization,
                        "path": e.main_path(&home),
                        "provisioned": e.is_provisioned(&home),
                    })
                })
                .collect();
            if json {
                println!("{}", serde_json::Value::Array(rows));
                return Ok(());
            }
            println!(
                "{:<24} {:<10} {:>10} {:<6} PATH",
                "NAME", "KIND", "SIZE", "QUANT"
            );
            for r in rows {
                let size = r["size"].as_u64().map_or_else(
                    || "(not pulled)".to_string(),
                    |b| format!("{:.1} MB", b as f64 / 1e6),
                );
                println!(
                    "{:<24} {:<10} {:>10} {:<6} {}",
                    r["name"].as_str().unwrap_or(""),
                    r["kind"].as_str().unwrap_or(""),
                    size,
                    r["quantization"].as_str().unwrap_or(""),
                    r["path"].as_str().unwrap_or("")
                );
            }
            if REGISTRY.is_empty() {
                bail!("the registry is empty");
            }
            Ok(())
        }
    }
}
