//! Prints every Stagely CustomResourceDefinition as one multi-document YAML stream
//! (`make crds` writes it to `crds/`).

use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut out = std::io::stdout().lock();
    for crd in stagely_api::crds() {
        writeln!(out, "---")?;
        out.write_all(serde_yaml::to_string(&crd)?.as_bytes())?;
    }
    Ok(())
}
