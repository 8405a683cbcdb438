//! Prints every Stagely CustomResourceDefinition as YAML: `crdgen` writes one multi-document
//! stream to stdout; `crdgen DIR` writes `DIR/<name>.yaml` per CRD (`make crds` writes `crds/`).

use std::io::Write;
use std::path::PathBuf;

const HEADER: &str = "# Generated from api/ by `make crds`; do not edit.\n";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os().nth(1).map(PathBuf::from);
    let mut stdout = std::io::stdout().lock();
    for crd in stagely_api::crds() {
        let yaml = serde_yaml::to_string(&crd)?;
        match &dir {
            Some(dir) => {
                let name = crd.metadata.name.as_deref().ok_or("a CRD without a name")?;
                std::fs::write(dir.join(format!("{name}.yaml")), format!("{HEADER}{yaml}"))?;
            }
            None => write!(stdout, "---\n{yaml}")?,
        }
    }
    Ok(())
}
