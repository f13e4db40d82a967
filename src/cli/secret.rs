//! TEMPORARY STUB (lead): replaced by the crypto helper's real module at merge.
use std::path::PathBuf;

use crate::repo::keys::Secret;

#[derive(Debug, Clone, Default)]
pub struct SecretSources {
    pub password_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

pub fn resolve(sources: &SecretSources, purpose: &str) -> anyhow::Result<Option<Secret>> {
    let _ = purpose;
    if let Some(k) = &sources.key_file {
        return Ok(Some(Secret::read_key_file(k)?));
    }
    if let Some(p) = &sources.password_file {
        let t = std::fs::read_to_string(p)?;
        return Ok(Some(Secret::Password(
            t.lines().next().unwrap_or("").to_string(),
        )));
    }
    if let Some(k) = std::env::var_os("CBTFS_KEY_FILE") {
        return Ok(Some(Secret::read_key_file(std::path::Path::new(&k))?));
    }
    Ok(None)
}

pub fn prompt(prompt: &str, confirm: bool) -> anyhow::Result<Secret> {
    let _ = (prompt, confirm);
    anyhow::bail!("no terminal")
}
